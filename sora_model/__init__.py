"""Single-device model code: STDiT family, VAE and text-encoder wrappers, diffusion.

Nothing in this package imports ray or torch.distributed; parallelism, activation
checkpointing and device placement are applied from `pipelines/`.
"""
