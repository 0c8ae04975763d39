# Demo inference config: the committed demo model (`make demo-model`, configs/demo/model)
# samples captions of its training clips. `make demo` runs it and judges the videos.

num_frames = 8
# The model was trained on every other frame (frame_interval 2) of clips of 8 to 30 fps: it is
# conditioned on 24 fps and the videos are saved at 24 // 2 = 12 fps.
fps = 24
frame_interval = 2
image_size = (144, 256)

model = dict(
    type="demo",
    from_pretrained="configs/demo/model/ema.safetensors",  # --ckpt-path takes a `sora train` run instead
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
    sample_method="logit-normal",
    use_timestep_transform=True,  # as trained (configs/demo/train.py)
    transform_scale=10.0,
    num_sampling_steps=30,
    cfg_scale=4.0,
)
dtype = "fp32"

# Other settings
batch_size = 8
seed = 42
prompt_path = None
prompt = [  # captions of clips the demo model was trained on (sora demo-data --num 96, seed 0)
    "a white square moves down on a yellow background",
    "a yellow square moves up on an orange background",
    "an orange circle moves right on a purple background",
    "a purple triangle moves left on a yellow background",
    "a blue triangle moves right on a white background",
    "a blue square moves right on a green background",
    "a yellow triangle moves right on an orange background",
    "a black triangle moves up on a yellow background",
]
save_dir = "demo/samples"

# Long video: 1 loop is a plain clip
loop = 1
condition_frame_length = 2
reference_path = None
mask_strategy = None
