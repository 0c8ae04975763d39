"""`sora train`: a Ray Train job, DeepSpeed ZeRO-2 inside each worker, data from the cache only.

The workers never load the VAE or the text encoder: latents and caption embeddings come
from the cache. Everything random in a step (the batch, its temporal windows, posterior
and timestep draws, masks, caption dropout) is seeded by (seed, epoch, step, rank), so a
run resumed from a checkpoint continues with exactly the batches and losses an
uninterrupted run would have had.

Checkpoints (every `ckpt_every` steps and at the end) are folders under
`<outputs>/<experiment>/checkpoints/step-NNNNNNN/`:
    model.safetensors   the weights;  ema.safetensors  the fp32 EMA weights (what to sample with)
    deepspeed/          optimizer and engine state (ZeRO shards)
    state.json          epoch, step, global step;  config.py  the resolved config
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines import cache as C
from pipelines.bucket_report import bucket_config_of
from pipelines.config import ConfigError, TrainConfig, format_config
from pipelines.models import CHECKPOINTS, COMPLETE, latest_checkpoint, load_model
from pipelines.train_data import CacheBatches, EpochPlan, _seed, bucket_batch_size, plan_epoch


@dataclass(frozen=True)
class TrainPlan:
    batch_sizes: dict[str, int]
    bucket_rows: dict[str, int]
    workers: int
    steps_per_epoch: int

    def format(self) -> str:
        lines = [f"training plan: {self.workers} worker(s), {self.steps_per_epoch} steps per epoch"]
        plan = plan_epoch(self.bucket_rows, self.batch_sizes, 0, 0, 1)
        batches: dict[str, int] = {}
        for ref in plan.batches[0]:
            batches[ref.bucket] = batches.get(ref.bucket, 0) + 1
        for bucket in sorted(self.bucket_rows):
            count = batches.get(bucket, 0)
            rows, size = self.bucket_rows[bucket], self.batch_sizes[bucket]
            line = f"  {bucket:<22} {rows:>6} samples  batch {size:>3}  {count:>5} batches"
            if count == 0:
                line += "   <- yields no full batch: these samples are never trained on"
            lines.append(line)
        return "\n".join(lines) + "\n"


def make_plan(cache: C.Cache, config: TrainConfig, workers: int) -> TrainPlan:
    buckets = bucket_config_of(config)
    rows = {bucket: int(count) for bucket, count in cache.manifest["buckets"].items()}
    sizes = {}
    for bucket in rows:
        size = bucket_batch_size(buckets, bucket)
        if size is None:
            raise ConfigError(f"the cache has bucket {bucket} but the config has no batch size for it")
        sizes[bucket] = size
    steps = plan_epoch(rows, sizes, config.seed, 0, workers).steps
    return TrainPlan(sizes, rows, workers, steps)


def _experiment_dir(outputs: Path, model_type: str) -> Path:
    outputs.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in outputs.iterdir() if (m := re.match(r"(\d{3})-", p.name))]
    return outputs / f"{max(taken, default=-1) + 1:03d}-{model_type.replace('/', '-')}"


def train(
    config: TrainConfig,
    cache_dir: str,
    outputs: str,
    load: str | None = None,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    address: str | None = None,
) -> Path:
    """Run the training job; returns the experiment folder."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.preprocess import check_cache_matches

    if config.plugin != "zero2":
        raise ConfigError(f"plugin {config.plugin!r} (sequence parallelism) is not implemented yet; use 'zero2'")
    cache = C.Cache(cache_dir)
    check_cache_matches(cache.store, config)
    plan = make_plan(cache, config, num_workers)
    print(plan.format(), end="", flush=True)
    if plan.steps_per_epoch == 0:
        raise ConfigError("no bucket yields a full batch for every worker: lower batch sizes or num_workers")
    resume = None
    if load is not None:
        resume = latest_checkpoint(load)
        if resume is None:
            raise ConfigError(f"--load {load}: no checkpoint there (expected state.json or {CHECKPOINTS}/step-*)")
        experiment = resume.parent.parent
    else:
        experiment = _experiment_dir(Path(outputs).absolute(), config.model.type)
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / "config.py").write_text(format_config(config))

    if not ray.is_initialized():
        env = {"env_vars": {"DS_ACCELERATOR": "cpu"}} if not use_gpu else {}
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        else:
            ray.init(num_cpus=max(4, num_workers + 1), include_dashboard=False, runtime_env=env)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= num_workers
    loop_config = {
        "config": config,
        "cache_dir": str(Path(cache_dir).absolute()) if "://" not in cache_dir else cache_dir,
        "experiment": str(experiment),
        "resume": str(resume) if resume else None,
        "steps_per_epoch": plan.steps_per_epoch,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=str(experiment / "ray"),
            name="run",
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    trainer.fit()
    print(f"experiment: {experiment}", flush=True)
    return experiment


# --------------------------------------------------------------------------- inside each worker


def _model_call(model, batch: dict[str, torch.Tensor]):
    """The diffusion's view of the model: (x_t, t, x_mask) -> output, the batch's caption bound."""
    from sora_model.stdit import STDiT2

    extra = {}
    if isinstance(getattr(model, "module", model), STDiT2):  # a DeepSpeed engine wraps the model
        extra = {k: batch[k] for k in ("height", "width", "num_frames", "fps")}
    return lambda x, t, x_mask: model(x, t, batch["y"], batch["y_mask"], x_mask, **extra)


def _save_tensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def train_loop(loop: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, EMA, the planned batches, checkpoints."""
    import copy
    import tempfile

    import deepspeed
    import ray.train
    from safetensors.torch import load_file
    from tensorboardX import SummaryWriter
    from torch.utils.checkpoint import checkpoint

    from sora_model.diffusion import IDDPM

    config: TrainConfig = loop["config"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed)
    cache = C.Cache(loop["cache_dir"])
    data = CacheBatches(cache, config.mask_ratios)
    caption_channels = C.sample_from_row(
        cache.table(cache.buckets()[0]).slice(0, 1).to_pylist()[0], ""
    ).text_embedding.shape[1]
    fixed = (
        None
        if config.image_size is None or config.num_frames is None
        else (config.num_frames, config.image_size[0] // 8, config.image_size[1] // 8)
    )
    model = load_model(config.model, caption_channels, config.text_encoder.model_max_length, fixed)
    if config.grad_checkpoint:  # applied from outside: the model code knows nothing of it
        for block in model.blocks:
            block.forward = _checkpointed(checkpoint, block.forward)
    ema = copy.deepcopy(model).float().eval().requires_grad_(False) if rank == 0 else None
    use_gpu = torch.cuda.is_available()
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,  # informational: batch sizes vary by bucket
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": config.dtype == "bf16" and use_gpu},
        "fp16": {"enabled": config.dtype == "fp16" and use_gpu},
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    scheduler = IDDPM(timestep_respacing=config.scheduler.timestep_respacing)

    epoch, step, global_step = 0, 0, 0
    # Where to continue from: Ray Train's latest checkpoint, else `--load`, else (after a worker
    # failure restarted this function) the newest complete checkpoint of this experiment.
    resume = ray.train.get_checkpoint()
    fallback = loop["resume"] or latest_checkpoint(loop["experiment"])
    resume_dir = None
    with resume.as_directory() if resume else _nullcontext(fallback) as found:
        if found:
            resume_dir = Path(found)
            engine.load_checkpoint(str(resume_dir / "deepspeed"), tag="state")
            state = json.loads((resume_dir / "state.json").read_text())
            epoch, step, global_step = state["epoch"], state["step"], state["global_step"]
            if ema is not None:
                ema.load_state_dict(load_file(str(resume_dir / "ema.safetensors")))
    experiment = Path(loop["experiment"])
    writer = SummaryWriter(str(experiment / "tensorboard")) if rank == 0 else None
    run = _wandb_run(config, experiment) if rank == 0 else None
    if rank == 0:  # what this worker runs on, and proof that no VAE or text encoder was loaded
        heavy = [name for name in ("sora_model.vae", "sora_model.text_encoder", "diffusers") if name in sys.modules]
        info = {"world_size": world, "device": str(engine.device), "encoders_loaded": heavy}
        (experiment / "worker.json").write_text(json.dumps(info) + "\n")
    steps_per_epoch = loop["steps_per_epoch"]
    total_steps = config.epochs * steps_per_epoch
    device = engine.device

    def save() -> None:
        folder = experiment / CHECKPOINTS / f"step-{global_step:07d}"
        with tempfile.TemporaryDirectory() as scratch:
            target = Path(scratch)
            engine.save_checkpoint(str(target / "deepspeed"), tag="state")
            if rank == 0:
                _save_tensors(engine.module, target / "model.safetensors")
                _save_tensors(ema, target / "ema.safetensors")
                (target / "state.json").write_text(
                    json.dumps({"epoch": epoch, "step": step, "global_step": global_step})
                )
                (target / "config.py").write_text(format_config(config))
            # Every rank adds its own ZeRO shards to the experiment's copy (shared storage on clusters);
            # the marker says all of them are there.
            shutil.copytree(target, folder, dirs_exist_ok=True)
            torch.distributed.barrier()
            if rank == 0:
                (folder / COMPLETE).write_text("")
            ray.train.report({"global_step": global_step}, checkpoint=ray.train.Checkpoint.from_directory(str(target)))

    wait = compute = 0.0
    samples = 0
    while global_step < total_steps:
        plan: EpochPlan = plan_epoch(data.bucket_rows(), _sizes(config, data), config.seed, epoch, world)
        started = time.perf_counter()
        for step_index, batch in data.iterate(plan, rank, config.seed, epoch, step):
            fetched = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            torch.manual_seed(_seed(config.seed, epoch, step_index, rank, "model"))  # caption dropout
            generator = torch.Generator().manual_seed(_seed(config.seed, epoch, step_index, rank, "diffusion"))
            t = torch.randint(0, scheduler.num_timesteps, (batch["x"].shape[0],), generator=generator).to(device)
            noise = torch.randn(batch["x"].shape, generator=generator).to(device)
            losses = scheduler.training_losses(_model_call(engine, batch), batch["x"], t, noise, batch.get("x_mask"))
            loss = losses["loss"].mean()
            engine.backward(loss)
            engine.step()
            if ema is not None:
                _update_ema(ema, engine.module, config.ema_decay)
            done = time.perf_counter()
            wait += fetched - started
            compute += done - fetched
            samples += batch["x"].shape[0] * world
            started = done
            global_step += 1
            step = step_index + 1
            if step >= steps_per_epoch:
                epoch, step = epoch + 1, 0
            if rank == 0 and (global_step % config.log_every == 0 or global_step == 1):
                grad_norm = engine.get_global_grad_norm()
                metrics = {
                    "loss": loss.item(),
                    "lr": config.lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "samples_per_s": samples / max(1e-9, wait + compute),
                    "data_wait": wait / max(1e-9, wait + compute),
                }
                print(
                    f"step {global_step}/{total_steps} epoch {epoch} "
                    + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                    flush=True,
                )
                for key, value in metrics.items():
                    writer.add_scalar(f"train/{key}", value, global_step)
                if run is not None:
                    run.log(metrics, step=global_step)
                _log_loss(experiment, global_step, loss.item())
                wait = compute = 0.0
                samples = 0
            if global_step % config.ckpt_every == 0 or global_step == total_steps:
                save()
            if global_step >= total_steps or step == 0:
                break
    if writer is not None:
        writer.close()
    if run is not None:
        run.finish()


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


def _sizes(config: TrainConfig, data: CacheBatches) -> dict[str, int]:
    buckets = bucket_config_of(config)
    return {bucket: bucket_batch_size(buckets, bucket) for bucket in data.bucket_rows()}


def _log_loss(experiment: Path, step: int, loss: float) -> None:
    with (experiment / "losses.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": step, "loss": loss}) + "\n")


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.mul_(decay).add_(param.detach().float(), alpha=1 - decay)


def _checkpointed(checkpoint, forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `sora train`")
