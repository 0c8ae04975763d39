"""The training worker without Ray: state, activation checkpointing, and one process on one device."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipelines.checkpoint import TrainState
from tests.conftest import ROOT

# Runs in a fresh interpreter: DeepSpeed and a process group stay out of the test process.
ONE_PROCESS = """
import json, sys
from pathlib import Path
from pipelines.cache import Cache
from pipelines.config import load_config
from pipelines.train import make_plan
from pipelines.device import local_device
from pipelines.trainer import TrainJob, train_one_process

config_path, cache_dir, experiment, epochs, resume, extra = sys.argv[1:]
overrides = {"epochs": int(epochs), "log_every": 1, "ckpt_every": 4, "lr": 1e-3, "eval_fraction": 0.25, "eval_every": 2}
overrides |= json.loads(extra)
config = load_config(config_path, "train", overrides)
steps = make_plan(Cache(cache_dir), config, workers=1).steps_per_epoch
job = TrainJob(config, cache_dir, Path(experiment), local_device(config.dtype), Path(resume) if resume else None)
train_one_process(job)
print(json.dumps({"steps_per_epoch": steps, "ray_loaded": "ray" in sys.modules}))
"""


def run_one_process(config, cache, experiment, epochs: int, resume: str = "", **overrides) -> dict:
    args = [sys.executable, "-c", ONE_PROCESS, str(config), str(cache), str(experiment), str(epochs), resume,
            json.dumps(overrides)]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def losses(experiment, name: str = "losses.jsonl") -> dict[int, float]:
    lines = (experiment / name).read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def test_train_state_advances_through_epochs_and_round_trips():
    state = TrainState()
    for _ in range(5):
        state.advance(dp_size=2, epoch_batches=5)  # 2 full rounds of 2 per epoch; the 5th batch waits
    assert (state.epoch, state.batches, state.global_step) == (2, 2, 5)
    restored = TrainState()
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored == state
    assert state.state_dict() == {"epoch": 2, "batches": 2, "global_step": 5}
    # Steps left to the end of epoch 3: (5 - 2) // 2 = 1 in this epoch, then 2 in epoch 3.
    assert state.steps_left(dp_size=2, epoch_batches=5, epochs=4) == 3
    assert state.steps_left(dp_size=3, epoch_batches=5, epochs=4) == 1 + 1
    # A checkpoint from before global positions: `step` per worker, taken with the workers resuming it.
    old = TrainState()
    old.load_state_dict({"epoch": 1, "step": 3, "global_step": 9}, dp_size=2)
    assert (old.epoch, old.batches, old.global_step) == (1, 6, 9)


def test_a_resumed_epoch_deals_the_rest_of_the_same_global_order():
    from pipelines.train_data import plan_epoch

    rows = {"a": np.arange(20), "b": np.arange(7)}
    sizes = {"a": 2, "b": 3}  # 10 + 2 batches
    whole = plan_epoch(rows, sizes, seed=1, epoch=0, workers=1).batches[0]
    two = plan_epoch(rows, sizes, seed=1, epoch=0, workers=2)
    assert [two.batches[step % 2][step // 2] for step in range(12)] == list(whole)  # round-robin
    resumed = plan_epoch(rows, sizes, seed=1, epoch=0, workers=3, start=4)  # 2 steps of 2 workers done
    assert resumed.steps == 2 and resumed.total == 12
    dealt = [resumed.batches[rank][step] for step in range(2) for rank in range(3)]
    assert dealt == list(whole[4:10]) and resumed.index(2, 1) == 9  # whole[10:] waits: not a full round


def test_activation_checkpointing_keeps_keys_and_gradients():
    from pipelines.models import size_inputs
    from pipelines.trainer import apply_activation_checkpointing
    from sora_model.stdit import build_model

    model = build_model("debug", 16, 8)
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():  # the final layer starts at zero: most gradients would be zero too
        torch.nn.init.normal_(parameter, std=0.05, generator=generator)
    checkpointed = build_model("debug", 16, 8)
    checkpointed.load_state_dict(model.state_dict())
    apply_activation_checkpointing(checkpointed)
    assert list(checkpointed.state_dict()) == list(model.state_dict())  # Open-Sora's keys, no wrapper prefix
    assert all(type(block).__name__ == "CheckpointWrapper" for block in checkpointed.blocks)

    def grads(net):
        net.zero_grad()
        torch.manual_seed(1)
        x, y = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 16)
        sizes = size_inputs("debug", 2, torch.device("cpu"), height=64, width=64, num_frames=3, fps=8, ar=1.0)
        net(x, torch.tensor([10, 500]), y, torch.ones(2, 5, dtype=torch.bool), None, **sizes).square().mean().backward()
        return [None if p.grad is None else p.grad.clone() for p in net.parameters()]  # caption dropout: some unused

    reference = grads(model)
    assert sum(grad is not None and bool(grad.abs().sum() > 0) for grad in reference) > len(reference) // 2
    for a, b in zip(reference, grads(checkpointed), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_one_process_trains_without_ray_and_resumes_exactly(clean_cache, tmp_path):
    cache, config = clean_cache
    experiment = tmp_path / "one"
    first = run_one_process(config, cache, experiment, epochs=2)
    assert not first["ray_loaded"]
    total = 2 * first["steps_per_epoch"]
    trained = losses(experiment)
    assert sorted(trained) == list(range(1, total + 1))
    assert all(loss == loss and loss > 0 for loss in trained.values())  # finite, positive
    assert json.loads((experiment / "worker.json").read_text())["world_size"] == 1
    checkpoints = sorted(p.name for p in (experiment / "checkpoints").glob("step-*"))
    assert (
        checkpoints[-1] == f"step-{total:07d}" and (experiment / "checkpoints" / checkpoints[0] / "COMPLETE").is_file()
    )
    # From the step-4 checkpoint, in a fresh experiment: the same losses for the same steps.
    resumed = tmp_path / "resumed"
    run_one_process(config, cache, resumed, epochs=2, resume=str(experiment / "checkpoints" / "step-0000004"))
    again = losses(resumed)
    assert sorted(again) == list(range(5, total + 1))
    for step, loss in again.items():
        assert loss == pytest.approx(trained[step], rel=1e-5, abs=1e-6), step
    # The eval loss: every eval_every (2) steps on the held-out samples, the same inputs every time,
    # so the resumed run's figures equal the original's; and it moves as the weights train.
    evaluated = losses(experiment, "eval_losses.jsonl")
    assert sorted(evaluated) == list(range(2, total + 1, 2))
    assert all(0 < loss < 10 for loss in evaluated.values())
    assert len(set(evaluated.values())) == len(evaluated)
    resumed_eval = losses(resumed, "eval_losses.jsonl")
    assert sorted(resumed_eval) == list(range(6, total + 1, 2))
    for step, loss in resumed_eval.items():
        assert loss == pytest.approx(evaluated[step], rel=1e-5, abs=1e-6), step


def test_compile_blocks_flag_compiles_each_block_and_keeps_the_keys():
    from pipelines.config import ModelConfig
    from pipelines.models import load_model

    plain = load_model(ModelConfig(type="debug"), 16, 8)
    compiled = load_model(ModelConfig(type="debug", compile_blocks=True), 16, 8)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # Open-Sora's keys, no `_orig_mod.`
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert all(block._compiled_call_impl is None for block in plain.blocks)


def poison(cache, bucket_prefix: str) -> list[str]:
    """Set every latent of one shard of a bucket to NaN, as a broken encoder would have written them
    (the manifest's checksum updated to match); returns the sample ids poisoned."""
    import hashlib

    import pyarrow as pa

    from pipelines.cache import ID, LATENT_MEAN, table_bytes, table_from_bytes

    manifest = json.loads((cache / "manifest.json").read_text())
    shard = next(name for name in sorted(manifest["shards"]) if f"/{bucket_prefix}" in name)
    table = table_from_bytes((cache / shard).read_bytes())
    nan = [bytes(bytearray(len(value.as_py()))).replace(b"\0" * 4, b"\x00\x00\xc0\x7f") for value in
           table.column(LATENT_MEAN)]  # fmt: skip
    column = table.schema.field(LATENT_MEAN)
    table = table.set_column(table.schema.get_field_index(LATENT_MEAN), column, pa.array(nan, column.type))
    data = table_bytes(table)
    (cache / shard).write_bytes(data)
    manifest["shards"][shard].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return [str(value) for value in table.column(ID).to_pylist()]


def test_non_finite_values_stop_the_run_naming_step_bucket_and_samples(clean_cache, tmp_path):
    import shutil

    cache, config = clean_cache
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    buckets = sorted({name.split("/")[2] for name in json.loads((copy / "manifest.json").read_text())["shards"]})
    poisoned = [sample for bucket in buckets for sample in poison(copy, bucket)]  # some trained batch has one
    args = [sys.executable, "-c", ONE_PROCESS, str(config), str(copy), str(tmp_path / "exp"), "1", "", "{}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert "TrainingStopped: training stopped at step" in error and "non-finite loss or gradients" in error
    stopped = json.loads((tmp_path / "exp" / "stopped.json").read_text())
    (batch,) = stopped["batches"]
    assert f"bucket {batch['bucket']}: " in error and batch["sample_ids"][0] in error, error
    assert set(batch["sample_ids"]) & set(poisoned)
    step = stopped["step"]
    trained = losses(tmp_path / "exp") if (tmp_path / "exp" / "losses.jsonl").exists() else {}
    assert max(trained, default=0) < step and all(loss == loss for loss in trained.values())  # none logged after
    assert not (tmp_path / "exp" / "checkpoints" / f"step-{step:07d}").exists()  # nothing saved of the broken state
