"""The device decision (`pipelines.device`), every case, on CPU; and training's precision boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipelines.config import ConfigError
from pipelines.device import DevicePlan, decide_device
from tests.conftest import ROOT


def test_no_gpus_trains_on_cpu_in_fp32_and_says_so():
    plan = decide_device(None, 0, 2, "bf16")
    assert plan == DevicePlan(use_gpu=False, dtype="fp32", config_dtype="bf16")
    assert (plan.backend, plan.accelerator) == ("gloo", "cpu")
    assert plan.deepspeed_precision() == {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert plan.describe() == (
        "device: CPUs, gloo process group, DeepSpeed accelerator 'cpu', computing in fp32 (dtype 'bf16' needs CUDA)"
    )


def test_gpus_for_every_worker_and_no_flag_train_on_gpu_in_the_config_dtype():
    plan = decide_device(None, 2, 2, "bf16")
    assert plan == DevicePlan(use_gpu=True, dtype="bf16", config_dtype="bf16")
    assert (plan.backend, plan.accelerator) == ("nccl", "cuda")
    assert plan.deepspeed_precision() == {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
    assert plan.describe() == "device: CUDA GPUs, nccl process group, DeepSpeed accelerator 'cuda', computing in bf16"
    assert decide_device(None, 8, 2, "fp16").deepspeed_precision()["fp16"] == {"enabled": True}
    assert decide_device(True, 4, 4, "fp32") == DevicePlan(True, "fp32", "fp32")


def test_gpu_asked_on_a_cpu_only_cluster_is_an_error_not_a_wait():
    with pytest.raises(ConfigError, match=r"^--gpu: 2 worker\(s\) need 2 GPU\(s\), the cluster has 0; pass --no-gpu"):
        decide_device(True, 0, 2, "bf16")
    with pytest.raises(ConfigError, match=r"the cluster has 1; pass --no-gpu to train on CPUs or --num-workers 1$"):
        decide_device(True, 1, 2, "bf16")


def test_no_gpu_with_gpus_present_trains_on_cpu():
    assert decide_device(False, 8, 2, "bf16") == DevicePlan(use_gpu=False, dtype="fp32", config_dtype="bf16")


def test_fewer_gpus_than_workers_without_a_flag_is_an_error():
    with pytest.raises(ConfigError, match=r"the cluster has 1 GPU\(s\) for 2 worker\(s\): pass --num-workers 1"):
        decide_device(None, 1, 2, "bf16")


SELECT = """
import os, sys
from pipelines.device import DevicePlan, select_accelerator
if sys.argv[1] == "imported":
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
select_accelerator(DevicePlan(sys.argv[2] == "gpu", "fp32", "fp32"))
print(os.environ["DS_ACCELERATOR"])
"""


def select(state: str, device: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SELECT, state, device], capture_output=True, text=True, cwd=ROOT)


def test_the_accelerator_is_set_before_deepspeed_is_imported():
    assert select("fresh", "gpu").stdout.split()[-1] == "cuda"
    assert select("fresh", "cpu").stdout.split()[-1] == "cpu"
    assert select("imported", "cpu").returncode == 0


def test_deepspeed_imported_with_another_accelerator_is_refused():
    result = select("imported", "gpu")
    assert result.returncode != 0
    assert (
        "DeepSpeed was already imported with its 'cpu' accelerator in this process; the run needs 'cuda'"
        in result.stderr
    )


class RecordingEngine(torch.nn.Module):
    """What `train_step` needs of a DeepSpeed engine, around a module in bf16; records input dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.Conv3d(4, 8, 1).to(torch.bfloat16)  # learned sigma: 2C out
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def forward(self, x, t, y, y_mask, x_mask):
        self.seen.append((x.dtype, y.dtype))
        return self.module(x)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return None

    def was_step_applied(self):
        return True


def tiny_batch(x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A training batch of latents x (B, C, T, h, w) and captions, with square-frame size conditioning."""
    full = lambda value: torch.full((x.shape[0],), float(value))  # noqa: E731
    height = 8 * x.shape[-2]
    return {"x": x, "y": y, "y_mask": y_mask, "height": full(height), "width": full(height),
            "num_frames": full(x.shape[2]), "fps": full(24), "ar": full(1.0)}  # fmt: skip


def test_training_feeds_the_model_its_dtype_and_keeps_the_loss_in_fp32():
    from pipelines.trainer import StepKey, train_step
    from sora_model.diffusion import build_scheduler

    engine = RecordingEngine()
    batch = tiny_batch(torch.randn(2, 4, 3, 4, 4), torch.randn(2, 1, 5, 8), torch.ones(2, 5, dtype=torch.long))
    for kind in ("iddpm", "iddpm-speed", "rflow"):
        metrics = train_step(engine, build_scheduler(kind), batch, "STDiT-XL/2", StepKey(0, 0, 0))
        assert metrics["loss"].dtype == torch.float32 and torch.isfinite(metrics["loss"])
    assert engine.seen and set(engine.seen) == {(torch.bfloat16, torch.bfloat16)}
    assert engine.module.weight.grad is not None and engine.module.weight.grad.dtype == torch.bfloat16


def test_the_bound_model_feeds_a_half_precision_model_and_returns_fp32():
    """Training and the eval loss call the model through one `bound_model`: fp32 latents and captions are
    cast to the model's dtype (under DeepSpeed's bf16 the module is bf16), the output comes back fp32."""
    from pipelines.trainer import bound_model
    from sora_model.stdit import build_model

    model = build_model("debug", 8, 5).to(torch.bfloat16).eval()
    batch = tiny_batch(torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
    model_fn = bound_model(model, torch.bfloat16, batch, "debug")
    with torch.no_grad():
        out = model_fn(batch["x"], torch.tensor([10, 500]), None)
    assert out.dtype == torch.float32 and out.shape == (2, 8, 3, 8, 8)
