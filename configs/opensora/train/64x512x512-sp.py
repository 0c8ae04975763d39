# Open-Sora 1.0 recipe with sequence parallelism (Open-Sora's 64x512x512-sp.py): STDiT-XL/2 with
# each sample's tokens split over sp_size = 2 workers; `--num-workers` must be a multiple of 2
# (README, Sequence parallelism). As in Open-Sora's file, whatever its name says, the clips are
# 16 frames at stride 3 and the batch is 1 per SP group.
# The same file drives `sora preprocess` (the cache) and `sora train`.

# Sample size
num_frames = 16
frame_interval = 3
image_size = (512, 512)

# Dataset
root = None
data_path = "CSV_PATH"  # or: sora preprocess DATA.csv

# Acceleration
dtype = "bf16"
grad_checkpoint = True
plugin = "zero2-seq"
sp_size = 2
sp_split = "time"  # Open-Sora 1.0's layout: each worker holds 16 / 2 whole frames (README, Sequence parallelism)

# Models
model = dict(
    type="STDiT-XL/2",
    space_scale=1.0,
    time_scale=2 / 3,
    from_pretrained=None,  # Open-Sora starts from PixArt-XL-2-512x512.pth: pass --ckpt-path
    enable_flashattn=True,
    enable_layernorm_kernel=True,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    micro_batch_size=128,
)
text_encoder = dict(
    type="t5",
    from_pretrained="DeepFloyd/t5-v1_1-xxl",
    model_max_length=120,
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
ckpt_every = 1000
load = None

batch_size = 1
lr = 2e-5
grad_clip = 1.0

# The pre-encoded cache
cache_dir = "cache/16x512x512-stride3"
