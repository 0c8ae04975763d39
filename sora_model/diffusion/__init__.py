"""Diffusion for STDiT: IDDPM (training and ancestral sampling) and classifier-free guidance.

    gaussian.py     GaussianDiffusion: Open-Sora's linear schedule, learned-range variance,
                    the epsilon + VB training loss, respacing, frame masks, ancestral sampling
    dpm_solver.py   DPMSolver: DPM-Solver++(2M) sampling on the same schedule
    rflow.py        RFlow: Open-Sora 1.2's rectified flow (velocity loss, Euler sampling)
    guidance.py     classifier-free guidance on the first `cfg_channel` channels (all schedulers)
    __init__.py     IDDPM, IDDPMSpeed and DPMSolverSampler (the config's scheduler types),
                    guidance on `cfg_channel` channels, and `build_scheduler` picking one by name

Imports torch, numpy and tqdm (progress); dpm_solver.py takes the schedule and the model
signature from gaussian.py.
"""

from __future__ import annotations

import enum

import numpy as np
import torch

from sora_model.diffusion.dpm_solver import DPMSolver
from sora_model.diffusion.gaussian import GaussianDiffusion, ModelFn, VarianceType, space_timesteps
from sora_model.diffusion.guidance import classifier_free_guidance
from sora_model.diffusion.progress import StepCallback
from sora_model.diffusion.rflow import RFlow, timestep_transform

__all__ = [
    "IDDPM",
    "DPMSolver",
    "DPMSolverSampler",
    "GaussianDiffusion",
    "IDDPMSpeed",
    "ModelFn",
    "RFlow",
    "SchedulerKind",
    "VarianceType",
    "build_scheduler",
    "classifier_free_guidance",
    "space_timesteps",
    "timestep_transform",
]


class SchedulerKind(enum.Enum):
    """The `type=` of a config's scheduler section."""

    IDDPM = "iddpm"
    IDDPM_SPEED = "iddpm-speed"
    DPM_SOLVER = "dpm-solver"
    RFLOW = "rflow"


class IDDPM:
    """Open-Sora's `iddpm` scheduler: 1000 linear steps, learned variance, respaced sampling."""

    def __init__(
        self,
        num_sampling_steps: int = 100,
        timestep_respacing: str = "",
        cfg_scale: float = 7.0,
        cfg_channel: int | None = 3,
        num_timesteps: int = 1000,
    ) -> None:
        self.cfg_scale = cfg_scale
        self.cfg_channel = cfg_channel
        self.train_diffusion = GaussianDiffusion.spaced(timestep_respacing, num_timesteps)
        self.sample_diffusion = GaussianDiffusion.spaced(num_sampling_steps, num_timesteps)
        self.weights = None  # per-step weights of the epsilon MSE (iddpm-speed sets them)

    @property
    def num_timesteps(self) -> int:
        """Training timesteps (sample t uniformly below this)."""
        return self.train_diffusion.num_timesteps

    def sample_timesteps(self, batch: int, generator: torch.Generator, sizes=None) -> torch.Tensor:
        """Training steps (batch,), uniform over the (respaced) schedule; `sizes` is unused."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator)

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        return self.train_diffusion.training_losses(model, x0, t, noise, mask, weights=self.weights)

    def sample(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        reference: torch.Tensor | None = None,
        edit: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool | StepCallback = False,
        sizes=None,
    ) -> torch.Tensor:
        """Sample with guidance; `model` takes the doubled batch [conditional; unconditional]."""
        guided = classifier_free_guidance(model, self.cfg_scale, self.cfg_channel)
        return self.sample_diffusion.sample(guided, noise, reference, edit, generator, progress)


class IDDPMSpeed(IDDPM):
    """Open-Sora's `iddpm-speed` (SpeeDiT): IDDPM trained with steps drawn where they teach most.

    With s(t) = sqrt(1 - alpha_bar_t) and g = its gradient over t (central differences):
    - steps are drawn with probability proportional to tanh(1e6 (g(t) - 1e-4)) + 1.5: about 2.5
      below step 640, where the noise level still changes fast, and 0.5 above;
    - half the batch (n // 2 + 1 draws) is drawn, the other half is their mirror about
      `meaningful_steps`, the first step with g < 5e-5, plus one (700 on the linear schedule):
      m - t below m, t - m above;
    - the epsilon MSE of step t is weighted by 1 / (1 + SNR_t) = 1 - alpha_bar_t (P2 weighting with
      k = gamma = 1); the VB term is not.
    Open-Sora's SpeeDiffusion refuses to sample; this one samples as IDDPM (the same schedule), so
    the previews of an iddpm-speed run work.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        schedule = self.train_diffusion
        slope = np.gradient(schedule.sqrt_one_minus_alphas_cumprod)  # (steps,)
        self.meaningful_steps = int(np.argmax(slope < 5e-5)) + 1
        weight = np.tanh(1e6 * (slope - 1e-4)) + 1.5
        self.probabilities = torch.from_numpy(weight / weight.sum())  # (steps,) float64
        snr = 1.0 / (1.0 - schedule.alphas_cumprod) - 1.0
        self.weights = 1.0 / (1.0 + snr)  # (steps,)

    def sample_timesteps(self, batch: int, generator: torch.Generator, sizes=None) -> torch.Tensor:
        """Training steps (batch,): drawn by `probabilities`, then mirrored about `meaningful_steps`."""
        drawn = torch.multinomial(self.probabilities, batch // 2 + 1, replacement=True, generator=generator)
        mirrored = torch.where(
            drawn < self.meaningful_steps, self.meaningful_steps - drawn, drawn - self.meaningful_steps
        )
        return torch.cat([drawn, mirrored])[:batch]


class DPMSolverSampler:
    """Open-Sora's `dpm-solver` scheduler: few-step sampling with guidance (no training, no masks)."""

    def __init__(self, num_sampling_steps: int = 20, cfg_scale: float = 4.0) -> None:
        self.solver = DPMSolver(num_sampling_steps)
        self.cfg_scale = cfg_scale
        self.cfg_channel = None  # Open-Sora's DPM-Solver guides every noise channel

    def sample(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        reference: torch.Tensor | None = None,
        edit: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool | StepCallback = False,
        sizes=None,
    ) -> torch.Tensor:
        if edit is not None:
            raise ValueError("conditioning frames (mask_strategy, reference_path) need scheduler type 'iddpm'")
        guided = classifier_free_guidance(model, self.cfg_scale, self.cfg_channel)
        return self.solver.sample(guided, noise, progress)


def build_scheduler(
    kind: str | SchedulerKind,
    num_sampling_steps: int = 100,
    cfg_scale: float = 7.0,
    cfg_channel: int | None = 3,
    timestep_respacing: str = "",
    **rflow_options,
) -> IDDPM | DPMSolverSampler | RFlow:
    """The scheduler a config's `scheduler = dict(type=...)` names; `rflow_options` are RFlow's
    (sample_method, loc, scale, use_timestep_transform, transform_scale)."""
    kind = SchedulerKind(kind)
    if kind in (SchedulerKind.IDDPM, SchedulerKind.IDDPM_SPEED):
        iddpm = IDDPM if kind is SchedulerKind.IDDPM else IDDPMSpeed
        return iddpm(num_sampling_steps, timestep_respacing, cfg_scale, cfg_channel)
    if kind is SchedulerKind.RFLOW:  # Open-Sora 1.2 guides every channel: cfg_channel is an IDDPM setting
        return RFlow(num_sampling_steps, cfg_scale, **rflow_options)
    return DPMSolverSampler(num_sampling_steps, cfg_scale)  # cfg_channel is an IDDPM setting
