"""Training checkpoints: their folder layout, and one save / load with an explicit state contract.

`sora train` writes `<outputs>/NNN-<model>/checkpoints/step-NNNNNNN/`:

    model.safetensors   the weights (fp32)
    ema.safetensors     the fp32 EMA weights: what to sample with
    deepspeed/          optimizer and engine state, one ZeRO shard per worker
    state.json          the `TrainState`: epoch, step (data position), global step
    config.py           the resolved config
    COMPLETE            written last, once every worker's files are in

A folder without COMPLETE is never resumed from nor sampled: the files are written into a
scratch folder, copied into the experiment by every rank, and COMPLETE comes after all of them.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE = "state.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
DEEPSPEED = "deepspeed"
DEEPSPEED_TAG = "state"
CONFIG = "config.py"
_EXPERIMENT = re.compile(r"(\d{3})-")


@dataclass
class TrainState:
    """Where training stands. `(epoch, step)` is the data position: the next batch to train on."""

    epoch: int = 0
    step: int = 0  # batches of this epoch already trained
    global_step: int = 0

    def advance(self, steps_per_epoch: int) -> None:
        """One optimizer step done; the epoch turns over after its last batch."""
        self.global_step += 1
        self.step += 1
        if self.step >= steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]


def new_experiment(outputs: Path, model_type: str) -> Path:
    """The next `NNN-<model>` folder name under `outputs` (not created)."""
    outputs.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in outputs.iterdir() if (m := _EXPERIMENT.match(p.name))]
    return outputs / f"{max(taken, default=-1) + 1:03d}-{model_type.replace('/', '-')}"


def checkpoint_dir(experiment: Path, global_step: int) -> Path:
    return experiment / CHECKPOINTS / f"step-{global_step:07d}"


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete `step-*` checkpoint of an experiment (or the folder itself if it is one)."""
    folder = Path(folder)
    if (folder / STATE).is_file():
        return folder
    found = sorted((folder / CHECKPOINTS).glob("step-*")) if (folder / CHECKPOINTS).is_dir() else []
    found = [path for path in found if (path / COMPLETE).is_file()]
    return found[-1] if found else None


def resolve_weights(path: str) -> str:
    """What `--ckpt-path` names: a file or checkpoint folder as is; an experiment folder or a
    `sora train --outputs` folder as its newest complete checkpoint (newest experiment first)."""
    folder = Path(path)
    if not folder.is_dir() or (folder / STATE).is_file():
        return path
    experiments = sorted(p for p in folder.iterdir() if p.is_dir() and _EXPERIMENT.match(p.name))
    for candidate in [folder, *reversed(experiments)]:
        checkpoint = latest_checkpoint(candidate)
        if checkpoint is not None:
            return str(checkpoint)
    return path  # a folder of weights (safetensors, pytorch_model.bin), or an error from the loader


def save_checkpoint(
    folder: Path,
    engine,
    ema: torch.nn.Module | None,
    state: TrainState,
    config_text: str,
    rank: int,
    on_saved: Callable[[int, Path], None] | None = None,
) -> None:
    """Every rank writes its ZeRO shards, rank 0 also the weights, EMA, state and config; then
    COMPLETE marks the folder usable. `on_saved(global_step, scratch)` sees this rank's files
    before they are removed (Ray Train keeps its own copy from there)."""
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch)
        engine.save_checkpoint(str(target / DEEPSPEED), tag=DEEPSPEED_TAG)
        if rank == 0:
            save_tensors(engine.module, target / MODEL)
            save_tensors(ema, target / EMA)
            (target / STATE).write_text(json.dumps(state.state_dict()))
            (target / CONFIG).write_text(config_text)
        # Every rank adds its own shards to the experiment's copy (shared storage on clusters).
        shutil.copytree(target, folder, dirs_exist_ok=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if rank == 0:
            (folder / COMPLETE).write_text("")
        if on_saved is not None:
            on_saved(state.global_step, target)


def load_checkpoint(folder: Path, engine, ema: torch.nn.Module | None) -> TrainState:
    """Restore the engine (weights, optimizer), the EMA and the training state from `folder`."""
    engine.load_checkpoint(str(folder / DEEPSPEED), tag=DEEPSPEED_TAG)
    if ema is not None:
        ema.load_state_dict(load_file(str(folder / EMA)))
    state = TrainState()
    state.load_state_dict(json.loads((folder / STATE).read_text()))
    return state


def save_tensors(module: torch.nn.Module, path: Path) -> None:
    """A module's state as float32 safetensors (what `sora sample --ckpt-path` loads)."""
    save_file({k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))
