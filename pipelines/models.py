"""The VAE, text encoder and diffusion transformer a config names, loaded the same way everywhere."""

from __future__ import annotations

import torch

from pipelines.checkpoint import resolve_weights
from pipelines.config import ConfigError, ModelConfig, TextEncoderConfig, VaeConfig
from sora_model.sizes import MODEL_SIZES, Family


def load_vae(config: VaeConfig, dtype: torch.dtype):
    """The config's VAE (hub id or local folder) through `VideoAutoencoderKL.from_pretrained`."""
    from sora_model.vae import VideoAutoencoderKL

    return VideoAutoencoderKL.from_pretrained(
        config.from_pretrained,
        config.micro_batch_size,
        subfolder=config.subfolder,
        revision=config.revision,
        cache_dir=config.cache_dir,
        local_files_only=config.local_files_only,
        dtype=dtype,
    )


def load_text_encoder(config: TextEncoderConfig):
    """The config's T5 (hub id or local folder), in fp32 as Open-Sora runs it."""
    from sora_model.text_encoder import T5Encoder

    return T5Encoder.from_pretrained(
        config.from_pretrained,
        config.model_max_length,
        revision=config.revision,
        cache_dir=config.cache_dir,
        local_files_only=config.local_files_only,
    )


def load_model(config: ModelConfig, caption_channels: int, model_max_length: int, latent_size=None):
    """The diffusion transformer `config.type` names, with its weights when `from_pretrained` is set.

    `latent_size` (T, H, W) is the fixed input size that STDiT and DiT build their position
    embeddings for; STDiT2 takes any size and ignores it.
    """
    from sora_model.layers import warn_once
    from sora_model.stdit import build_model

    options: dict = {"enable_flashattn": config.enable_flashattn}
    family = MODEL_SIZES[config.type].family
    if family is Family.STDIT2:
        options |= {"qk_norm": config.qk_norm, "input_sq_size": config.input_sq_size}
    else:
        if latent_size is None:
            raise ConfigError(f"model {config.type} has one fixed size: set image_size and num_frames")
        options |= {"input_size": tuple(latent_size)}
        if family is Family.STDIT:
            options |= {"space_scale": config.space_scale, "time_scale": config.time_scale}
            if config.no_temporal_pos_emb:
                warn_once(
                    f"model.no_temporal_pos_emb=True is ignored by {config.type}, as Open-Sora's STDiT ignores it "
                    "(its weights were trained with the temporal position embedding); DiT honours it"
                )
        else:
            options |= {"no_temporal_pos_emb": config.no_temporal_pos_emb}
    model = build_model(
        config.type,
        caption_channels,
        model_max_length,
        from_pretrained=None if config.from_pretrained is None else resolve_weights(config.from_pretrained),
        enable_layernorm_kernel=config.enable_layernorm_kernel,
        **options,
    )
    if config.compile_blocks:
        compile_blocks(model)
    return model


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile every transformer block in place (`nn.Module.compile`: state_dict keys stay
    Open-Sora's); the first call of each new input shape compiles."""
    for block in model.blocks:
        block.compile()


SIZE_INPUTS = ("height", "width", "num_frames", "fps", "ar")


def size_inputs(
    model_type: str, batch: int, device: torch.device, dtype: torch.dtype = torch.float32, **values
) -> dict:
    """The size conditioning STDiT2 takes (SIZE_INPUTS), as (batch,) float32 tensors; nothing for other models.

    Each value is a number or a (batch,) tensor: the sampler gives one size for the whole
    guidance batch, training gives each sample's own (fps differs within a bucket). Training and
    sampling take ar and fps from sora_model.stdit's training_conditions / sampling_conditions.
    The values are rounded to the model's `dtype`, as Open-Sora casts them (in bf16, a height of
    853 is 852 and 240/426 is 0.5625): the released weights learnt the rounded values.
    """
    if sorted(values) != sorted(SIZE_INPUTS):
        raise TypeError(f"size_inputs takes {', '.join(SIZE_INPUTS)}; got {', '.join(values)}")
    if MODEL_SIZES[model_type].family is not Family.STDIT2:
        return {}
    return {name: torch.as_tensor(value, dtype=torch.float32, device=device).to(dtype).float().expand(batch)
            for name, value in values.items()}  # fmt: skip
