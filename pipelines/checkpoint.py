"""Training checkpoints: their folder layout, and one save / load with an explicit state contract.

`sora train` writes `<outputs>/NNN-<model>/checkpoints/step-NNNNNNN/`:

    model.safetensors   the weights (fp32)
    ema.safetensors     the fp32 EMA weights: what to sample with
    deepspeed/          optimizer and engine state, one ZeRO shard per worker
    state.json          the `TrainState`: epoch, batches of its global order trained, global step
    config.py           the resolved config
    checksums.json      the SHA-256 of every file above, written once all of them are in
    COMPLETE            written last

A folder without COMPLETE is never resumed from nor sampled: the files are written into a
scratch folder, copied into the experiment by every rank, and COMPLETE comes after all of them.

Resuming trusts a folder only as far as it checks out: `verify_checkpoint` runs before any
worker starts and names the first file that is missing, changed since it was saved, or
holds anything but tensors, numbers and DeepSpeed's own state classes. DeepSpeed's `.pt` files
are pickles; they are read with PyTorch's restricted unpickler (`weights_only=True`, with
those classes allowed), never the one that runs whatever code a pickle names.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipelines.config import ConfigError

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE = "state.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
DEEPSPEED = "deepspeed"
DEEPSPEED_TAG = "state"
CONFIG = "config.py"
CHECKSUMS = "checksums.json"
_EXPERIMENT = re.compile(r"(\d{3})-")


@dataclass
class TrainState:
    """Where training stands. `(epoch, batches)` is the data position: the epoch, and how many
    batches of its global order are trained (by all data-parallel groups together), so a run
    can resume with any number of workers; `global_step` counts optimizer steps."""

    epoch: int = 0
    batches: int = 0  # global batches of this epoch already trained
    global_step: int = 0

    def advance(self, dp_size: int, epoch_batches: int) -> None:
        """One optimizer step done: `dp_size` batches more; the epoch turns over when no full
        round of `dp_size` batches is left of its `epoch_batches`."""
        self.global_step += 1
        self.batches += dp_size
        if epoch_batches - self.batches < dp_size:
            self.epoch, self.batches = self.epoch + 1, 0

    def steps_left(self, dp_size: int, epoch_batches: int, epochs: int) -> int:
        """Optimizer steps from here to the end of epoch `epochs - 1`."""
        if self.epoch >= epochs:
            return 0
        return (epoch_batches - self.batches) // dp_size + (epochs - self.epoch - 1) * (epoch_batches // dp_size)

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int], dp_size: int = 1) -> None:
        """`state` as `state_dict` wrote it; a checkpoint from before global positions holds `step`
        (per worker) instead, taken as `step * dp_size` batches (it resumed with its own worker count)."""
        batches = state["batches"] if "batches" in state else state["step"] * dp_size
        self.epoch, self.batches, self.global_step = state["epoch"], batches, state["global_step"]


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
            (folder / CHECKSUMS).write_text(json.dumps(checksums(folder), indent=1, sort_keys=True))
            (folder / COMPLETE).write_text("")
        if on_saved is not None:
            on_saved(state.global_step, target)


def load_checkpoint(folder: Path, engine, ema: torch.nn.Module | None, dp_size: int = 1) -> TrainState:
    """Restore the engine (weights, optimizer), the EMA and the training state from `folder`
    (checked first by `verify_checkpoint`); DeepSpeed's pickles go through the restricted unpickler."""
    engine.checkpoint_engine = RestrictedLoads(engine.checkpoint_engine)
    # ZeRO writes one optimizer shard per data-parallel worker: their count is the saved world.
    saved_world = len(list((folder / DEEPSPEED / DEEPSPEED_TAG).glob("*optim_states.pt"))) or engine.dp_world_size
    if saved_world == engine.dp_world_size:
        engine.load_checkpoint(str(folder / DEEPSPEED), tag=DEEPSPEED_TAG)
    else:
        # ZeRO splits the optimizer's state among the workers that saved it, and DeepSpeed cannot
        # split it again for another number: the weights carry over, Adam's moments start afresh.
        engine.load_checkpoint(str(folder / DEEPSPEED), tag=DEEPSPEED_TAG, load_module_only=True)
        if torch.distributed.get_rank() == 0:
            note = (f"note: {folder} was written by {saved_world} data-parallel worker(s), this run has "
                    f"{engine.dp_world_size}: the weights, EMA and data position carry over; the optimizer's "
                    "moments start afresh (DeepSpeed ZeRO cannot re-partition them)")  # fmt: skip
            print(note, file=sys.stderr, flush=True)
    if ema is not None:
        ema.load_state_dict(load_file(str(folder / EMA)))
    state = TrainState()
    state.load_state_dict(json.loads((folder / STATE).read_text()), dp_size)
    return state


def save_tensors(module: torch.nn.Module, path: Path) -> None:
    """A module's state as float32 safetensors (what `sora sample --ckpt-path` loads)."""
    save_file({k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


# --------------------------------------------------------------------------- trusting a checkpoint


class CheckpointError(ConfigError):
    """A checkpoint folder that cannot be resumed from: the message names the file."""


def checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (but the checksums and COMPLETE), by relative path."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in (CHECKSUMS, COMPLETE):
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(2**20), b""):
                    digest.update(block)
            found[name] = digest.hexdigest()
    return found


def _state_classes() -> list[type]:
    """The classes DeepSpeed's ZeRO checkpoints hold besides tensors, numbers and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_pickle(path: str | Path, map_location=None):
    """A DeepSpeed `.pt` file through PyTorch's restricted unpickler: tensors, numbers,
    containers and `_state_classes` only; anything else is refused, naming the file."""
    try:
        with torch.serialization.safe_globals(_state_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        what = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{path}: refused: it holds more than tensors and DeepSpeed's training state ({what}); "
            "sora train never writes that, so it was not written by sora train"
        ) from None
    except (RuntimeError, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: unreadable ({type(error).__name__}: {error})") from None


class RestrictedLoads:
    """DeepSpeed's checkpoint engine with `load` through `load_pickle`; the rest is DeepSpeed's."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def load(self, path: str, map_location=None):
        return load_pickle(path, map_location)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def verify_checkpoint(folder: Path) -> TrainState:
    """Check a checkpoint folder before anything is loaded from it; returns its `TrainState`.

    Raises CheckpointError naming the first file that is missing, differs from its checksum,
    or is not what `sora train` writes (a pickle that holds more than tensors and state). A
    folder from before checksums were kept is checked for what its files hold only."""
    if not (folder / COMPLETE).is_file():
        raise CheckpointError(f"{folder}: no {COMPLETE} file: the checkpoint was not finished; use an earlier one")
    found = checksums(folder)
    listed = folder / CHECKSUMS
    if listed.is_file():
        try:
            expected = json.loads(listed.read_text())
            if not isinstance(expected, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{listed}: not valid JSON ({error})") from None
        for name, digest in sorted(expected.items()):
            if name not in found:
                raise CheckpointError(f"{folder / name}: missing (the checkpoint listed it when it was saved)")
            if found[name] != digest:
                raise CheckpointError(f"{folder / name}: changed since it was saved (its SHA-256 differs)")
        for name in sorted(set(found) - set(expected)):
            if name.startswith(f"{DEEPSPEED}/"):
                raise CheckpointError(f"{folder / name}: not part of the checkpoint as saved; remove it")
    else:
        print(f"note: {folder} has no {CHECKSUMS} (written before sora kept checksums): its files are checked "
              "for what they hold, not for corruption", file=sys.stderr)  # fmt: skip
    for name in (STATE, EMA, MODEL, f"{DEEPSPEED}/{DEEPSPEED_TAG}/mp_rank_00_model_states.pt"):
        if name not in found:
            raise CheckpointError(f"{folder / name}: missing; a checkpoint of sora train has it")
    for name in sorted(found):
        if name.startswith(f"{DEEPSPEED}/") and name.endswith((".pt", ".pth", ".pkl", ".bin")):
            load_pickle(folder / name, map_location="cpu")
    for name in (EMA, MODEL):
        try:
            with safe_open(str(folder / name), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{folder / name}: not a readable safetensors file ({error})") from None
    state = TrainState()
    try:
        values = json.loads((folder / STATE).read_text())
        state.load_state_dict(values)
        if not all(type(value) is int and value >= 0 for value in state.state_dict().values()):
            raise ValueError(f"epoch, batches and global_step must be whole numbers >= 0, got {values}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{folder / STATE}: not a training state ({type(error).__name__}: {error})") from None
    return state
