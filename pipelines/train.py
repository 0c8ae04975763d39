"""`sora train`: a Ray Train job, DeepSpeed ZeRO-2 inside each worker, data from the cache only.

The driver checks the cache against the config, prints the plan, picks the experiment
folder and starts a `TorchTrainer`. Each Ray worker runs `pipelines.trainer.train_worker`,
the same function a single process runs without Ray; Ray Train supplies the rank, the
world size, checkpoint reporting and restarts after a worker dies, nothing else.
Checkpoints are laid out as `pipelines/checkpoint.py` describes.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bucketing.config import BucketConfigError
from pipelines import sequence_parallel
from pipelines.cache import Cache, check_cache_matches
from pipelines.checkpoint import CHECKPOINTS, latest_checkpoint, new_experiment, verify_checkpoint
from pipelines.cluster import connect
from pipelines.config import ConfigError, TrainConfig, format_config
from pipelines.device import decide_device
from pipelines.preview import Previewer, PreviewTask
from pipelines.train_data import CacheBatches, plan_epoch
from pipelines.trainer import STOPPED, TrainJob, check_not_stopped, train_worker


@dataclass(frozen=True)
class TrainPlan:
    batch_sizes: dict[str, int]
    bucket_rows: dict[str, np.ndarray]  # table rows trained on, per bucket
    workers: int
    steps_per_epoch: int
    held_out: int = 0  # samples kept for evaluation
    sp_size: int = 1  # workers per sequence-parallel group

    def format(self) -> str:
        lines = [f"training plan: {self.workers} worker(s), {self.steps_per_epoch} steps per epoch"]
        if self.sp_size > 1:
            lines[0] += (f" (sequence parallel: {self.workers // self.sp_size} data-parallel group(s) of "
                         f"{self.sp_size} workers, each group trains one batch)")  # fmt: skip
        if self.held_out:
            lines.append(f"  {self.held_out} samples held out for the eval loss (eval_fraction), never trained on")
        plan = plan_epoch(self.bucket_rows, self.batch_sizes, 0, 0, 1)
        batches: dict[str, int] = {}
        for ref in plan.batches[0]:
            batches[ref.bucket] = batches.get(ref.bucket, 0) + 1
        for bucket in sorted(self.bucket_rows):
            count = batches.get(bucket, 0)
            rows, size = len(self.bucket_rows[bucket]), self.batch_sizes[bucket]
            line = f"  {bucket:<22} {rows:>6} samples  batch {size:>3}  {count:>5} batches"
            if count == 0:
                line += "   <- yields no full batch: these samples are never trained on"
            lines.append(line)
        return "\n".join(lines) + "\n"


def check_sequence_parallel(config: TrainConfig, workers: int) -> None:
    """plugin 'zero2-seq': the workers make whole SP groups, the model's heads divide among them."""
    if config.plugin == "zero2-seq":
        sequence_parallel.check_world(workers, config.sp_size)
        sequence_parallel.check_model(config.model.type, config.sp_size)


def make_plan(cache: Cache, config: TrainConfig, workers: int) -> TrainPlan:
    """The epoch plan of `workers` workers: one batch per data-parallel group (workers / sp_size)."""
    try:
        config.buckets.require_batch_sizes()  # Open-Sora's search form loads, but trains with numbers only
    except BucketConfigError as error:
        raise ConfigError(str(error)) from None
    data = CacheBatches(cache, eval_fraction=config.eval_fraction)
    rows, sizes = data.train_rows(), data.batch_sizes(config.buckets)
    if config.plugin == "zero2-seq" and config.sp_split == "time":  # the buckets trained and evaluated
        sequence_parallel.check_time_split(sorted(data.bucket_rows()), config.model.type, config.sp_size)
    steps = plan_epoch(rows, sizes, config.seed, 0, workers // config.sp_size).steps
    held_out = sum(data.bucket_rows().values()) - sum(len(r) for r in rows.values())
    return TrainPlan(sizes, rows, workers, steps, held_out, config.sp_size)


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

    check_sequence_parallel(config, num_workers)
    cache = Cache(cache_dir)
    check_cache_matches(cache.store, config)
    plan = make_plan(cache, config, num_workers)
    print(plan.format(), end="", flush=True)
    if plan.steps_per_epoch == 0:
        raise ConfigError(
            "no bucket yields a full batch for every data-parallel group: lower batch sizes or num_workers"
        )
    # Ray Train turns a worker's print into a log record as well as the print itself: every step
    # line would reach the user twice (stdout and stderr). Its prints stay plain prints.
    quiet_prints = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    connect(address, local_cpus=max(4, math.ceil(num_workers * config.worker_cpus) + 1), runtime_env=quiet_prints,
            log_to_driver=True)  # fmt: skip
    device = decide_device(use_gpu, ray.cluster_resources().get("GPU", 0), num_workers, config.dtype)
    print(device.describe(), flush=True)
    resume = None
    if load is not None:
        resume = latest_checkpoint(load)
        if resume is None:
            raise ConfigError(f"--load {load}: no checkpoint there (expected state.json or {CHECKPOINTS}/step-*)")
        verify_checkpoint(resume)  # at once, naming the file, before any worker starts
        experiment = resume.parent.parent
    else:
        experiment = new_experiment(Path(outputs).absolute(), config.model.type)
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / "config.py").write_text(format_config(config))

    job = TrainJob(
        config=config,
        cache_dir=cache_dir if "://" in cache_dir else str(Path(cache_dir).absolute()),
        experiment=experiment,
        device=device,
        resume=resume,
    )
    per_worker = {"CPU": config.worker_cpus} | ({"GPU": 1} if device.use_gpu else {})
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=device.use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend=device.backend),
        run_config=RunConfig(
            # A run of its own per invocation: Ray Train restores from its run folder's checkpoints
            # (after a worker dies, within this run), never from a run before: `--load` means what it names.
            storage_path=str(experiment / "ray"),
            name=time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(3),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    (experiment / STOPPED).unlink(missing_ok=True)
    trainer.fit()
    check_not_stopped(experiment)
    print(f"experiment: {experiment}", flush=True)
    return experiment


class RayHooks:
    """Ray Train's part in a worker: its latest checkpoint after a restart, reporting ours, and
    previews in an actor of their own on this node, at the lowest CPU priority."""

    def __init__(self) -> None:
        self.previewer = None  # the Previewer actor, started with the first preview
        self.previews: list = []  # ObjectRefs of the previews asked for

    def resumed(self) -> contextlib.AbstractContextManager[Path | None]:
        import ray.train

        found = ray.train.get_checkpoint()
        return found.as_directory() if found else contextlib.nullcontext(None)

    def saved(self, global_step: int, scratch: Path) -> None:
        import ray.train

        ray.train.report({"global_step": global_step}, checkpoint=ray.train.Checkpoint.from_directory(str(scratch)))

    def preview(self, task: PreviewTask) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self.previewer is None:
            # On this node (the weights are on its disk), reserving no CPU: the workers hold
            # them, and a process at the lowest priority only takes what they leave.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.previewer = ray.remote(num_cpus=0, scheduling_strategy=here)(Previewer).remote(niced=True)
        self.previews.append(self.previewer.render.remote(task))

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def finish(self) -> None:
        import ray

        pending = [ref for ref in self.previews if not ray.wait([ref], timeout=0)[0]]
        if pending:
            print(f"training done; waiting for {len(pending)} preview(s) to finish", flush=True)
        for ref in self.previews:
            try:
                print(f"preview: {ray.get(ref)}", flush=True)
            except Exception as error:  # a failed preview loses a picture, never the training
                print(f"warning: a preview failed: {error}", flush=True)


def ray_worker(loop_config: dict) -> None:
    """One Ray Train worker (Ray passes `train_loop_config` as a dict)."""
    import ray.train

    context = ray.train.get_context()
    train_worker(loop_config["job"], context.get_world_rank(), context.get_world_size(), RayHooks())
