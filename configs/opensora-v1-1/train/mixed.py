# Open-Sora 1.1 recipe: STDiT2-XL/2 on variable sizes (the mixed image and video table of the configuration docs).
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
    "240p": {16: (1.0, 16), 32: (1.0, 8), 64: (1.0, 4), 128: (1.0, 2)},
    "256": {1: (1.0, 256)},
    "512": {1: (1.0, 80)},
    "480p": {1: (1.0, 52), 16: (0.5, 4), 32: (0.0, None)},
    "720p": {16: (1.0, 2), 32: (0.0, None)},
    "1024": {1: (1.0, 20)},
    "1080p": {1: (1.0, 8)},
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
grad_checkpoint = True
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
cache_dir = "cache/opensora-v1-1-mixed"
