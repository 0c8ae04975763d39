"""Rectified flow: Open-Sora 1.2's `rflow` scheduler (training loss and Euler sampling).

Time runs over [0, T) with T = num_timesteps = 1000, from data (t = 0) to noise (t = T):

    x_t = (1 - t/T) x0 + (t/T) noise          (Open-Sora's add_noise)
    v   = x0 - noise                           (the velocity the model predicts)
    loss = mean over generated frames of (v_model - v)^2

Training times are continuous: uniform on [0, T), or logit-normal (T * sigmoid(N(loc, scale)),
Open-Sora 1.2's `sample_method="logit-normal"`), optionally moved towards the noise end for
large inputs by the timestep transform. Condition frames are given clean (noised to t = 0).

Sampling takes `num_sampling_steps` Euler steps down t_i = (1 - i/N) T (each transformed like
training's when `use_timestep_transform` is on): x += v (t_i - t_{i+1}) / T, with t_N = 0, and
classifier-free guidance on every channel of the velocity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sora_model.diffusion.gaussian import ModelFn, mean_flat
from sora_model.diffusion.guidance import classifier_free_guidance
from sora_model.diffusion.progress import StepCallback, sampling_steps

SAMPLE_METHODS = ("uniform", "logit-normal")
# The timestep transform's reference: 512x512 pixels, one frame (Open-Sora 1.2).
BASE_PIXELS = 512 * 512
BASE_FRAMES = 1


def timestep_transform(
    t: torch.Tensor, height, width, num_frames, num_timesteps: int = 1000, scale: float = 1.0
) -> torch.Tensor:
    """Open-Sora 1.2's shift of times (B,) towards the noise end for inputs larger than the base:
    with s = t/T and r = sqrt(pixels / 512^2) * sqrt(latent frames / 1) * scale, s' = r s / (1 + (r - 1) s).

    `height`, `width` are pixel sizes and `num_frames` the latent frame count (B,) or scalars.
    Open-Sora 1.2 counts latent frames with its own VAE's compression (frames // 17 * 5); with
    the image VAEs of this project (no temporal compression) they are the frames themselves.
    """
    as_tensor = lambda value: torch.as_tensor(value, dtype=torch.float64, device=t.device)  # noqa: E731
    ratio_space = (as_tensor(height) * as_tensor(width) / BASE_PIXELS).sqrt()
    ratio_time = (as_tensor(num_frames) / BASE_FRAMES).sqrt()
    ratio = ratio_space * ratio_time * scale
    s = t.double() / num_timesteps
    return (ratio * s / (1 + (ratio - 1) * s) * num_timesteps).to(t.dtype)


class RFlow:
    """Open-Sora 1.2's `rflow` scheduler: rectified-flow training and Euler sampling with guidance."""

    def __init__(
        self,
        num_sampling_steps: int = 10,
        cfg_scale: float = 4.0,
        sample_method: str = "uniform",
        loc: float = 0.0,
        scale: float = 1.0,
        use_timestep_transform: bool = False,
        transform_scale: float = 1.0,
        num_timesteps: int = 1000,
    ) -> None:
        if sample_method not in SAMPLE_METHODS:
            raise ValueError(f"sample_method must be one of {SAMPLE_METHODS}, got {sample_method!r}")
        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = cfg_scale
        self.sample_method = sample_method
        self.loc, self.scale = loc, scale
        self.use_timestep_transform = use_timestep_transform
        self.transform_scale = transform_scale
        self._num_timesteps = num_timesteps

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def _transform(self, t: torch.Tensor, sizes: Sequence | None) -> torch.Tensor:
        if not self.use_timestep_transform:
            return t
        if sizes is None:
            raise ValueError("use_timestep_transform needs the input's (height, width, num_frames)")
        return timestep_transform(t, *sizes, num_timesteps=self.num_timesteps, scale=self.transform_scale)

    def sample_timesteps(self, batch: int, generator: torch.Generator, sizes: Sequence | None = None) -> torch.Tensor:
        """Training times (batch,) in [0, T), float; `sizes` = (height, width, latent frames) for the transform."""
        if self.sample_method == "uniform":
            t = torch.rand(batch, generator=generator) * self.num_timesteps
        else:
            normal = torch.randn(batch, generator=generator) * self.scale + self.loc
            t = torch.sigmoid(normal) * self.num_timesteps
        return self._transform(t, sizes)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t/T) x0 + (t/T) noise, per sample."""
        s = (t.float() / self.num_timesteps)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        return (1 - s) * x0 + s * noise

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,) for x0 (B, C, T, H, W) at times t; `mask` (B, T): True = generated frame."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.add_noise(x0, noise, t)
        if mask is not None:  # condition frames at t = 0: clean
            xt = torch.where(mask[:, None, :, None, None], xt, x0)
        output = model(xt, t, mask)
        velocity = output[:, : x0.shape[1]]  # a model with learned sigma: its first half
        return {"loss": mean_flat((velocity - (x0 - noise)) ** 2, mask)}

    def sampling_times(self, batch: int, device, sizes: Sequence | None = None) -> list[torch.Tensor]:
        """t_i = (1 - i/N) T for i < N, each (batch,), transformed like training's."""
        steps = self.num_sampling_steps
        return [
            self._transform(torch.full((batch,), (1 - i / steps) * self.num_timesteps, device=device), sizes)
            for i in range(steps)
        ]

    @torch.no_grad()
    def sample(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        reference: torch.Tensor | None = None,
        edit: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool | StepCallback = False,
        sizes: Sequence | None = None,
    ) -> torch.Tensor:
        """Euler sampling from `noise` (B, C, T, H, W); `model` takes the doubled batch
        [conditional; unconditional] and is guided on every channel.

        With `reference` latents and per-frame `edit` ratios (B, T) in [0, 1] (Open-Sora 1.2's
        mask): a frame starts as its reference and is held there while t > edit * T; when t
        first falls to edit * T or below it is noised to t and generated from then on.
        Frames with edit 1 are generated from the start, frames with edit 0 never change.
        """
        guided = classifier_free_guidance(model, self.cfg_scale, None)  # every channel, as Open-Sora 1.2
        x = noise if reference is None else torch.where(edit[:, None, :, None, None] >= 1, noise, reference)
        times = self.sampling_times(x.shape[0], x.device, sizes)
        started = None if edit is None else edit >= 1  # (B, T) frames already being generated
        for i, t in enumerate(sampling_steps(times, progress)):
            active = None
            if edit is not None:
                active = edit * self.num_timesteps >= t[:, None]  # (B, T)
                starting = active & ~started
                if starting.any():
                    fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                    x = torch.where(starting[:, None, :, None, None], self.add_noise(x, fresh, t), x)
                started = active
            velocity = guided(x, t, active)[:, : x.shape[1]]
            next_t = times[i + 1] if i + 1 < len(times) else torch.zeros_like(t)
            stepped = x + velocity * ((t - next_t) / self.num_timesteps)[:, None, None, None, None]
            x = stepped if active is None else torch.where(active[:, None, :, None, None], stepped, x)
        return x
