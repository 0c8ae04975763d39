# Debug training config: tiny models, the demo dataset, 2 CPU cores, minutes.
# Drives `sora preprocess` and `sora train` in `make demo` and in the tests.
# Relative paths resolve against the folder the command runs in (the repository root).

# Sample size: the bucket_config below decides it per sample.
num_frames = None
frame_interval = 1
image_size = None

# Dataset
root = None
data_path = "demo/data/data.csv"

# Acceleration
dtype = "fp32"
grad_checkpoint = False
plugin = "zero2"
sp_size = 1

# Models: written by `sora debug-models demo/models`
model = dict(
    type="debug",
    from_pretrained=None,
    input_sq_size=256,
    qk_norm=True,
    enable_flashattn=False,
    enable_layernorm_kernel=False,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="demo/models/vae",
    micro_batch_size=16,
)
text_encoder = dict(
    type="t5",
    from_pretrained="demo/models/t5",
    model_max_length=32,
)
scheduler = dict(
    type="iddpm",
    timestep_respacing="",
)

# Buckets: {resolution: {num_frames: (keep_prob, batch_size)}}
bucket_config = {
    "144p": {1: (1.0, 4), 8: (1.0, 2), 16: (1.0, 2)},
    "240p": {1: (1.0, 2), 8: (1.0, 2), 16: (0.0, None)},
}
mask_ratios = {
    "mask_no": 0.7,
    "mask_quarter_random": 0.05,
    "mask_quarter_head": 0.05,
    "mask_quarter_tail": 0.05,
    "mask_image_head": 0.1,
    "mask_image_tail": 0.05,
}

# Others
seed = 42
outputs = "outputs"
wandb = False

epochs = 2
log_every = 5
ckpt_every = 20
load = None

batch_size = None
lr = 1e-4
grad_clip = 1.0

# Ours: where `sora preprocess` writes the cache and `sora train` reads it
cache_dir = "demo/cache"
cache_frames_factor = 2.0
ema_decay = 0.99
preprocess = dict(
    probe=dict(concurrency=2, batch_size=8),
    decode=dict(concurrency=1, batch_size=2),
    vae=dict(concurrency=1, batch_size=4),
    text=dict(concurrency=1, batch_size=16),
    rows_per_shard=64,
)
