"""Where training runs: one decision, and everything that follows from it.

`decide_device` answers GPU or CPU from `--gpu/--no-gpu` and the GPUs the cluster has. Its
`DevicePlan` alone then gives the rest: whether Ray places the workers on GPUs, the
process-group backend (NCCL or gloo), DeepSpeed's accelerator (set in each worker before
DeepSpeed is first imported) and the dtype the model computes in (the config's on CUDA,
with DeepSpeed's bf16/fp16 mixed precision; fp32 on CPU, and the run says so).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipelines.config import ConfigError

ACCELERATOR_ENV = "DS_ACCELERATOR"  # DeepSpeed reads it when first imported


@dataclass(frozen=True)
class DevicePlan:
    use_gpu: bool
    dtype: str  # what the model computes in: "fp32", "bf16" or "fp16"
    config_dtype: str  # what the config asked for

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    @property
    def accelerator(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    def deepspeed_precision(self) -> dict[str, dict[str, bool]]:
        """DeepSpeed's mixed-precision sections: bf16 or fp16 on, or neither (fp32)."""
        return {"bf16": {"enabled": self.dtype == "bf16"}, "fp16": {"enabled": self.dtype == "fp16"}}

    def describe(self) -> str:
        where = "CUDA GPUs" if self.use_gpu else "CPUs"
        line = f"device: {where}, {self.backend} process group, DeepSpeed accelerator {self.accelerator!r}, "
        line += f"computing in {self.dtype}"
        if self.dtype != self.config_dtype:
            line += f" (dtype {self.config_dtype!r} needs CUDA)"
        return line


def decide_device(gpu: bool | None, gpus: float, num_workers: int, dtype: str) -> DevicePlan:
    """GPU or CPU for `num_workers` workers (one GPU each) on a cluster with `gpus` GPUs.

    `gpu` is `--gpu` (True), `--no-gpu` (False) or neither (None: GPUs when the cluster has
    one for every worker). Asking for GPUs the cluster does not have is an error, not a wait:
    Ray would otherwise hold the job until GPUs appear. So is leaving the choice open on a
    cluster with some GPUs but fewer than workers, rather than silently training on CPUs.
    """
    if gpu is False:
        return DevicePlan(False, "fp32", dtype)
    if gpus >= num_workers > 0:
        return DevicePlan(True, dtype, dtype)
    if gpu:
        raise ConfigError(
            f"--gpu: {num_workers} worker(s) need {num_workers} GPU(s), the cluster has {gpus:g}; "
            f"pass --no-gpu to train on CPUs" + (f" or --num-workers {int(gpus)}" if gpus >= 1 else "")
        )
    if gpus >= 1:
        raise ConfigError(
            f"the cluster has {gpus:g} GPU(s) for {num_workers} worker(s): pass --num-workers {int(gpus)} "
            "to train on GPUs, or --no-gpu to train on CPUs"
        )
    return DevicePlan(False, "fp32", dtype)


def local_device(dtype: str) -> DevicePlan:
    """The decision for one process on this machine, without Ray: its GPU if it has one."""
    import torch

    return decide_device(None, min(torch.cuda.device_count(), 1), 1, dtype)


def select_accelerator(plan: DevicePlan) -> None:
    """Point DeepSpeed at the plan's accelerator; call before DeepSpeed is imported in this process."""
    import sys

    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name != plan.accelerator:
            raise RuntimeError(
                f"DeepSpeed was already imported with its {name!r} accelerator in this process; "
                f"the run needs {plan.accelerator!r}"
            )
        return
    os.environ[ACCELERATOR_ENV] = plan.accelerator
