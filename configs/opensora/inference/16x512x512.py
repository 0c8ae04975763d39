# Open-Sora 1.0 recipe: sample 16 frames of 512x512 with STDiT-XL/2.

# Sampling size
num_frames = 16
fps = 24 // 3
image_size = (512, 512)

# Models
model = dict(
    type="STDiT-XL/2",
    space_scale=1.0,
    time_scale=1.0,
    enable_flashattn=True,
    enable_layernorm_kernel=True,
    from_pretrained=None,  # pass --ckpt-path (OpenSora-v1-HQ-16x512x512.pth or a sora checkpoint)
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    micro_batch_size=2,
)
text_encoder = dict(
    type="t5",
    from_pretrained="DeepFloyd/t5-v1_1-xxl",
    model_max_length=120,
)
scheduler = dict(
    type="iddpm",
    num_sampling_steps=100,
    cfg_scale=7.0,
    cfg_channel=3,
)
dtype = "bf16"

# Other settings
batch_size = 1
seed = 42
prompt_path = "prompts.txt"  # one prompt per line; or --prompt TEXT
save_dir = "./samples"
