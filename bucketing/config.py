"""`bucket_config = {resolution: {num_frames: (keep_prob, batch_size)}}`, parsed and checked.

A config without bucket_config (Open-Sora 1.0's fixed size) is one bucket: every sample
is resized and centre-cropped to `image_size`, `num_frames` frames, kept with probability 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bucketing.aspect import RESOLUTIONS, Resolution, round_to_multiple


class BucketConfigError(ValueError):
    """A bucket_config entry that cannot be used; the message names the entry."""


# Open-Sora's batch-size search (scripts/misc/search_bs.py) starts at 2 and steps by 2 by default.
SEARCH_START = 2
SEARCH_STEP = 2


@dataclass(frozen=True)
class BatchSearch:
    """A batch-size search range, Open-Sora's `(max,)`, `(min, max)` or `(min, max, step)` form.

    As in Open-Sora's scripts/misc/search_bs.py, `max` is excluded: (2, 8) tries 2, 4, 6, and
    (1, 1) tries nothing (the bucket gets no batch size).
    """

    low: int
    high: int
    step: int = SEARCH_STEP

    @property
    def candidates(self) -> tuple[int, ...]:
        return tuple(range(self.low, self.high, self.step))

    def __str__(self) -> str:
        return f"[{self.low},{self.high})" + (f"/{self.step}" if self.step != SEARCH_STEP else "")


@dataclass(frozen=True)
class FrameBucket:
    """One (resolution, num_frames) entry: its keep probability and per-worker batch size.

    keep_prob is compared with a uniform draw, as Open-Sora does: 1 or more always keeps.
    """

    num_frames: int
    keep_prob: float
    batch_size: int | None  # None when keep_prob == 0 (the entry excludes) or the size is searched
    search: BatchSearch | None = None  # the range to search a batch size in, instead of batch_size


@dataclass(frozen=True)
class ResolutionBuckets:
    """A resolution with its frame buckets, largest T first."""

    resolution: Resolution
    frames: tuple[FrameBucket, ...]

    def frame_bucket(self, num_frames: int) -> FrameBucket | None:
        return next((bucket for bucket in self.frames if bucket.num_frames == num_frames), None)


@dataclass(frozen=True)
class BucketConfig:
    """All buckets of a config, largest resolution first (the order samples try them in)."""

    resolutions: tuple[ResolutionBuckets, ...]
    frame_interval: int = 1

    def __iter__(self):
        return iter(self.resolutions)

    def batch_size(self, resolution: str, num_frames: int) -> int | None:
        """The per-worker batch size of (resolution, T); None when the config has no such bucket."""
        entry = next((e for e in self.resolutions if e.resolution.name == resolution), None)
        found = entry.frame_bucket(num_frames) if entry else None
        return found.batch_size if found else None

    def searched(self) -> list[str]:
        """The entries whose batch size is a search range, as `bucket_config['240p'][16]: 2..8`."""
        return [
            f"bucket_config[{entry.resolution.name!r}][{bucket.num_frames}]: {bucket.search}"
            for entry in self.resolutions
            for bucket in entry.frames
            if bucket.search is not None
        ]

    def require_batch_sizes(self) -> None:
        """Raise when a batch size is still a search range: training needs numbers."""
        if searched := self.searched():
            raise BucketConfigError(
                "training needs an integer batch size per bucket; these are Open-Sora's batch-size search "
                f"ranges: {'; '.join(searched)}. `sora search-batch-size CONFIG` finds the largest that fits "
                "this machine and prints a bucket_config with them written in"
            )


def parse_bucket_config(raw: Mapping[Any, Any], frame_interval: int = 1) -> BucketConfig:
    """Check a bucket_config dict and order it for assignment."""
    if not isinstance(raw, Mapping) or not raw:
        raise BucketConfigError("bucket_config must be a non-empty dict {resolution: {num_frames: (keep_prob, bs)}}")
    parsed = []
    for name, frames in raw.items():
        if name not in RESOLUTIONS:
            raise BucketConfigError(
                f"bucket_config: unknown resolution {name!r}; valid names: {', '.join(RESOLUTIONS)}"
            )
        if not isinstance(frames, Mapping) or not frames:
            raise BucketConfigError(
                f"bucket_config[{name!r}]: expected a non-empty dict {{num_frames: (keep_prob, bs)}}"
            )
        buckets = [_frame_bucket(name, num_frames, value) for num_frames, value in frames.items()]
        buckets.sort(key=lambda bucket: -bucket.num_frames)
        parsed.append(ResolutionBuckets(RESOLUTIONS[name], tuple(buckets)))
    parsed.sort(key=lambda entry: -entry.resolution.budget)
    return BucketConfig(tuple(parsed), frame_interval)


def _frame_bucket(name: str, num_frames: Any, value: Any) -> FrameBucket:
    where = f"bucket_config[{name!r}][{num_frames!r}]"
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise BucketConfigError(f"{where}: num_frames must be a positive integer, got {num_frames!r}")
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise BucketConfigError(f"{where}: expected (keep_prob, batch_size), got {value!r}")
    keep_prob, batch_size = value
    if isinstance(keep_prob, bool) or not isinstance(keep_prob, int | float) or not keep_prob >= 0.0:
        raise BucketConfigError(f"{where}: keep_prob must be a number >= 0 (1 or more keeps all), got {keep_prob!r}")
    if isinstance(batch_size, tuple | list):
        search = _batch_search(where, batch_size)
        # A bucket that excludes (keep_prob 0) needs no batch size, searched or not.
        return FrameBucket(num_frames, float(keep_prob), None, search if keep_prob > 0 else None)
    if batch_size is None:
        if keep_prob > 0:
            raise BucketConfigError(
                f"{where}: batch_size is None but keep_prob is {keep_prob}; "
                "use (0.0, None) to exclude the bucket, or give a batch size"
            )
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BucketConfigError(f"{where}: batch_size must be a positive integer or None, got {batch_size!r}")
    return FrameBucket(num_frames, float(keep_prob), batch_size)


def _batch_search(where: str, value: tuple | list) -> BatchSearch:
    """Open-Sora's search forms: (max,), (min, max) or (min, max, step), positive integers, min <= max
    ((max,) starts at SEARCH_START; a range may be empty)."""
    if not 1 <= len(value) <= 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise BucketConfigError(
            f"{where}: a batch-size search range is (max,), (min, max) or (min, max, step) of positive integers, "
            f"got {tuple(value)!r}"
        )
    if len(value) == 1:
        low, high, step = SEARCH_START, value[0], SEARCH_STEP
    else:
        low, high, step = (*value, SEARCH_STEP)[:3]
    if low > high and len(value) > 1:
        raise BucketConfigError(f"{where}: batch-size search range {tuple(value)!r} has min {low} > max {high}")
    return BatchSearch(low, high, step)


def fixed_bucket_config(
    image_size: tuple[int, int], num_frames: int, batch_size: int, frame_interval: int = 1
) -> BucketConfig:
    """Open-Sora 1.0's fixed size as one bucket: any size qualifies (it is resized), keep all."""
    height, width = (round_to_multiple(side) for side in image_size)
    key = f"{height / width:.2f}"
    resolution = Resolution(name=f"{height}x{width}", budget=0, table={key: (height, width)})
    frames = (FrameBucket(num_frames, 1.0, batch_size),)
    return BucketConfig((ResolutionBuckets(resolution, frames),), frame_interval)
