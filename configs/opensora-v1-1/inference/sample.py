# Open-Sora 1.1 recipe: sample with STDiT2-XL/2 at any size the model was trained on.

num_frames = 16
frame_interval = 3
fps = 24  # saved at fps // frame_interval = 8
image_size = (240, 426)

model = dict(
    type="STDiT2-XL/2",
    from_pretrained=None,  # pass --ckpt-path (OpenSora-STDiT-v2 stage 3 weights or a sora checkpoint)
    input_sq_size=512,
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
)
scheduler = dict(
    type="iddpm",
    num_sampling_steps=100,
    cfg_scale=7.0,
    cfg_channel=3,  # or None: guide all channels
)
dtype = "bf16"

# Prompts: `prompt` wins over `prompt_path`
prompt_path = "prompts.txt"
prompt = None

batch_size = 1
seed = 42
save_dir = "./samples"
