"""Training batches from the cache: bucket-homogeneous, deterministic, disjoint across workers.

The epoch plan is a function of (seed, epoch) only: within each bucket the rows are
shuffled and cut into full batches of the bucket's batch size; then all batches of all
buckets are shuffled together and dealt to the workers in turn, so workers never share a
sample and every micro-batch has one shape. The data position is (epoch, step): resuming
at a step yields exactly the batches an uninterrupted run would have seen.

Each sample then gets, from a generator seeded by (seed, epoch, step, worker), a random
T-frame window of its stored latent frames (Open-Sora's random temporal crop) and a fresh
sample of the VAE posterior, and, with `mask_ratios`, a frame mask (Open-Sora 1.1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from bucketing.assign import parse_bucket_name
from bucketing.config import BucketConfig
from pipelines.cache import FPS, HEIGHT, WIDTH, Cache, sample_from_row
from pipelines.config import ConfigError


def seed_of(*parts: object) -> int:
    """A 63-bit seed from any parts, the same in every process."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class BatchRef:
    """One micro-batch: a bucket and row numbers in that bucket's table."""

    bucket: str
    rows: tuple[int, ...]


@dataclass(frozen=True)
class EpochPlan:
    batches: tuple[tuple[BatchRef, ...], ...]  # per worker, in step order
    leftover: dict[str, int]  # bucket -> samples that fill no batch this epoch

    @property
    def steps(self) -> int:
        return len(self.batches[0]) if self.batches else 0


def plan_epoch(
    bucket_rows: Mapping[str, int], batch_sizes: Mapping[str, int], seed: int, epoch: int, workers: int
) -> EpochPlan:
    """Deal the full batches of every bucket to `workers`, in an order fixed by (seed, epoch)."""
    batches: list[BatchRef] = []
    leftover = {}
    for bucket in sorted(bucket_rows):
        size = batch_sizes[bucket]
        order = np.random.default_rng(seed_of(seed, epoch, bucket)).permutation(bucket_rows[bucket])
        full = len(order) // size
        batches += [BatchRef(bucket, tuple(int(r) for r in order[i * size : (i + 1) * size])) for i in range(full)]
        leftover[bucket] = len(order) - full * size
    shuffled = [batches[i] for i in np.random.default_rng(seed_of(seed, epoch, "order")).permutation(len(batches))]
    usable = len(shuffled) - len(shuffled) % workers  # every worker takes the same number of steps
    per_worker = tuple(tuple(shuffled[rank:usable:workers]) for rank in range(workers))
    return EpochPlan(per_worker, leftover)


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

    def __init__(self, cache: Cache, mask_ratios: Mapping[str, float] | None = None) -> None:
        self.cache = cache
        self.mask_ratios = mask_ratios
        self._tables: dict[str, pa.Table] = {}

    def table(self, bucket: str) -> pa.Table:
        if bucket not in self._tables:
            self._tables[bucket] = self.cache.table(bucket)
        return self._tables[bucket]

    def bucket_rows(self) -> dict[str, int]:
        return {bucket: int(count) for bucket, count in self.cache.manifest["buckets"].items()}

    def batch_sizes(self, buckets: BucketConfig) -> dict[str, int]:
        """The config's batch size of every bucket in the cache; a bucket it lacks is an error."""
        sizes = {}
        for bucket in self.bucket_rows():
            size = buckets.batch_size(*parse_bucket_name(bucket)[:2])
            if size is None:
                raise ConfigError(f"the cache has bucket {bucket} but the config has no batch size for it")
            sizes[bucket] = size
        return sizes

    def load(self, batch: BatchRef, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One micro-batch: latents (B, C, T, h, w), caption (B, L, D) + mask, conditioning, frame mask."""
        rows = self.table(batch.bucket).take(list(batch.rows)).to_pylist()
        frames = parse_bucket_name(batch.bucket)[1]
        latents, captions = [], []
        for row in rows:
            sample = sample_from_row(row, batch.bucket)
            stored = sample.latent_mean.shape[1]
            start = int(torch.randint(0, stored - frames + 1, (), generator=generator))
            window = slice(start, start + frames)  # Open-Sora's random temporal crop
            mean = sample.latent_mean[:, window].float()
            std = torch.exp(0.5 * sample.latent_logvar[:, window].float())
            noise = torch.randn(mean.shape, generator=generator)
            latents.append(mean + std * noise)  # a fresh posterior sample, as Open-Sora's VAE draws
            captions.append(sample.text_embedding.float())
        length = max(caption.shape[0] for caption in captions)
        text = torch.zeros(len(rows), length, captions[0].shape[1])
        text_mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for index, caption in enumerate(captions):
            text[index, : caption.shape[0]] = caption
            text_mask[index, : caption.shape[0]] = True
        batch_size = len(rows)
        height = torch.tensor([float(row[HEIGHT]) for row in rows])
        width = torch.tensor([float(row[WIDTH]) for row in rows])
        out = {
            "x": torch.stack(latents),  # (B, C, T, h, w)
            "y": text,  # (B, L, D), zero past each caption's real tokens
            "y_mask": text_mask,  # (B, L)
            "height": height,
            "width": width,
            "num_frames": torch.full((batch_size,), float(frames)),
            "fps": torch.tensor([float(row[FPS]) for row in rows]),
        }
        if self.mask_ratios:
            out["x_mask"] = torch.stack([frame_mask(frames, self.mask_ratios, generator) for _ in rows])
        return out

    def iterate(
        self, plan: EpochPlan, rank: int, seed: int, epoch: int, start_step: int = 0
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(step, batch) for this worker from `start_step` on; randomness fixed per (seed, epoch, step, rank)."""
        for step in range(start_step, plan.steps):
            generator = torch.Generator().manual_seed(seed_of(seed, epoch, step, rank))
            yield step, self.load(plan.batches[rank][step], generator)
