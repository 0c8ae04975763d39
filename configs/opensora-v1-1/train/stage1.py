# Open-Sora 1.1 recipe: STDiT2-XL/2 on variable sizes (stage 1: mostly low resolution).
# The same file drives `sora preprocess` (the cache) and `sora train`.
# Preview the buckets before encoding anything:  sora bucket-report DATA.csv --config THIS_FILE

# Dataset: sizes come from bucket_config, so num_frames and image_size stay unset
num_frames = None
frame_interval = 3
image_size = None
root = None
data_path = None  # or: sora preprocess DATA.csv

# Buckets: {resolution: {num_frames: (keep_prob, batch_size per worker)}}
bucket_config = {
    "144p": {1: (0.5, 48), 16: (1.0, 6), 32: (1.0, 3), 96: (1.0, 1)},
    "256": {1: (0.5, 24), 16: (0.5, 3), 48: (0.5, 1), 64: (0.0, None)},
    "240p": {16: (0.3, 2), 32: (0.3, 1), 64: (0.0, None)},
    "512": {1: (0.4, 12)},
    "1024": {1: (0.3, 3)},
}
# Masked training: the share of samples that get each kind of frame mask
mask_ratios = {
    "mask_no": 0.75,
    "mask_quarter_random": 0.025,
    "mask_quarter_head": 0.025,
    "mask_quarter_tail": 0.025,
    "mask_quarter_head_tail": 0.05,
    "mask_image_random": 0.025,
    "mask_image_head": 0.025,
    "mask_image_tail": 0.025,
    "mask_image_head_tail": 0.05,
}

# Acceleration
dtype = "bf16"
grad_checkpoint = False
plugin = "zero2"
sp_size = 1

# Models
model = dict(
    type="STDiT2-XL/2",
    from_pretrained=None,  # pass --ckpt-path (the previous stage, or OpenSora-STDiT-v2 weights)
    input_sq_size=512,  # the pretrained model saw 512x512
    qk_norm=True,
    enable_flashattn=True,
    enable_layernorm_kernel=True,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    micro_batch_size=4,
)
text_encoder = dict(
    type="t5",
    from_pretrained="DeepFloyd/t5-v1_1-xxl",
    model_max_length=200,
    shardformer=True,
)
scheduler = dict(
    type="iddpm",
    timestep_respacing="",
)

# Others
seed = 42
outputs = "outputs"
wandb = False

epochs = 1000
log_every = 10
ckpt_every = 500
load = None

batch_size = None  # per bucket, from bucket_config
lr = 2e-5
grad_clip = 1.0

# The pre-encoded cache
cache_dir = "cache/opensora-v1-1-stage1"
