"""The video VAE: Stable Diffusion's image VAE applied to every frame independently.

Open-Sora 1.0/1.1 use `stabilityai/sd-vae-ft-ema` this way (its `VideoAutoencoderKL`).
Because frames are encoded independently, latent frame t depends on video frame t only,
which is what lets the cache store more latent frames than a bucket needs and training
draw a random temporal window from them.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from einops import rearrange
from torch import nn

from sora_model.loading import load_pretrained


class VideoAutoencoderKL(nn.Module):
    """(B, C, T, H, W) video in [-1, 1]  <->  (B, 4, T, H/8, W/8) scaled latents.

    Scaled latents are (z - shift) * scale, with diffusers' `shift_factor` and
    `scaling_factor`; decoding applies the inverse. SD VAEs have no shift (None: 0).
    """

    def __init__(self, vae: AutoencoderKL, micro_batch_size: int | None = None) -> None:
        super().__init__()
        self.module = vae
        self.micro_batch_size = micro_batch_size
        # SD VAEs store latents divided by their std; 0.18215 for sd-vae-ft-ema. diffusers
        # keeps it in the model config (its default is the same number).
        self.scaling_factor = float(vae.config.scaling_factor)
        # A shift re-centres latents whose mean is far from 0 (the fitted demo VAE's, as in
        # SD3 and Flux); the SD VAE's latents need none.
        self.shift_factor = float(vae.config.shift_factor or 0.0)
        self.out_channels = int(vae.config.latent_channels)
        self.spatial_stride = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        micro_batch_size: int | None = None,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> VideoAutoencoderKL:
        """Load `name` (hub id or local folder) through diffusers' `AutoencoderKL.from_pretrained`."""
        vae = load_pretrained(
            "VAE",
            name,
            lambda: AutoencoderKL.from_pretrained(
                name,
                subfolder=subfolder,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                torch_dtype=dtype,
            ),
        )
        return cls(vae.eval(), micro_batch_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (T, H, W) for a video of the given size."""
        return num_frames, height // self.spatial_stride, width // self.spatial_stride

    def _frames(self, frames: torch.Tensor, fn) -> torch.Tensor:
        """Apply `fn` to (N, C, H, W) frames in chunks of micro_batch_size."""
        size = self.micro_batch_size or frames.shape[0]
        return torch.cat([fn(chunk) for chunk in frames.split(size)], dim=0)

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, both scaled like latents: (B, 4, T, h, w) each."""
        batch = video.shape[0]
        frames = rearrange(video, "b c t h w -> (b t) c h w").to(self.dtype)  # (B*T, C, H, W)
        moments = self._frames(frames, lambda x: self.module.encode(x).latent_dist.parameters)
        mean, logvar = moments.chunk(2, dim=1)  # (B*T, 4, h, w) each
        # z' = s * (mean + std * eps - shift): the mean moves and scales, the variance scales by s^2.
        logvar = torch.clamp(logvar, -30.0, 20.0) + 2 * torch.log(torch.tensor(self.scaling_factor))
        mean = (mean - self.shift_factor) * self.scaling_factor
        unflatten = lambda x: rearrange(x, "(b t) c h w -> b c t h w", b=batch)  # noqa: E731
        return unflatten(mean), unflatten(logvar)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample, scaled: (B, C, T, H, W) -> (B, 4, T, H/8, W/8)."""
        mean, logvar = self.encode_moments(video)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, T, h, w) -> video (B, C, T, H, W) in about [-1, 1]."""
        batch = latents.shape[0]
        frames = rearrange(latents, "b c t h w -> (b t) c h w").to(self.dtype)
        frames = frames / self.scaling_factor + self.shift_factor  # (B*T, 4, h, w), as the VAE made them
        decoded = self._frames(frames, lambda z: self.module.decode(z).sample)  # (B*T, C, H, W)
        return rearrange(decoded, "(b t) c h w -> b c t h w", b=batch)
