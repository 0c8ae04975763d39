# Open-Sora 1.1 recipe: long and conditioned video ("Inference-long").
# Total frames = loop * (num_frames - condition_frame_length) + condition_frame_length = 28 here.

num_frames = 16
frame_interval = 3
fps = 24
image_size = (240, 426)

model = dict(
    type="STDiT2-XL/2",
    from_pretrained=None,  # pass --ckpt-path
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
    cfg_channel=3,
)
dtype = "bf16"

prompt_path = None
prompt = [
    "a drone shot of waves crashing against a rocky cliff at sunset",
    "a paper boat drifting down a rainy street",
]

# Each clip after the first starts from the last condition_frame_length frames of the one before.
loop = 2
condition_frame_length = 4
# Per prompt: ";"-separated images or videos to condition on
reference_path = [
    "assets/cliff.png",
    "assets/boat_start.png;assets/boat_end.png",
]
# Per prompt: ";"-separated tuples ref_index,loop_index,ref_start_frame,num_frames,target_location[,edit_ratio]
mask_strategy = [
    "0,0,0,1,0",  # the cliff image as the first frame of the first clip
    "0,0,0,1,0;1,1,0,1,-1",  # start image first, end image as the last frame of the second clip
]

batch_size = 1
seed = 42
save_dir = "./samples"
