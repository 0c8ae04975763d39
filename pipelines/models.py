"""The VAE and text encoder a config names, loaded the same way everywhere."""

from __future__ import annotations

import torch

from pipelines.config import TextEncoderConfig, VaeConfig


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
