"""DPM-Solver++ (2M): a multistep, second-order ODE solver for few-step sampling (Lu et al. 2022).

The discrete linear schedule of IDDPM is read as a continuous one: log alpha_t is
interpolated linearly between the N discrete steps, with t in [1/N, 1]. The solver works
in the data prediction x0 = (x - sigma_t * eps) / alpha_t, which behaves better than the
noise prediction under classifier-free guidance. It is deterministic for a given noise.
"""

from __future__ import annotations

import numpy as np
import torch

from sora_model.diffusion.gaussian import ModelFn, linear_betas
from sora_model.diffusion.progress import StepCallback, sampling_steps


class DPMSolver:
    def __init__(self, num_sampling_steps: int = 20, num_timesteps: int = 1000) -> None:
        if num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be at least 1, got {num_sampling_steps}")
        self.steps = num_sampling_steps
        self.num_timesteps = num_timesteps
        alphas_cumprod = np.cumprod(1.0 - linear_betas(num_timesteps))
        self._t = np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps  # t of step n
        self._log_alpha = 0.5 * np.log(alphas_cumprod)

    def log_alpha(self, t: float) -> float:
        return float(np.interp(t, self._t, self._log_alpha))

    def alpha_sigma_lambda(self, t: float) -> tuple[float, float, float]:
        log_alpha = self.log_alpha(t)
        alpha = float(np.exp(log_alpha))
        sigma = float(np.sqrt(1.0 - np.exp(2 * log_alpha)))
        return alpha, sigma, log_alpha - float(np.log(sigma))

    def timesteps(self) -> np.ndarray:
        """Uniform in t from 1 down to 1/N: steps + 1 points."""
        return np.linspace(1.0, 1.0 / self.num_timesteps, self.steps + 1)

    @torch.no_grad()
    def sample(self, model: ModelFn, noise: torch.Tensor, progress: bool | StepCallback = False) -> torch.Tensor:
        """Solve from `noise` (B, C, T, H, W) at t = 1 to data. `model` returns epsilon first."""
        channels = noise.shape[1]
        times = self.timesteps()
        x = noise
        previous_x0: torch.Tensor | None = None
        previous_h = 0.0

        def data_prediction(x: torch.Tensor, t: float) -> torch.Tensor:
            alpha, sigma, _ = self.alpha_sigma_lambda(t)
            # The model takes the discrete timestep index this continuous t stands for.
            step = torch.full((x.shape[0],), (t - 1.0 / self.num_timesteps) * self.num_timesteps, device=x.device)
            eps = model(x, step, None)[:, :channels]
            return (x - sigma * eps) / alpha

        x0 = data_prediction(x, times[0])
        for i in sampling_steps(range(1, len(times)), progress):
            _alpha_prev, sigma_prev, lambda_prev = self.alpha_sigma_lambda(times[i - 1])
            alpha, sigma, lambda_ = self.alpha_sigma_lambda(times[i])
            h = lambda_ - lambda_prev
            if previous_x0 is None or (i == len(times) - 1 and self.steps < 10):
                # First order (DDIM) on the first step, and on the last one when there are few
                # steps: then its step in log-SNR is far longer than the one before and
                # extrapolating is unstable (DPM-Solver's "lower order final", below 10 steps).
                estimate = x0
            else:  # second order from the last two data predictions
                r = previous_h / h
                estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
            x = (sigma / sigma_prev) * x - alpha * float(np.expm1(-h)) * estimate
            previous_x0, previous_h = x0, h
            if i < len(times) - 1:
                x0 = data_prediction(x, times[i])
        return x
