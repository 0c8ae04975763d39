"""Gaussian diffusion as IDDPM defines it (Nichol & Dhariwal 2021), as DiT and Open-Sora use it.

The model predicts the noise (epsilon) and, with a learned variance, an interpolation
value v per channel between the two bounds of the reverse variance ("learned range").
Training minimises the noise MSE plus the variational bound term that teaches v; the VB
term sees a detached mean so it trains the variance only.

Frame masks (Open-Sora 1.1) mark which latent frames are generated (True) and which are
conditions (False). In training, as Open-Sora 1.1, condition frames are given noised to
step 0 (q_sample(x0, 0, noise): sqrt(abar_0) x0 + sqrt(1 - abar_0) noise, about 1% noise) and
carry no loss. In sampling, a per-frame *edit ratio* e in [0, 1] keeps a frame frozen at its
reference for the first (1 - e) of the steps and denoises it from there (0 = always frozen,
1 = generated); the references are written into the starting latent, so the first model call
already sees them in the frames it is told are conditions.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from sora_model.diffusion.progress import StepCallback, sampling_steps

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""model(x_t (B, C, T, H, W), timesteps (B,), x_mask (B, T) or None) -> (B, 2C, T, H, W) or (B, C, ...)."""


class VarianceType(enum.Enum):
    LEARNED_RANGE = "learned_range"  # the model outputs 2C channels: epsilon, then v
    FIXED_SMALL = "fixed_small"  # the posterior variance (beta tilde)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule, stretched so any step count spans the same noise range."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, respacing: str | int | Sequence[int]) -> list[int]:
    """The timesteps kept when sampling with fewer steps (improved-diffusion's rule).

    `respacing` is a step count ("100" or 100), a comma list of counts per equal section
    ("10,15,20"), or "" / None for all steps.
    """
    if respacing in ("", None):
        return list(range(num_timesteps))
    if isinstance(respacing, int):
        counts = [respacing]
    elif isinstance(respacing, str):
        if respacing.startswith("ddim"):
            raise ValueError("ddim respacing is not supported; give a step count such as '100'")
        counts = [int(part) for part in respacing.split(",")]
    else:
        counts = list(respacing)
    size, extra = divmod(num_timesteps, len(counts))
    kept, start = set(), 0
    for index, count in enumerate(counts):
        section = size + (1 if index < extra else 0)
        if count > section or count < 1:
            raise ValueError(f"cannot take {count} steps out of a section of {section}")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):  # accumulated, then rounded: the exact steps improved-diffusion keeps
            kept.add(start + round(position))
            position += stride
        start += section
    return sorted(kept)


def _gather(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast over `like` (B, ...)."""
    out = torch.from_numpy(values).to(device=t.device)[t].float()
    return out.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins, elementwise (the t = 0 term)."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def mean_flat(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all but the batch dimension; with a (B, T) frame mask, over the masked frames only."""
    if mask is None:
        return values.mean(dim=list(range(1, values.dim())))
    per_frame = values.transpose(1, 2).flatten(2).mean(dim=2)  # (B, T)
    mask = mask.to(per_frame.dtype)
    return (per_frame * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class GaussianDiffusion:
    """A diffusion process over `betas`; `timestep_map[i]` is the original timestep of step i."""

    def __init__(
        self,
        betas: np.ndarray,
        variance: VarianceType = VarianceType.LEARNED_RANGE,
        timestep_map: Sequence[int] | None = None,
        rescale_vb: bool = False,
    ) -> None:
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)
        self.variance = variance
        self.timestep_map = list(timestep_map) if timestep_map is not None else list(range(self.num_timesteps))
        self.rescale_vb = rescale_vb  # IDDPM's RESCALED_MSE: vb x num_timesteps / 1000

        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the variance, clipped: the variance is 0 at t = 0, so t = 0 borrows t = 1's. A single
        # (respaced) step has no t = 1; it borrows beta, the other bound, and adds no noise anyway.
        first = self.posterior_variance[1] if len(self.betas) > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def spaced(
        cls,
        respacing: str | int | Sequence[int] | None = "",
        num_timesteps: int = 1000,
        variance: VarianceType = VarianceType.LEARNED_RANGE,
        rescale_vb: bool = False,
    ) -> GaussianDiffusion:
        """The linear-schedule process over `num_timesteps`, keeping the steps `respacing` asks for."""
        base = np.cumprod(1.0 - linear_betas(num_timesteps))
        kept = space_timesteps(num_timesteps, respacing)
        betas, last = [], 1.0
        for t in kept:  # new betas that reach the same alpha_cumprod at each kept step
            betas.append(1.0 - base[t] / last)
            last = base[t]
        return cls(np.array(betas), variance, kept, rescale_vb)

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0)."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _gather(self.posterior_mean_coef1, t, xt) * x0 + _gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, _gather(self.posterior_log_variance_clipped, t, xt)

    # ------------------------------------------------------------------ reverse process

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.timestep_map, device=t.device)[t]

    def p_mean_variance(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean, log-variance and predicted x_0 of p(x_{t-1} | x_t) from a model output."""
        channels = x.shape[1]
        if self.variance is VarianceType.LEARNED_RANGE:
            eps, v = output[:, :channels], output[:, channels:]
            min_log = _gather(self.posterior_log_variance_clipped, t, x)
            max_log = _gather(np.log(self.betas), t, x)
            frac = (v + 1) / 2  # the model's v is in [-1, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = output[:, :channels]
            log_variance = _gather(self.posterior_log_variance_clipped, t, x)
        pred_x0 = (
            _gather(self.sqrt_recip_alphas_cumprod, t, x) * x - _gather(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
        )
        mean, _ = self.q_posterior(pred_x0, x, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        weights: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,) for x0 (B, C, T, H, W) at steps t; `mask` (B, T): True = generated frame.

        `weights` (num_timesteps,) scales the epsilon MSE of each step, not the VB term (SpeeDiT).
        """
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        if mask is not None:  # condition frames at step 0, with the same noise (Open-Sora 1.1)
            xt = torch.where(mask[:, None, :, None, None], xt, self.q_sample(x0, torch.zeros_like(t), noise))
        output = model(xt, self._model_timesteps(t), mask)
        channels = x0.shape[1]
        terms = {"mse": mean_flat((noise - output[:, :channels]) ** 2, mask)}
        if weights is not None:
            terms["mse"] = terms["mse"] * torch.as_tensor(weights, device=t.device)[t].to(terms["mse"].dtype)
        if self.variance is VarianceType.LEARNED_RANGE:
            # The VB term trains the variance only: the mean comes from a detached epsilon.
            frozen = torch.cat([output[:, :channels].detach(), output[:, channels:]], dim=1)
            terms["vb"] = self._vb_term(frozen, x0, xt, t, mask)
            if self.rescale_vb:
                terms["vb"] = terms["vb"] * self.num_timesteps / 1000.0
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _vb_term(self, output, x0, xt, t, mask) -> torch.Tensor:
        """The variational bound term in bits per dimension (decoder NLL at t = 0)."""
        true_mean, true_log_variance = self.q_posterior(x0, xt, t)
        predicted = self.p_mean_variance(output, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, predicted["mean"], predicted["log_variance"]), mask)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, predicted["mean"], 0.5 * predicted["log_variance"]), mask
        )
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    @torch.no_grad()
    def sample(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        reference: torch.Tensor | None = None,
        edit: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool | StepCallback = False,
    ) -> torch.Tensor:
        """Ancestral sampling from `noise` (B, C, T, H, W).

        With `reference` latents and per-frame `edit` ratios (B, T) in [0, 1], frame f stays
        equal to its reference while the step index i >= edit * steps, starts from the
        reference noised to step i when it first turns active, and is denoised from there.
        Frames that are not generated from the first step start as their reference.
        """
        steps = self.num_timesteps
        frames = lambda m: m[:, None, :, None, None]  # noqa: E731  (B, T) -> broadcast over (B, C, T, H, W)
        # (B, T): the step a frame starts at. 0.53 is 0.52999997 in float32, and 53 steps of 100 must
        # not become 52: a tolerance far above float32's error (steps x 6e-8) and far below one step.
        start = None if edit is None else (edit.double() * steps + 1e-4).floor().long()
        x = noise if start is None else torch.where(frames(start >= steps), noise, reference)
        for i in sampling_steps(range(steps - 1, -1, -1), progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            active = None
            if start is not None:
                # Open-Sora 1.1's schedule: a frame is held at its reference until step `start`, gets
                # noised to that step's level there (still flagged as a condition for that one
                # call) and is denoised from then on.
                starting = start == i
                if starting.any():
                    restart_noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                    x = torch.where(frames(starting), self.q_sample(reference, t, restart_noise), x)
                active = start > i
            output = model(x, self._model_timesteps(t), active)
            out = self.p_mean_variance(output, x, t)
            step_noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            nonzero = (t != 0).float().reshape(-1, *([1] * (x.dim() - 1)))
            x = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * step_noise
            if start is not None:
                x = torch.where(frames(start < i), reference, x)
        if edit is not None:  # frozen conditions come out exactly as given (Open-Sora: within one step)
            x = torch.where(frames(edit <= 0), reference, x)
        return x
