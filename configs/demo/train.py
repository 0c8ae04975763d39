# Demo training config: a model that learns the demo set's captions on 2 CPU cores.
# `make demo` trains a fresh one for a few minutes with it; `make demo-model` trains the committed
# demo model (configs/demo/model) with it for longer. Paths resolve against the repository root.
#
# What makes it learn (README, "The demo model"): a VAE that keeps the shapes' colours, with
# balanced latent channels (configs/demo/vae, `sora fit-demo-vae`), a tiny T5 whose states say
# which colour word names the background, rectified flow with uniform times (Open-Sora 1.2's
# scheduler), short clips at the smallest resolution, and a learning rate far above Open-Sora's
# (the model is 2,000 times smaller).

# Sample size: the bucket_config below decides it per sample. The demo model is an STDiT
# (Open-Sora 1.0), whose position tables are built for one size: this one, the demo's sampling
# size; other buckets get theirs computed per batch.
num_frames = 8
frame_interval = 2  # every other frame: a training window spans a whole crossing (see the README)
image_size = (144, 256)

# Dataset: `sora demo-data demo/data`
root = None
data_path = "demo/data/data.csv"

# Acceleration
dtype = "fp32"
grad_checkpoint = False
plugin = "zero2"
sp_size = 1

# Models: the demo VAE and the tiny T5 are committed beside this file.
model = dict(
    type="demo",
    from_pretrained=None,
    qk_norm=True,
    enable_flashattn=False,
    enable_layernorm_kernel=False,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="configs/demo/vae",
    micro_batch_size=16,
)
text_encoder = dict(
    type="t5",
    from_pretrained="configs/demo/t5",
    model_max_length=16,
)
scheduler = dict(
    type="rflow",
    sample_method="uniform",  # see the README: logit-normal rarely trains the pure-noise end
    # Open-Sora 1.2's shift of times towards noise, strong: the clip's layout shows through all
    # but the heaviest noise, so only there does the caption's direction of motion teach anything
    # (README, The demo model). 144x256, 8 latent frames: s' = 10.6 s / (1 + 9.6 s); images 3.75.
    use_timestep_transform=True,
    transform_scale=10.0,
    num_sampling_steps=30,  # previews
    cfg_scale=4.0,
)

# Buckets: {resolution: {num_frames: (keep_prob, batch_size)}}; images teach colours and shapes too.
bucket_config = {
    "144p": {1: (1.0, 4), 8: (1.0, 4)},
}
# Mostly plain clips; some conditioned on their first frame or first frames (long video).
mask_ratios = {
    "mask_no": 0.7,
    "mask_quarter_random": 0.0,
    "mask_quarter_head": 0.1,
    "mask_quarter_tail": 0.0,
    "mask_image_head": 0.2,
    "mask_image_tail": 0.0,
}

# Others
seed = 42
outputs = "demo/outputs"
wandb = False

epochs = 30
log_every = 10
ckpt_every = 100
load = None

batch_size = None
lr = 1e-3
grad_clip = 1.0

# Ours
cache_dir = "demo/cache"
cache_frames_factor = 2.0
ema_decay = 0.99
eval_fraction = 0.1  # held-out samples, chosen by id
eval_every = 50
preview_prompts = [  # captions of demo clips (sora demo-data, seed 0)
    "a white square moves down on a yellow background",
    "an orange circle moves right on a purple background",
    "a purple triangle moves left on a yellow background",
]
preview_every = None  # at each checkpoint
preprocess = dict(
    probe=dict(concurrency=2, batch_size=8),
    decode=dict(concurrency=1, batch_size=4),
    vae=dict(concurrency=1, batch_size=8),
    text=dict(concurrency=1, batch_size=16),
    rows_per_shard=64,
)
