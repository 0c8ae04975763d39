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

    def _frames(self, frames: torch.Tensor, fn, fixed: int | None = None) -> torch.Tensor:
        """Apply `fn` to (N, C, H, W) frames in chunks of micro_batch_size; with `fixed`, in chunks of
        exactly `fixed` frames, the last one padded with zeros (its padding's outputs dropped)."""
        size = fixed or self.micro_batch_size or frames.shape[0]
        outputs = []
        for chunk in frames.split(size):
            if fixed and len(chunk) < fixed:
                padding = chunk.new_zeros((fixed - len(chunk), *chunk.shape[1:]))
                outputs.append(fn(torch.cat([chunk, padding]))[: len(chunk)])
            else:
                outputs.append(fn(chunk))
        return torch.cat(outputs, dim=0)

    def _pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames on the VAE's device, in its dtype, in [-1, 1]: uint8 frames (0..255) are scaled here,
        one chunk at a time, so a batch of videos can wait on the host as bytes."""
        device = next(self.module.parameters()).device
        if frames.dtype == torch.uint8:
            return (frames.to(device).float() / 127.5 - 1.0).to(self.dtype)
        return frames.to(device, self.dtype)

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor, fixed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, both scaled like latents: (B, 4, T, h, w) each.

        `video` is in [-1, 1], or uint8 (0..255) on any device (see `_pixels`). With `fixed`, every
        call of the VAE takes exactly `fixed` frames (see `encode_many`).
        """
        batch = video.shape[0]
        frames = rearrange(video, "b c t h w -> (b t) c h w")  # (B*T, C, H, W), where and as they came
        moments = self._frames(frames, lambda x: self.module.encode(self._pixels(x)).latent_dist.parameters, fixed)
        mean, logvar = moments.chunk(2, dim=1)  # (B*T, 4, h, w) each
        # z' = s * (mean + std * eps - shift): the mean moves and scales, the variance scales by s^2.
        logvar = torch.clamp(logvar, -30.0, 20.0) + 2 * torch.log(torch.tensor(self.scaling_factor))
        mean = (mean - self.shift_factor) * self.scaling_factor
        unflatten = lambda x: rearrange(x, "(b t) c h w -> b c t h w", b=batch)  # noqa: E731
        return unflatten(mean), unflatten(logvar)

    @torch.no_grad()
    def encode_many(self, videos: list[torch.Tensor], chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`encode_moments` of several videos (3, F_i, H, W) at once: the frames of all videos of one
        size go through the VAE together, in calls of exactly `chunk` frames (the last padded).
        Videos may be uint8 on the host: only one call's frames are on the device at a time.

        A frame's latents never depend on which other frames share its call: every call has one
        shape, so one convolution algorithm, and each frame is computed on its own within it. So
        a resumed preprocessing run, whose batches hold other rows, writes the same bytes.
        """
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(videos)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, video in enumerate(videos):
            by_size.setdefault(tuple(video.shape[-2:]), []).append(index)
        for indices in by_size.values():
            joined = torch.cat([videos[i] for i in indices], dim=1)[None]  # (1, 3, sum F_i, H, W)
            mean, logvar = self.encode_moments(joined, fixed=chunk)  # (1, 4, sum F_i, h, w) each
            lengths = [videos[i].shape[1] for i in indices]
            for i, m, v in zip(indices, mean[0].split(lengths, dim=1), logvar[0].split(lengths, dim=1), strict=True):
                results[i] = (m, v)  # (4, F_i, h, w) each
        return results  # type: ignore[return-value]

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
