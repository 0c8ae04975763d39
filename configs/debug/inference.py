# Debug inference config: the debug model trained by `make demo`, tiny T5 and VAE.

num_frames = 8
fps = 8
image_size = (144, 256)

model = dict(
    type="debug",
    from_pretrained=None,  # set with --ckpt-path (a `sora train` checkpoint folder)
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
    num_sampling_steps=10,
    cfg_scale=4.0,
    cfg_channel=3,
)
dtype = "fp32"

# Other settings
batch_size = 1
seed = 42
prompt_path = None
prompt = [
    "a red circle moves left on a blue background",
    "a yellow square moves up on a purple background",
]
save_dir = "./samples/debug"

# Long video: 1 loop is a plain clip
loop = 1
condition_frame_length = 2
reference_path = None
mask_strategy = None
