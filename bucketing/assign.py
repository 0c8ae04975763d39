"""Which bucket each sample goes to: the seed's "Bucket Configs" rules, vectorised.

For each sample, resolutions are tried from the largest down. A sample qualifies for a
resolution when it has at least 0.8 x its pixel budget. There, an image (one frame)
can only go to the T = 1 bucket; a video takes the largest T with
`src_frames > T x frame_interval`. One keep_prob draw decides; on failure the sample
tries the next lower resolution. `(0.0, None)` never keeps, which pushes samples down.

Our difference from Open-Sora: the draw is a function of (seed, sample key, resolution,
T) only, so every worker, process and run agrees on every sample's bucket.

Everything works on whole columns (numpy), which is what makes a report over a million
rows take seconds; `assign_bucket` is the one-sample view of the same function.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from bucketing.aspect import closest_aspect_index
from bucketing.config import BatchSearch, BucketConfig


class Drop(enum.IntEnum):
    """Why a sample is in no bucket (KEPT when it is in one)."""

    KEPT = 0
    INVALID = 1
    TOO_SMALL = 2
    TOO_SHORT = 3
    NO_IMAGE_BUCKET = 4
    EXCLUDED = 5
    NOT_KEPT = 6

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Drop.KEPT: "kept",
    Drop.INVALID: "invalid metadata (frames, height and width must be at least 1)",
    Drop.TOO_SMALL: "too small for every resolution (under 0.8 x the smallest pixel budget)",
    Drop.TOO_SHORT: "too short for every frame count at its resolutions (needs frames > T x frame_interval)",
    Drop.NO_IMAGE_BUCKET: "an image, but no image bucket (T = 1) at its resolutions",
    Drop.EXCLUDED: "only reached buckets that exclude it (keep_prob 0)",
    Drop.NOT_KEPT: "not kept by any keep_prob draw",
}


@dataclass(frozen=True)
class Bucket:
    """Where a sample goes: the three levels, its target size and batch size."""

    resolution: str
    num_frames: int
    aspect: str
    height: int
    width: int
    batch_size: int | None  # None when the config gives a search range instead
    batch_search: BatchSearch | None = None

    @property
    def name(self) -> str:
        """Folder name in the cache: `<res>-<T>f-<ar>`."""
        return f"{self.resolution}-{self.num_frames}f-{self.aspect}"


def parse_bucket_name(name: str) -> tuple[str, int, str]:
    """(resolution, T, aspect) of a bucket name `<res>-<T>f-<ar>`: the inverse of `Bucket.name`."""
    parts = name.split("-")
    if len(parts) != 3 or not parts[1].endswith("f") or not parts[1][:-1].isdigit():
        raise ValueError(f"not a bucket name (<resolution>-<T>f-<aspect>): {name!r}")
    return parts[0], int(parts[1][:-1]), parts[2]


@dataclass(frozen=True)
class Assignments:
    """The assignment of N samples, as columns. Dropped rows have resolution -1."""

    config: BucketConfig
    resolution: np.ndarray  # (N,) int16: index into config.resolutions, -1 if dropped
    num_frames: np.ndarray  # (N,) int32: T, 0 if dropped
    aspect: np.ndarray  # (N,) int16: index into the resolution's aspect keys, -1 if dropped
    reason: np.ndarray  # (N,) int8: a Drop value

    def __len__(self) -> int:
        return len(self.reason)

    def bucket(self, row: int) -> Bucket | Drop:
        """The bucket of one row, or why it has none."""
        if self.reason[row] != Drop.KEPT:
            return Drop(int(self.reason[row]))
        return bucket_of_code(self.config, int(self.codes()[row]))

    def codes(self) -> np.ndarray:
        """One int64 per row naming its (resolution, T, aspect), so that grouping rows by bucket
        is one np.unique (-1 for a dropped row); `bucket_of_code` turns a code back into its Bucket."""
        codes = (
            self.resolution.astype(np.int64) << 40
            | self.num_frames.astype(np.int64) << 16
            | self.aspect.astype(np.int64) & 0xFFFF
        )
        return np.where(self.reason == Drop.KEPT, codes, -1)


def bucket_of_code(config: BucketConfig, code: int) -> Bucket:
    """The bucket an `Assignments.codes` value names."""
    entry = config.resolutions[code >> 40]
    num_frames = (code >> 16) & 0xFFFFFF
    key = list(entry.resolution.table)[code & 0xFFFF]
    height, width = entry.resolution.table[key]
    frame_bucket = entry.frame_bucket(num_frames)
    return Bucket(entry.resolution.name, num_frames, key, height, width, frame_bucket.batch_size, frame_bucket.search)


def sample_key(sample_id: str) -> int:
    """A 64-bit key of a sample id, the same in every process (unlike Python's hash())."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "little")


def sample_keys(sample_ids: Iterable[str]) -> np.ndarray:
    """`sample_key` of many ids, as a uint64 array."""
    return np.fromiter((sample_key(sample_id) for sample_id in sample_ids), dtype=np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective scramble of uint64 values (wraps on purpose)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def keep_draw(seed: int, keys: np.ndarray, resolution: str, num_frames: int) -> np.ndarray:
    """Uniform numbers in [0, 1), one per key, fixed by (seed, key, resolution, T)."""
    salt = np.uint64(sample_key(f"{seed}/{resolution}/{num_frames}"))
    mixed = _mix(_mix(np.asarray(keys, dtype=np.uint64) ^ salt))
    return (mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53


def assign_buckets(
    config: BucketConfig,
    num_frames: np.ndarray,
    height: np.ndarray,
    width: np.ndarray,
    keys: np.ndarray,
    seed: int,
) -> Assignments:
    """Assign N samples (source frame counts, heights, widths, sample keys) to buckets."""
    frames = np.asarray(num_frames, dtype=np.int64)
    height = np.asarray(height, dtype=np.int64)
    width = np.asarray(width, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.uint64)
    count = len(frames)
    pixels = height * width
    is_image = frames == 1
    valid = (frames >= 1) & (height >= 1) & (width >= 1)

    resolution = np.full(count, -1, dtype=np.int16)
    chosen_frames = np.zeros(count, dtype=np.int32)
    aspect = np.full(count, -1, dtype=np.int16)
    pending = valid.copy()
    # What each sample reached, to say why it was dropped.
    fits_a_size = np.zeros(count, dtype=bool)
    fits_a_length = np.zeros(count, dtype=bool)
    had_a_chance = np.zeros(count, dtype=bool)

    for index, entry in enumerate(config.resolutions):
        qualifies = pending & (pixels >= entry.resolution.min_pixels)
        if not qualifies.any():
            continue
        fits_a_size |= qualifies
        # The T each qualifying sample would take at this resolution (0: none).
        target = np.zeros(count, dtype=np.int32)
        if entry.frame_bucket(1) is not None:
            target[qualifies & is_image] = 1
        for bucket in entry.frames:  # largest T first
            if bucket.num_frames > 1:
                fits = qualifies & ~is_image & (target == 0) & (frames > bucket.num_frames * config.frame_interval)
                target[fits] = bucket.num_frames
        fits_a_length |= target > 0

        kept_here = np.zeros(count, dtype=bool)
        for bucket in entry.frames:
            rows = np.flatnonzero(target == bucket.num_frames)
            if len(rows) == 0 or bucket.keep_prob <= 0.0:
                continue
            had_a_chance[rows] = True
            if bucket.keep_prob < 1.0:
                draw = keep_draw(seed, keys[rows], entry.resolution.name, bucket.num_frames)
                rows = rows[draw < bucket.keep_prob]
            kept_here[rows] = True
            chosen_frames[rows] = bucket.num_frames
        if kept_here.any():
            resolution[kept_here] = index
            pending &= ~kept_here
            keys_of_table = list(entry.resolution.table)
            aspect[kept_here] = closest_aspect_index(height[kept_here], width[kept_here], keys_of_table)

    reason = np.full(count, Drop.KEPT, dtype=np.int8)
    dropped = resolution < 0
    reason[dropped & had_a_chance] = Drop.NOT_KEPT
    reason[dropped & ~had_a_chance & fits_a_length] = Drop.EXCLUDED
    reason[dropped & ~fits_a_length & is_image] = Drop.NO_IMAGE_BUCKET
    reason[dropped & ~fits_a_length & ~is_image] = Drop.TOO_SHORT
    reason[dropped & ~fits_a_size] = Drop.TOO_SMALL
    reason[~valid] = Drop.INVALID
    return Assignments(config, resolution, chosen_frames, aspect, reason)


def assign_bucket(config: BucketConfig, num_frames: int, height: int, width: int, key: int, seed: int) -> Bucket | Drop:
    """The bucket of one sample (the same function as `assign_buckets`, for one row)."""
    one = assign_buckets(
        config,
        np.array([num_frames]),
        np.array([height]),
        np.array([width]),
        np.array([key], np.uint64),
        seed,
    )
    return one.bucket(0)
