"""`sora search-batch-size`: per bucket, the largest batch whose training step fits the device.

Open-Sora 1.1's scripts/misc/search_bs.py, made to answer for the machine that asks. Every
trial is real training steps of the config's model, with its EMA copy, DeepSpeed ZeRO-2 engine
(AdamW), diffusion and activation checkpointing, at the bucket's largest size (the aspect with
the most pixels, captions at `model_max_length`), run in a fresh process: one trial's memory
never leaks into the next, and running out of memory ends only that trial. The peak is the
process's CUDA memory reserved on a GPU and its peak resident memory on CPU (where a watchdog
ends the trial as soon as it passes the budget, before it can starve the machine).

Each bucket's candidates are its search range `(keep_prob, (min, max[, step]))`, or 1 to
`max_batch` for a bucket with a plain batch size; a binary search finds the largest that fits
(memory grows with the batch). With `equalize`, the other buckets then take the batch whose
step time comes closest to the base bucket's (Open-Sora's search does this), estimated from
each bucket's time per sample and checked by one more trial. The answer is a bucket_config to
paste, keep_probs unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import ConfigError, TrainConfig, format_config, load_config

TRIAL_TIMEOUT_S = 1800
OVER_BUDGET_EXIT = 3  # a CPU trial's exit status when its watchdog saw it pass the budget
WATCH_INTERVAL_S = 0.01
# Caption widths of text encoders named by hub id (their config.json says d_model).
KNOWN_CAPTION_CHANNELS = {"DeepFloyd/t5-v1_1-xxl": 4096, "google/t5-v1_1-xxl": 4096}
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_memory(text: str) -> int:
    """Bytes of '24GiB', '24G', '512MiB', '1.5TiB' or a plain number of bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if match is None or float(match[1]) <= 0:
        raise ConfigError(f"--max-memory: {text!r} is not a memory size such as 24GiB, 512MiB or 1.5TiB")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class BucketShape:
    """A (resolution, num_frames) entry of the bucket_config and the size its trials run at."""

    resolution: str
    num_frames: int
    keep_prob: float
    height: int
    width: int
    candidates: tuple[int, ...]  # batch sizes to choose from, ascending

    @property
    def label(self) -> str:
        return f"{self.resolution} T={self.num_frames}"

    @property
    def tokens(self) -> int:
        return self.num_frames * self.height * self.width


@dataclass(frozen=True)
class Trial:
    batch: int
    fits: bool
    peak_bytes: int | None  # None when the trial died before it could say
    step_seconds: float | None
    note: str = ""  # why it does not fit


@dataclass
class BucketResult:
    shape: BucketShape
    trials: list[Trial]
    largest: Trial | None  # the largest batch that fits
    chosen: Trial | None  # the answer: `largest`, or the step-time match under `equalize`


def bucket_shapes(config: TrainConfig, max_batch: int) -> list[BucketShape]:
    """The buckets to search, with their largest size: every entry with keep_prob > 0."""
    shapes = []
    for entry in config.buckets:
        height, width = max(entry.resolution.table.values(), key=lambda size: size[0] * size[1])
        for bucket in entry.frames:
            if bucket.keep_prob <= 0:
                continue
            # A search range (may be empty: Open-Sora's max is excluded), or 1 .. max_batch.
            candidates = bucket.search.candidates if bucket.search else tuple(range(1, max_batch + 1))
            shapes.append(
                BucketShape(entry.resolution.name, bucket.num_frames, bucket.keep_prob, height, width, candidates)
            )
    return shapes


def largest_fitting(candidates: tuple[int, ...], run: Callable[[int], Trial]) -> tuple[Trial | None, list[Trial]]:
    """Binary search for the largest candidate whose trial fits (fitting is monotone in the batch)."""
    trials: list[Trial] = []
    best = None
    low, high = 0, len(candidates) - 1
    while low <= high:
        middle = (low + high) // 2
        trial = run(candidates[middle])
        trials.append(trial)
        if trial.fits:
            best, low = trial, middle + 1
        else:
            high = middle - 1
    return best, trials


def matching_batch(candidates: tuple[int, ...], largest: Trial, target_seconds: float) -> int:
    """The candidate, up to `largest.batch`, whose step time should come closest to the target,
    from the time per sample at `largest` (step time is close to linear in the batch)."""
    per_sample = largest.step_seconds / largest.batch
    allowed = [batch for batch in candidates if batch <= largest.batch]
    return min(allowed, key=lambda batch: (abs(batch * per_sample - target_seconds), -batch))


def search(
    config: TrainConfig,
    run: Callable[[BucketShape, int], Trial],
    max_batch: int = 256,
    equalize: bool = False,
    base: str | None = None,
    report: Callable[[str], None] = print,
) -> list[BucketResult]:
    """Search every bucket with `run(shape, batch)`; with `equalize`, match the base bucket's step time."""
    shapes = bucket_shapes(config, max_batch)
    if not shapes:
        raise ConfigError("the bucket_config has no bucket with keep_prob > 0 to search")
    base_shape = _base(shapes, base) if equalize else None

    def traced(shape: BucketShape) -> Callable[[int], Trial]:
        def one(batch: int) -> Trial:
            trial = run(shape, batch)
            memory = "?" if trial.peak_bytes is None else format_bytes(trial.peak_bytes)
            timing = "" if trial.step_seconds is None else f", {trial.step_seconds:.3f} s/step"
            verdict = "fits" if trial.fits else f"does not fit ({trial.note})"
            report(f"{shape.label} batch {batch}: {verdict}, peak {memory}{timing}")
            return trial

        return one

    results = []
    for shape in sorted(shapes, key=lambda s: s is not base_shape):  # the base bucket first
        largest, trials = largest_fitting(shape.candidates, traced(shape))
        results.append(BucketResult(shape, trials, largest, largest))
        if shape is base_shape and largest is None:  # before any other bucket's trials
            raise ConfigError(f"--base {base_shape.label}: {_none_fits(base_shape)}; pick another --base")
    if base_shape is not None:
        target = results[0].largest
        for result in results[1:]:
            if result.largest is None:
                continue
            batch = matching_batch(result.shape.candidates, result.largest, target.step_seconds)
            if batch != result.largest.batch:
                trial = traced(result.shape)(batch)
                result.trials.append(trial)
                result.chosen = trial if trial.fits else result.largest
    return results


def _none_fits(shape: BucketShape) -> str:
    if not shape.candidates:
        return "its search range is empty (Open-Sora's max is excluded)"
    return f"not even batch {shape.candidates[0]} fits"


def _base(shapes: list[BucketShape], base: str | None) -> BucketShape:
    """The bucket whose step time the others match: `RES:T`, or the one with the most tokens."""
    if base is None:
        return max(shapes, key=lambda shape: shape.tokens)
    resolution, _, frames = base.partition(":")
    found = [s for s in shapes if s.resolution == resolution and str(s.num_frames) == frames]
    if not found:
        names = ", ".join(f"{s.resolution}:{s.num_frames}" for s in shapes)
        raise ConfigError(f"--base {base}: no such bucket with keep_prob > 0; the buckets are {names}")
    return found[0]


def format_results(config: TrainConfig, results: list[BucketResult], budget: int) -> str:
    """The table of answers and a bucket_config to paste (keep_probs as in the config)."""
    lines = [
        f"largest batch per bucket under {format_bytes(budget)}",
        "",
        f"{'bucket':<14} {'size HxW':>10} {'batch':>6} {'peak':>11} {'s/step':>8} {'samples/s':>10} {'trials':>7}",
    ]
    chosen: dict[tuple[str, int], Trial | None] = {}
    for result in results:
        shape, trial = result.shape, result.chosen
        chosen[(shape.resolution, shape.num_frames)] = trial
        size = f"{shape.height}x{shape.width}"
        if trial is None:
            lines.append(f"{shape.label:<14} {size:>10} {'none':>6}   {_none_fits(shape)}")
            continue
        lines.append(
            f"{shape.label:<14} {size:>10} {trial.batch:>6} {format_bytes(trial.peak_bytes or 0):>11} "
            f"{trial.step_seconds:>8.3f} {trial.batch / trial.step_seconds:>10.2f} {len(result.trials):>7}"
        )
    if config.bucket_config is None:  # the fixed-size form: one bucket, one batch_size
        (trial,) = chosen.values()
        lines += ["", f"batch_size = {trial.batch}" if trial else "# no batch size fits: see the table"]
        return "\n".join(lines) + "\n"
    lines += ["", "bucket_config = {"]
    for resolution, frames in config.bucket_config.items():  # the file's order
        items = []
        for num_frames, (keep_prob, batch_size) in frames.items():
            if (resolution, num_frames) not in chosen:  # not searched (keep_prob 0)
                kept = batch_size if isinstance(batch_size, int) else None  # a range needs no answer here
                items.append(f"{num_frames}: ({keep_prob!r}, {kept!r})")
            elif (trial := chosen[(resolution, num_frames)]) is None:
                items.append(f"{num_frames}: (0.0, None)")  # does not fit: excluded, see the table
            else:
                items.append(f"{num_frames}: ({keep_prob!r}, {trial.batch})")
        lines.append(f'    "{resolution}": {{{", ".join(items)}}},')
    lines.append("}")
    if any(trial is None for trial in chosen.values()):
        lines.append("# (0.0, None): buckets where no batch of the range fits are excluded")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- trials in a fresh process


def caption_channels(config: TrainConfig, given: int | None) -> int:
    """The text encoder's width: `given`, its local folder's config.json, or a known hub model's."""
    if given is not None:
        return given
    name = config.text_encoder.from_pretrained
    local = Path(name) / "config.json"
    if local.is_file():
        return int(json.loads(local.read_text())["d_model"])
    if name in KNOWN_CAPTION_CHANNELS:
        return KNOWN_CAPTION_CHANNELS[name]
    raise ConfigError(f"text_encoder.from_pretrained={name!r}: its width is unknown here; give --text-dim")


class SubprocessTrials:
    """`run(shape, batch)` for `search`: each trial in a fresh `python -m pipelines.batch_search`."""

    def __init__(self, config: TrainConfig, use_gpu: bool, budget: int, text_dim: int, steps: int = 2) -> None:
        self.use_gpu, self.budget, self.text_dim, self.steps = use_gpu, budget, text_dim, steps
        self._folder = tempfile.TemporaryDirectory(prefix="sora-batch-search-")
        self.config_path = Path(self._folder.name) / "config.py"
        self.config_path.write_text(format_config(config))

    def __call__(self, shape: BucketShape, batch: int) -> Trial:
        request = {
            "config": str(self.config_path),
            "shape": dataclasses.asdict(shape),
            "batch": batch,
            "steps": self.steps,
            "use_gpu": self.use_gpu,
            "budget": self.budget,
            "text_dim": self.text_dim,
        }
        command = [sys.executable, "-m", "pipelines.batch_search", json.dumps(request)]
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TRIAL_TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            return Trial(batch, False, None, None, f"no answer in {TRIAL_TIMEOUT_S} s")
        if done.returncode == OVER_BUDGET_EXIT:
            return Trial(batch, False, None, None, "passed the memory budget")
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            last = (done.stderr.strip().splitlines() or ["killed"])[-1]
            return Trial(batch, False, None, None, f"exit {done.returncode}: {last[:200]}")
        try:
            answer = json.loads(lines[-1])
        except json.JSONDecodeError:
            return Trial(batch, False, None, None, f"no answer from the trial: {lines[-1][:200]}")
        peak = answer["peak_bytes"]
        if answer.get("out_of_memory"):
            return Trial(batch, False, peak, None, "out of memory")
        if peak > self.budget:
            return Trial(batch, False, peak, answer["step_seconds"], "peak over the budget")
        return Trial(batch, True, peak, answer["step_seconds"])

    def close(self) -> None:
        self._folder.cleanup()


@dataclass(frozen=True)
class _Request:
    config: str
    shape: dict
    batch: int
    steps: int
    use_gpu: bool
    budget: int
    text_dim: int


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _watch_memory(budget: int) -> None:
    """End this process (status OVER_BUDGET_EXIT) once its resident memory passes `budget`."""

    def watch() -> None:
        while True:
            if _rss_bytes() > budget:
                os._exit(OVER_BUDGET_EXIT)
            time.sleep(WATCH_INTERVAL_S)

    threading.Thread(target=watch, daemon=True, name="memory-watchdog").start()


def _synthetic_batch(shape: BucketShape, batch: int, caption: tuple[int, int], device) -> dict:
    """A training batch of the bucket's size: SD VAE latents (4 channels, stride 8), full captions."""
    import torch

    length, channels = caption
    full = lambda value: torch.full((batch,), float(value), device=device)  # noqa: E731
    return {
        "x": torch.randn(batch, 4, shape.num_frames, shape.height // 8, shape.width // 8, device=device),
        "y": torch.randn(batch, length, channels, device=device),
        "y_mask": torch.ones(batch, length, dtype=torch.bool, device=device),
        "height": full(shape.height),
        "width": full(shape.width),
        "num_frames": full(shape.num_frames),
        "fps": full(24),
        "ar": full(shape.width / shape.height),
    }


def run_trial(request: _Request) -> dict:
    """One trial in this process: `steps` timed training steps after one warm-up step."""
    import resource

    import torch

    from pipelines.device import DevicePlan
    from pipelines.trainer import StepKey, build_training, single_process_group, train_step, update_ema

    config = load_config(request.config, "train")
    shape = BucketShape(**{**request.shape, "candidates": tuple(request.shape["candidates"])})
    plan = DevicePlan(request.use_gpu, config.dtype if request.use_gpu else "fp32", config.dtype)
    if not request.use_gpu:
        _watch_memory(request.budget)
    times = []
    with single_process_group(plan.backend):
        engine, ema, diffusion = build_training(config, request.text_dim, plan)
        caption = (config.text_encoder.model_max_length, request.text_dim)
        batch = _synthetic_batch(shape, request.batch, caption, engine.device)
        try:
            for step in range(1 + request.steps):  # the first step warms up (allocations, kernels)
                started = time.perf_counter()
                train_step(engine, diffusion, batch, config.model.type, StepKey(config.seed, 0, step))
                update_ema(ema, engine.module, config.ema_decay)
                if plan.use_gpu:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
        except torch.cuda.OutOfMemoryError:
            return {"out_of_memory": True, "peak_bytes": torch.cuda.max_memory_reserved()}
    if plan.use_gpu:
        peak = torch.cuda.max_memory_reserved()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    timed = sorted(times[1:])
    return {"peak_bytes": peak, "step_seconds": timed[len(timed) // 2]}


def search_batch_size(
    config: TrainConfig,
    max_memory: str | None,
    gpu: bool | None,
    equalize: bool,
    base: str | None,
    max_batch: int,
    steps: int,
    text_dim: int | None,
) -> str:
    """`sora search-batch-size`: the table and the bucket_config to paste."""
    import torch

    from pipelines.device import local_device

    plan = local_device(config.dtype) if gpu is None else None
    use_gpu = plan.use_gpu if plan is not None else gpu
    if use_gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu: this machine has no CUDA GPU; search on CPU with --no-gpu and --max-memory")
    if max_memory is not None:
        budget = parse_memory(max_memory)
    elif use_gpu:
        budget = torch.cuda.get_device_properties(0).total_memory
    else:
        raise ConfigError("on CPU give --max-memory (e.g. --max-memory 16GiB): the budget a training process may use")
    if max_batch < 1 or steps < 1:
        raise ConfigError("--max-batch and --steps must be at least 1")
    if config.sp_size > 1:
        raise ConfigError(
            f"sp_size={config.sp_size}: the search measures one worker holding whole samples; search with "
            "sp_size = 1 (a sequence-parallel group of k workers holds about 1/k of each sample's activations)"
        )
    config.buckets  # noqa: B018  (parsed: a bad bucket_config fails here, before any trial)
    trials = SubprocessTrials(config, use_gpu, budget, caption_channels(config, text_dim), steps)
    where = torch.cuda.get_device_name(0) if use_gpu else "CPU"
    print(f"searching on {where}, budget {format_bytes(budget)}, one fresh process per trial", flush=True)
    try:
        results = search(config, trials, max_batch, equalize, base, report=lambda line: print(line, flush=True))
    finally:
        trials.close()
    return format_results(config, results, budget)


def _main(request: str) -> None:
    print(json.dumps(run_trial(_Request(**json.loads(request)))), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1])
