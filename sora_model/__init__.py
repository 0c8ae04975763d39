"""Single-device model code: the STDiT family, DiT, VAE and text-encoder wrappers, diffusion.

Files:
    sizes.py          the model sizes table (`type=` names -> depth, width, heads, family); no torch
    layers.py         building blocks: attention, MLP, embedders, sin-cos tables, modulate/layer_norm
    stdit.py          STDiT (Open-Sora 1.0) and STDiT2 (1.1): blocks, final layer, models; `build_model`
    dit.py            DiT-XL/2, Open-Sora's full-3D-attention baseline
    checkpoint.py     reading weights (.pth/.pt, safetensors, checkpoint folders) and loading them strictly
    loading.py        loading pretrained parts by hub name or folder, with errors a user can act on
    vae.py            the SD image VAE applied frame by frame
    text_encoder.py   the T5 caption encoder
    debug.py          tiny T5 and VAE stand-ins for tests and the demo
    mask_strategy.py  long video and frame conditioning: `mask_strategy` tuples, their checks
    long_video.py     sampling a long or conditioned video clip by clip
    errors.py         ModelLoadError (no torch import)
    diffusion/
        __init__.py   IDDPM, the DPM-Solver sampler, RFlow, classifier-free guidance, `build_scheduler`
        gaussian.py   Gaussian diffusion as IDDPM defines it: schedules, losses, ancestral sampling
        dpm_solver.py DPM-Solver++ (2M)
        rflow.py      rectified flow as Open-Sora 1.2 defines it: velocity loss, Euler sampling

Imports: torch, diffusers, transformers, einops and numpy (plus safetensors for weights, tqdm
for progress and, only when asked for and installed, flash_attn); within the project, only
`sora_model` itself. Never ray, never torch.distributed, never `pipelines`: parallelism,
activation checkpointing and device placement are applied from `pipelines/`.
"""
