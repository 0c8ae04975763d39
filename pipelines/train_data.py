"""Training batches from the cache: bucket-homogeneous, deterministic, disjoint across workers.

The epoch plan is a function of (seed, epoch) only: within each bucket the rows are
shuffled and cut into full batches of the bucket's batch size; then all batches of all
buckets are shuffled together and dealt to the workers in turn, so workers never share a
sample and every micro-batch has one shape. The data position is (epoch, step): resuming
at a step yields exactly the batches an uninterrupted run would have seen.

Each sample then gets, from a generator seeded by (seed, epoch, step, worker), a random
T-frame window of its stored latent frames (Open-Sora's random temporal crop) and a fresh
sample of the VAE posterior, and, with `mask_ratios`, a frame mask (Open-Sora 1.1).

With `eval_fraction`, a share of the samples, chosen by their id alone, is held out: never
planned for training, read for evaluation with the centred window and the posterior mean.

`Prefetcher` reads, decodes and windows the next batches in a background thread while the
current step runs (pinned for the copy to CUDA); the batches are the same, since their
randomness comes from their data position, not from the order of work.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bucketing.assign import parse_bucket_name
from bucketing.config import BucketConfig
from pipelines.cache import HEIGHT, ID, PATH, SRC_FPS, WIDTH, Cache, sample_from_row
from pipelines.config import ConfigError
from pipelines.dataset import IMAGE_EXTENSIONS
from sora_model.stdit import training_conditions


def seed_of(*parts: object) -> int:
    """A 63-bit seed from any parts, the same in every process."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def held_out(sample_id: str, fraction: float) -> bool:
    """Whether a sample is kept for evaluation: a function of its id only, the same in every run."""
    digest = hashlib.blake2b(f"eval/{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


@dataclass(frozen=True)
class BatchRef:
    """One micro-batch: a bucket and row numbers in that bucket's table."""

    bucket: str
    rows: tuple[int, ...]


@dataclass(frozen=True)
class EpochPlan:
    """An epoch's batches dealt to the workers: the epoch's global order of batches (fixed by seed
    and epoch, whatever the number of workers), from `start` on, round-robin, so that step `s` of
    worker `r` trains global batch `start + s * workers + r`."""

    batches: tuple[tuple[BatchRef, ...], ...]  # per worker, in step order
    leftover: dict[str, int]  # bucket -> samples that fill no batch this epoch
    total: int = 0  # full batches in the epoch's global order
    start: int = 0  # global batches trained before this plan's first step (a resumed epoch)

    @property
    def steps(self) -> int:
        return len(self.batches[0]) if self.batches else 0

    def index(self, rank: int, step: int) -> int:
        """The global batch that worker `rank` trains at `step` of this plan."""
        return self.start + step * len(self.batches) + rank


def plan_epoch(
    bucket_rows: Mapping[str, np.ndarray],
    batch_sizes: Mapping[str, int],
    seed: int,
    epoch: int,
    workers: int,
    start: int = 0,
) -> EpochPlan:
    """Deal the full batches of every bucket to `workers`, in an order fixed by (seed, epoch).

    `bucket_rows` holds the table rows to train on, per bucket. `start` skips the first global
    batches (trained before a resume, by any number of workers); the batches left after the
    last full round of `workers` wait for the next epoch's shuffle like a bucket's leftovers.
    """
    batches: list[BatchRef] = []
    leftover = {}
    for bucket in sorted(bucket_rows):
        size = batch_sizes[bucket]
        rows = np.asarray(bucket_rows[bucket])
        order = rows[np.random.default_rng(seed_of(seed, epoch, bucket)).permutation(len(rows))]
        full = len(order) // size
        batches += [BatchRef(bucket, tuple(int(r) for r in order[i * size : (i + 1) * size])) for i in range(full)]
        leftover[bucket] = len(order) - full * size
    shuffled = [batches[i] for i in np.random.default_rng(seed_of(seed, epoch, "order")).permutation(len(batches))]
    remaining = shuffled[start:]
    usable = len(remaining) - len(remaining) % workers  # every worker takes the same number of steps
    per_worker = tuple(tuple(remaining[rank:usable:workers]) for rank in range(workers))
    return EpochPlan(per_worker, leftover, len(shuffled), start)


def frame_mask(frames: int, ratios: Mapping[str, float], generator: torch.Generator) -> torch.Tensor:
    """Open-Sora 1.1's masks: (frames,) bool, False = a condition frame (not generated, no loss)."""
    mask = torch.ones(frames, dtype=torch.bool)
    draw = float(torch.rand((), generator=generator))
    total, name = 0.0, "mask_no"
    for candidate, ratio in ratios.items():
        total += ratio
        if draw < total:
            name = candidate
            break
    if frames <= 1 or name == "mask_no":
        return mask
    most = max(1, frames // 4)  # condition at most a quarter of the frames

    def randint(low: int, high: int) -> int:  # inclusive bounds
        return int(torch.randint(low, high + 1, (), generator=generator))

    size = 1 if name.startswith("mask_image") else randint(1, most)
    if name.endswith("_random"):
        start = randint(0, frames - size)
        mask[start : start + size] = False
    if name.endswith("head") or name.endswith("head_tail"):
        mask[:size] = False
    if name.endswith("tail"):
        mask[-size:] = False
    return mask


class CacheBatches:
    """Reads planned batches from a finished cache as tensors ready for the model."""

    def __init__(
        self, cache: Cache, mask_ratios: Mapping[str, float] | None = None, eval_fraction: float = 0.0
    ) -> None:
        self.cache = cache
        self.mask_ratios = mask_ratios
        self.eval_fraction = eval_fraction
        self._tables: dict[str, pa.Table] = {}
        self._held_out: dict[str, np.ndarray] = {}  # bucket -> (rows,) bool

    def table(self, bucket: str) -> pa.Table:
        if bucket not in self._tables:
            self._tables[bucket] = self.cache.table(bucket)
        return self._tables[bucket]

    def bucket_rows(self) -> dict[str, int]:
        """Samples per bucket, held-out ones included."""
        return {bucket: int(count) for bucket, count in self.cache.manifest["buckets"].items()}

    def held_out(self, bucket: str) -> np.ndarray:
        """(rows,) bool: which rows of the bucket's table are kept for evaluation."""
        if bucket not in self._held_out:
            if self.eval_fraction == 0:  # no need to read the table
                self._held_out[bucket] = np.zeros(self.bucket_rows()[bucket], dtype=bool)
            else:
                ids = self.table(bucket).column(ID).to_pylist()
                self._held_out[bucket] = np.array([held_out(i, self.eval_fraction) for i in ids], dtype=bool)
        return self._held_out[bucket]

    def train_rows(self) -> dict[str, np.ndarray]:
        """The table rows to train on, per bucket."""
        return {bucket: np.flatnonzero(~self.held_out(bucket)) for bucket in self.bucket_rows()}

    def eval_batches(self, batch_sizes: Mapping[str, int]) -> list[BatchRef]:
        """The held-out rows in batches of each bucket's size (the last one may be short)."""
        batches = []
        for bucket in sorted(self.bucket_rows()):
            rows = np.flatnonzero(self.held_out(bucket)).tolist()
            size = batch_sizes[bucket]
            batches += [BatchRef(bucket, tuple(rows[i : i + size])) for i in range(0, len(rows), size)]
        return batches

    def batch_sizes(self, buckets: BucketConfig) -> dict[str, int]:
        """The config's batch size of every bucket in the cache; a bucket it lacks is an error."""
        sizes = {}
        for bucket in self.bucket_rows():
            size = buckets.batch_size(*parse_bucket_name(bucket)[:2])
            if size is None:
                raise ConfigError(f"the cache has bucket {bucket} but the config has no batch size for it")
            sizes[bucket] = size
        return sizes

    def load(self, batch: BatchRef, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """One micro-batch: latents (B, C, T, h, w), caption (B, L, D) + mask, conditioning, frame mask.

        The conditioning values are Open-Sora 1.1's (sora_model.stdit.training_conditions): the
        bucket's height and width, ar = width / height, the file's own fps (not divided by
        frame_interval; 24 when unknown) and 120 for an image.

        Without a generator it is the evaluation view: the centred window, the posterior mean,
        no frame mask.
        """
        rows = self.table(batch.bucket).take(list(batch.rows)).to_pylist()
        frames = parse_bucket_name(batch.bucket)[1]
        latents, captions = [], []
        for row in rows:
            sample = sample_from_row(row, batch.bucket)
            captions.append(sample.text_embedding.float())
            stored = sample.latent_mean.shape[1]
            if generator is None:
                centre = (stored - frames) // 2
                latents.append(sample.latent_mean[:, centre : centre + frames].float())
                continue
            start = int(torch.randint(0, stored - frames + 1, (), generator=generator))
            window = slice(start, start + frames)  # Open-Sora's random temporal crop
            mean = sample.latent_mean[:, window].float()
            std = torch.exp(0.5 * sample.latent_logvar[:, window].float())
            noise = torch.randn(mean.shape, generator=generator)
            latents.append(mean + std * noise)  # a fresh posterior sample, as Open-Sora's VAE draws
        length = max(caption.shape[0] for caption in captions)
        text = torch.zeros(len(rows), length, captions[0].shape[1])
        text_mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for index, caption in enumerate(captions):
            text[index, : caption.shape[0]] = caption
            text_mask[index, : caption.shape[0]] = True
        batch_size = len(rows)
        height = torch.tensor([float(row[HEIGHT]) for row in rows])
        width = torch.tensor([float(row[WIDTH]) for row in rows])
        images = [Path(row[PATH]).suffix.lower() in IMAGE_EXTENSIONS for row in rows]
        conditions = [
            training_conditions(row[HEIGHT], row[WIDTH], row[SRC_FPS], image)
            for row, image in zip(rows, images, strict=True)
        ]  # Open-Sora 1.1's ar and fps
        out = {
            "x": torch.stack(latents),  # (B, C, T, h, w)
            "y": text,  # (B, L, D), zero past each caption's real tokens
            "y_mask": text_mask,  # (B, L)
            "height": height,
            "width": width,
            "num_frames": torch.full((batch_size,), float(frames)),
            "fps": torch.tensor([c["fps"] for c in conditions], dtype=torch.float32),
            "ar": torch.tensor([c["ar"] for c in conditions], dtype=torch.float32),
        }
        if self.mask_ratios and generator is not None:
            out["x_mask"] = torch.stack([frame_mask(frames, self.mask_ratios, generator) for _ in rows])
        return out

    def iterate(
        self, plan: EpochPlan, rank: int, seed: int, epoch: int, start_step: int = 0
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(step, batch) for this worker from `start_step` on; randomness fixed per (seed, epoch, global
        batch): the same crop, posterior draw and mask for a batch whatever the number of workers."""
        for step in range(start_step, plan.steps):
            generator = torch.Generator().manual_seed(seed_of(seed, epoch, plan.index(rank, step)))
            yield step, self.load(plan.batches[rank][step], generator)


class Prefetcher:
    """The items of `items` made `depth` ahead in a background thread; `next` gives (seconds the
    caller waited, item). Tensors of dict items are pinned when `pin_memory` (for non-blocking
    copies to CUDA). An error in the thread is raised by `next`; `close` stops the thread."""

    _END = object()

    def __init__(self, items: Iterator[dict[str, torch.Tensor]], depth: int = 2, pin_memory: bool = False) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(items, pin_memory), name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, items: Iterator[dict[str, torch.Tensor]], pin_memory: bool) -> None:
        try:
            for item in items:
                if pin_memory:
                    item = {name: tensor.pin_memory() for name, tensor in item.items()}
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(error)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[float, dict[str, torch.Tensor]]:
        started = time.perf_counter()
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return time.perf_counter() - started, item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
