"""The training worker, without Ray: engine, step, EMA, logging, checkpoints, and the loop.

`train_worker(job, rank, world, hooks)` is what every worker runs. Ray Train supplies the
rank, the world size, reporting and restarts through `hooks` (see `pipelines/train.py`);
`train_one_process(job)` drives the very same code in this process on one device (world
size 1), for benchmarks and checks that need no cluster.

Everything random in a step (the batch, its temporal windows, posterior and timestep
draws, masks, caption dropout) is seeded by (seed, epoch, step, DP rank), so a run resumed
from a checkpoint continues with exactly the batches and losses an uninterrupted run
would have had. With sequence parallelism (`pipelines/sequence_parallel.py`) the ranks of
an SP group share a DP rank: they train the same batch, each on its share of the tokens.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from pipelines import sequence_parallel
from pipelines.cache import ID, Cache
from pipelines.checkpoint import (
    EMA,
    TrainState,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_tensors,
)
from pipelines.config import ConfigError, TrainConfig, format_config
from pipelines.device import DevicePlan, select_accelerator
from pipelines.models import SIZE_INPUTS, load_model, size_inputs
from pipelines.preview import WEIGHTS, Previewer, PreviewTask, is_preview_step, preview_dir, preview_size
from pipelines.train_data import CacheBatches, Prefetcher, plan_epoch, seed_of


@dataclass(frozen=True)
class TrainJob:
    """What every worker is given: the config and where things are."""

    config: TrainConfig
    cache_dir: str  # absolute path or URI
    experiment: Path
    device: DevicePlan  # GPU or CPU, backend, accelerator, dtype: `pipelines.device`
    resume: Path | None = None  # `--load`: the checkpoint to start from


class WorkerHooks(Protocol):
    """What the job runner adds to a worker: a checkpoint to resume from, and reporting."""

    def resumed(self) -> contextlib.AbstractContextManager[Path | None]:
        """The runner's own checkpoint to continue from (after a restart), if any."""
        ...

    def saved(self, global_step: int, scratch: Path) -> None:
        """The checkpoint of `global_step` was written; `scratch` holds this rank's files until
        the call returns."""
        ...

    def preview(self, task: PreviewTask) -> None:
        """Render one step's previews (rank 0), away from the training step where the runner can."""
        ...

    def finish(self) -> None:
        """Training is over: wait for what `preview` started."""
        ...

    def node(self) -> str:
        """Where this worker runs: the runner's node id."""
        ...


class LocalHooks:
    """One process, no runner: nothing to resume from but the experiment, nothing to report;
    previews are rendered in place (the step waits for them)."""

    def __init__(self) -> None:
        self.previewer = Previewer()

    def resumed(self) -> contextlib.AbstractContextManager[Path | None]:
        return contextlib.nullcontext(None)

    def saved(self, global_step: int, scratch: Path) -> None:
        pass

    def preview(self, task: PreviewTask) -> None:
        self.previewer.render(task)

    def finish(self) -> None:
        pass

    def node(self) -> str:
        return "local"


# --------------------------------------------------------------------------- pieces of a worker


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block in the backward pass instead of keeping its activations.

    The wrapper keeps state_dict keys unchanged, so checkpoints stay Open-Sora's.
    """
    for index, block in enumerate(model.blocks):
        model.blocks[index] = checkpoint_wrapper(block)


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy that follows the weights slowly; what sampling uses."""
    return copy.deepcopy(model).float().eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.mul_(decay).add_(param.detach().float(), alpha=1 - decay)


def training_diffusion(config: TrainConfig):
    """The scheduler `config.scheduler` names, as training uses it (IDDPM over all its steps, or rflow)."""
    from sora_model.diffusion import build_scheduler

    scheduler = config.scheduler
    return build_scheduler(scheduler.type, timestep_respacing=scheduler.timestep_respacing, **scheduler.rflow_options)


def build_engine(model: torch.nn.Module, config: TrainConfig, device: DevicePlan):
    """A DeepSpeed ZeRO-2 engine around `model` with AdamW, on the plan's accelerator and in its
    precision (DeepSpeed's bf16/fp16 mixed precision on CUDA); the process group must exist."""
    select_accelerator(device)
    import deepspeed

    ds_config = {
        "train_micro_batch_size_per_gpu": 1,  # informational: batch sizes vary by bucket
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        **device.deepspeed_precision(),
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine


def build_training(
    config: TrainConfig, caption_channels: int, device: DevicePlan, with_ema: bool = True, sp_group=None
):
    """(engine, ema or None, diffusion): the config's model with activation checkpointing as
    configured and, given this rank's SP group, sequence parallelism, in its DeepSpeed engine;
    its EMA copy (made from the exact fp32 weights, then moved where the weights went), and the
    training diffusion; the process group must exist."""
    model = load_model(config.model, caption_channels, config.text_encoder.model_max_length,
                       fixed_latent_size(config))  # fmt: skip
    ema = make_ema(model) if with_ema else None
    if config.grad_checkpoint:
        apply_activation_checkpointing(model)
    if sp_group is not None:
        sequence_parallel.install(model, sp_group, config.sp_size, config.sp_split)
    engine = build_engine(model, config, device)
    if ema is not None:
        ema.to(engine.device)
    return engine, ema, training_diffusion(config)


class StepKey(NamedTuple):
    """What seeds a step's randomness: the run's seed and the global batch it trains (the same
    batch gets the same timesteps and noise whatever the number of workers)."""

    seed: int
    epoch: int
    batch: int  # the batch's place in the epoch's global order


def bound_model(model, dtype: torch.dtype, batch: dict[str, torch.Tensor], model_type: str):
    """The diffusion's view of the model for one batch: the caption and size conditioning bound,
    inputs cast to the model's `dtype` (bf16/fp16 under mixed precision), the output fp32."""
    sizes = size_inputs(model_type, batch["x"].shape[0], batch["x"].device, dtype,
                        **{name: batch[name] for name in SIZE_INPUTS})  # fmt: skip

    def model_fn(x_t, t, x_mask):
        return model(x_t.to(dtype), t, batch["y"].to(dtype), batch["y_mask"], x_mask, **sizes).float()

    return model_fn


def train_step(engine, diffusion, batch: dict[str, torch.Tensor], model_type: str, key: StepKey) -> dict:
    """One optimizer step on one micro-batch; `key` seeds its timesteps, noise and caption dropout.

    Returns the loss (a detached tensor: reading it syncs the device, so only when logged)
    and the gradient norm before clipping.
    """
    x = batch["x"]  # (B, C, T, h, w), fp32: the loss is computed in fp32
    torch.manual_seed(seed_of(*key, "model"))  # caption dropout inside the model
    generator = torch.Generator().manual_seed(seed_of(*key, "diffusion"))
    t = diffusion.sample_timesteps(x.shape[0], generator, (batch["height"], batch["width"], x.shape[2]))
    t = t.to(x.device)  # (B,)
    noise = torch.randn(x.shape, generator=generator).to(x.device)  # (B, C, T, h, w)
    model_fn = bound_model(engine, next(engine.module.parameters()).dtype, batch, model_type)
    loss = diffusion.training_losses(model_fn, x, t, noise, batch.get("x_mask"))["loss"].mean()
    engine.backward(loss)
    engine.step()
    # DeepSpeed skips a step whose gradients are not finite (all ranks agree on it); in fp16 that is
    # loss scaling at work, in bf16 or fp32 it means bad data or a diverged model.
    return {"loss": loss.detach(), "grad_norm": engine.get_global_grad_norm(), "applied": engine.was_step_applied()}


EVAL_TIMESTEPS = 8  # fixed timesteps of the eval loss, spread evenly over the schedule


@torch.no_grad()
def evaluate(model: torch.nn.Module, diffusion, data: CacheBatches, batches: list, model_type: str, device) -> float:
    """The mean loss over the held-out batches at EVAL_TIMESTEPS fixed timesteps, with noise fixed
    per batch and timestep: the same inputs at every evaluation, in every run and resume."""
    was_training = model.training
    model.eval()  # no caption dropout
    total, count = 0.0, 0
    for index, ref in enumerate(batches):
        batch = {name: tensor.to(device) for name, tensor in data.load(ref, None).items()}
        x = batch["x"]  # (B, C, T, h, w)
        model_fn = bound_model(model, next(model.parameters()).dtype, batch, model_type)
        for k in range(EVAL_TIMESTEPS):
            step = (2 * k + 1) * diffusion.num_timesteps // (2 * EVAL_TIMESTEPS)
            generator = torch.Generator().manual_seed(seed_of("eval", ref.bucket, index, k))
            noise = torch.randn(x.shape, generator=generator).to(device)  # (B, C, T, h, w)
            t = torch.full((x.shape[0],), step, device=device)  # (B,)
            losses = diffusion.training_losses(model_fn, x, t, noise)["loss"]  # (B,)
            total, count = total + float(losses.sum()), count + losses.numel()
    model.train(was_training)
    return total / max(1, count)


class TrainLog:
    """Rank 0's record of training: a line on stdout, TensorBoard, wandb, losses.jsonl."""

    def __init__(self, config: TrainConfig, experiment: Path, total_steps: int, dp_size: int) -> None:
        from tensorboardX import SummaryWriter

        self.config, self.experiment, self.total_steps, self.dp_size = config, experiment, total_steps, dp_size
        self.writer = SummaryWriter(str(experiment / "tensorboard"))
        self.run = _wandb_run(config, experiment)
        self.wait = self.compute = 0.0
        self.samples = 0
        self.skipped = 0  # fp16 steps skipped by the loss scaler, over the run

    def record(self, state: TrainState, metrics: dict, batch_size: int, wait: float, compute: float) -> None:
        """Count a finished step; write it out when it is the first or a `log_every` step."""
        self.wait, self.compute = self.wait + wait, self.compute + compute
        self.samples += batch_size * self.dp_size  # one batch per data-parallel group
        step = state.global_step
        if not metrics["applied"]:
            self.skipped += 1
            print(f"step {step}/{self.total_steps}: fp16 gradients overflowed; the loss scaler skipped the step "
                  f"({self.skipped} skipped so far)", flush=True)  # fmt: skip
            self.writer.add_scalar("train/loss_scale_skips", self.skipped, step)
        if step % self.config.log_every and step != 1:
            return
        busy = max(1e-9, self.wait + self.compute)
        grad_norm = metrics["grad_norm"]
        values = {
            "loss": float(metrics["loss"]),
            "lr": self.config.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_per_s": self.samples / busy,
            "data_wait": self.wait / busy,
        }
        line = " ".join(f"{key} {value:.4g}" for key, value in values.items())
        print(f"step {step}/{self.total_steps} epoch {state.epoch} {line}", flush=True)
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        if self.run is not None:
            self.run.log(values, step=step)
        with (self.experiment / "losses.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": step, "loss": values["loss"]}) + "\n")
        self.wait = self.compute = 0.0
        self.samples = 0

    def record_eval(self, step: int, loss: float) -> None:
        print(f"step {step}/{self.total_steps} eval_loss {loss:.4g}", flush=True)
        self.writer.add_scalar("eval/loss", loss, step)
        if self.run is not None:
            self.run.log({"eval_loss": loss}, step=step)
        with (self.experiment / "eval_losses.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": step, "loss": loss}) + "\n")

    def close(self) -> None:
        self.writer.close()
        if self.run is not None:
            self.run.finish()


def _wandb_run(config: TrainConfig, experiment: Path):
    """A wandb run when `wandb=True` and the package is installed; otherwise None, said once."""
    if not config.wandb:
        return None
    try:
        import wandb
    except ImportError:
        print("wandb=True but wandb is not installed (pip install wandb): logging to TensorBoard only", flush=True)
        return None
    return wandb.init(project="sora", name=experiment.name, dir=str(experiment), config={"model": config.model.type})


def _write_worker_info(experiment: Path, place: sequence_parallel.Layout, device: torch.device, dtype: str) -> None:
    """What the worker runs on and computes in, and proof that no VAE or text encoder was loaded."""
    heavy = [name for name in ("sora_model.vae", "sora_model.text_encoder", "diffusers") if name in sys.modules]
    info = {"world_size": place.world, "sp_size": place.sp_size, "device": str(device), "dtype": dtype,
            "encoders_loaded": heavy}  # fmt: skip
    (experiment / "worker.json").write_text(json.dumps(info) + "\n")


def _batches(
    data: CacheBatches, config: TrainConfig, epoch: int, done: int, dp_rank: int, dp_size: int
) -> Iterator[dict]:
    """This data-parallel rank's batches from the data position (epoch, `done` global batches of
    it trained) on, epoch after epoch, as `TrainState.advance` walks them."""
    rows, sizes = data.train_rows(), data.batch_sizes(config.buckets)
    while True:
        plan = plan_epoch(rows, sizes, config.seed, epoch, dp_size, start=done)
        for _, batch in data.iterate(plan, dp_rank, config.seed, epoch):
            yield batch
        epoch, done = epoch + 1, 0


def fixed_latent_size(config: TrainConfig) -> tuple[int, int, int] | None:
    """(T, h, w) of the fixed-size form (SD VAE stride 8); None with a bucket_config."""
    if config.image_size is None or config.num_frames is None:
        return None
    return config.num_frames, config.image_size[0] // 8, config.image_size[1] // 8


# --------------------------------------------------------------------------- the worker


def train_worker(job: TrainJob, rank: int, world: int, hooks: WorkerHooks) -> None:
    """Train from the job's data position to `total_steps`, checkpointing on the way."""

    config = job.config
    torch.manual_seed(config.seed)
    # world = dp x sp: the ranks of an SP group train one batch, seeded by their DP rank.
    place = sequence_parallel.layout(rank, world, config.sp_size)
    sp_group = sequence_parallel.new_groups(place) if config.sp_size > 1 else None
    data = CacheBatches(Cache(job.cache_dir), config.mask_ratios, config.eval_fraction)
    # The eval loss is computed by the first SP group (its ranks run the model together).
    eval_batches = data.eval_batches(data.batch_sizes(config.buckets)) if place.dp_rank == 0 else []
    device = job.device
    engine, ema, diffusion = build_training(config, data.cache.text_dim(), device, rank == 0, sp_group)
    state = TrainState()
    # Where to continue from: the runner's checkpoint (after a restart), else `--load`, else
    # the newest complete checkpoint of this experiment. Any number of workers may resume it.
    with hooks.resumed() as found:
        if found := found or job.resume or latest_checkpoint(job.experiment):
            state = load_checkpoint(Path(found), engine, ema, place.dp_size)
    epoch_batches = plan_epoch(data.train_rows(), data.batch_sizes(config.buckets), config.seed, 0, 1).total
    total_steps = state.global_step + state.steps_left(place.dp_size, epoch_batches, config.epochs)
    log = TrainLog(config, job.experiment, total_steps, place.dp_size) if rank == 0 else None
    if rank == 0:
        _write_worker_info(job.experiment, place, engine.device, device.dtype)
    placed = {"rank": rank, "node": hooks.node(), "device": str(engine.device)}  # where each worker ran
    (job.experiment / f"worker-rank{rank}.json").write_text(json.dumps(placed) + "\n")
    on_cuda = engine.device.type == "cuda"
    batches = Prefetcher(_batches(data, config, state.epoch, state.batches, place.dp_rank, place.dp_size),
                         pin_memory=on_cuda)  # fmt: skip
    try:
        while state.global_step < total_steps:
            wait, batch = next(batches)
            started = time.perf_counter()
            batch = {name: tensor.to(engine.device, non_blocking=True) for name, tensor in batch.items()}
            key = StepKey(config.seed, state.epoch, state.batches + place.dp_rank)  # this rank's global batch
            if config.record_batches:
                _record_batch(job.experiment, rank, state, key)
            metrics = train_step(engine, diffusion, batch, config.model.type, key)
            if non_finite(metrics, device.dtype):
                stop_on_non_finite(job, data, key, rank, state.global_step + 1)
                break
            if ema is not None:
                update_ema(ema, engine.module, config.ema_decay)
            state.advance(place.dp_size, epoch_batches)
            done = state.global_step == total_steps
            if log is not None:
                log.record(state, metrics, batch["x"].shape[0], wait, time.perf_counter() - started)
            if eval_batches and (state.global_step % (config.eval_every or config.ckpt_every) == 0 or done):
                eval_loss = evaluate(engine.module, diffusion, data, eval_batches, config.model.type, engine.device)
                if log is not None:
                    log.record_eval(state.global_step, eval_loss)
            saved = state.global_step % config.ckpt_every == 0 or done
            if saved:
                folder = checkpoint_dir(job.experiment, state.global_step)
                save_checkpoint(folder, engine, ema, state, format_config(config), rank, on_saved=hooks.saved)
            if ema is not None and is_preview_step(config, state.global_step, done):
                hooks.preview(preview_task(job, ema, state.global_step, data.cache, saved))
    finally:
        batches.close()
    if log is not None:
        log.close()
    hooks.finish()


STOPPED = "stopped.json"  # in the experiment: why the run stopped before its last step


class TrainingStopped(ConfigError):
    """A run that stopped itself (non-finite values): the message names the step, bucket and samples."""


def non_finite(metrics: dict, dtype: str) -> bool:
    """Whether the loss or the gradients were not finite at this step, the same on every rank.

    In fp16 a skipped step is the loss scaler's (counted and logged by TrainLog, not fatal). In
    bf16 and fp32 a skipped step or a non-finite gradient norm means bad data or a diverged
    model. DeepSpeed's global gradient norm is already reduced over the ranks (a NaN loss on any
    rank makes it NaN everywhere), so no collective of our own is needed on the hot path."""
    if dtype == "fp16":
        return False
    grad_norm = metrics["grad_norm"]
    if grad_norm is not None:
        return not metrics["applied"] or not math.isfinite(float(grad_norm))
    bad = not metrics["applied"] or not bool(torch.isfinite(metrics["loss"]))  # an engine without a norm
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        flag = torch.tensor([float(bad)], device=metrics["loss"].device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        bad = bool(flag.item())
    return bad


def _record_batch(experiment: Path, rank: int, state: TrainState, key: StepKey) -> None:
    """`record_batches`: which global batch this rank trains at this step, one line per step."""
    line = {"step": state.global_step + 1, "epoch": key.epoch, "batch": key.batch}
    with (experiment / f"batches-rank{rank}.jsonl").open("a") as handle:
        handle.write(json.dumps(line) + "\n")


def stop_on_non_finite(job: TrainJob, data: CacheBatches, key: StepKey, rank: int, global_step: int) -> None:
    """A step whose loss or gradients are not finite: every rank names its batch, rank 0 writes
    them to `stopped.json`, and the workers end (no checkpoint of the broken state)."""
    config = job.config
    order = plan_epoch(data.train_rows(), data.batch_sizes(config.buckets), config.seed, key.epoch, 1)
    ref = order.batches[0][key.batch]
    ids = data.table(ref.bucket).take(list(ref.rows)).column(ID).to_pylist()
    mine = {"rank": rank, "bucket": ref.bucket, "sample_ids": [str(value) for value in ids]}
    batches = [mine]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        batches = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(batches, mine)
    if rank == 0:
        report = {"step": global_step, "epoch": key.epoch, "reason": "non-finite loss or gradients", "batches": batches}
        (job.experiment / STOPPED).write_text(json.dumps(report, indent=1))


def check_not_stopped(experiment: Path) -> None:
    """Raise TrainingStopped when the run wrote why it stopped."""
    stopped = experiment / STOPPED
    if stopped.is_file():
        report = json.loads(stopped.read_text())
        named = "; ".join(f"bucket {b['bucket']}: {', '.join(b['sample_ids'])}" for b in report["batches"])
        raise TrainingStopped(
            f"training stopped at step {report['step']} (epoch {report['epoch']}): {report['reason']}. The batches "
            f"of that step: {named}. Check those samples' latents and captions (`sora cache verify`), or lower "
            f"the learning rate; the checkpoints written before it are intact ({stopped})"
        )


def preview_task(job: TrainJob, ema: torch.nn.Module, global_step: int, cache: Cache, saved: bool) -> PreviewTask:
    """The previews of this step, from the EMA weights its checkpoint holds (or written for them)."""
    out = preview_dir(job.experiment, global_step)
    if saved:
        weights = checkpoint_dir(job.experiment, global_step) / EMA
    else:
        out.mkdir(parents=True, exist_ok=True)
        weights = out / WEIGHTS
        save_tensors(ema, weights)
    return PreviewTask(job.config, weights, preview_size(cache.manifest["buckets"]), out, global_step)


@contextlib.contextmanager
def single_process_group(backend: str) -> Iterator[None]:
    """A torch.distributed group of this process alone, for DeepSpeed outside a cluster."""
    launcher = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}  # what DeepSpeed reads of a launcher
    saved = {name: os.environ.get(name) for name in launcher}
    os.environ.update(launcher)
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def train_one_process(job: TrainJob) -> None:
    """The worker in this process, world size 1, on this process's device: no Ray involved."""
    job.experiment.mkdir(parents=True, exist_ok=True)
    print(job.device.describe(), flush=True)
    (job.experiment / STOPPED).unlink(missing_ok=True)
    with single_process_group(job.device.backend):
        train_worker(job, rank=0, world=1, hooks=LocalHooks())
    check_not_stopped(job.experiment)
