"""The bucket report: what `assign_buckets` decided, aggregated. Nothing here re-decides.

Per bucket: samples, batch size, full batches per epoch, leftover samples and share of
the training compute (latent tokens x samples). Per drop reason, largest first: count and examples.
Rows in = kept + dropped, always.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bucketing.assign import Assignments, Bucket, Drop, bucket_of_code
from bucketing.config import BucketConfig

# Latent tokens of a T x H x W sample: VAE stride 8 and patch 2 make 16 x 16 pixels a token.
PIXELS_PER_TOKEN_SIDE = 16
DROP_WARNING_SHARE = 0.3  # warn when a config drops more than this share of the rows
MAX_EXAMPLES = 3


@dataclass(frozen=True)
class BucketRow:
    bucket: Bucket
    samples: int
    full_batches: int | None  # per epoch, of the bucket's batch size (None while it is a search range)
    leftover: int | None  # samples that do not fill a last batch
    tokens_per_sample: int
    compute_share: float  # of tokens x samples over all buckets


@dataclass(frozen=True)
class DropRow:
    reason: str
    count: int
    examples: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    rows_in: int
    kept: int
    buckets: tuple[BucketRow, ...]
    drops: tuple[DropRow, ...]
    empty_buckets: tuple[str, ...]  # configured (resolution, T) that no sample reached
    warnings: tuple[str, ...]
    frame_interval: int
    aspects: dict[str, dict[str, int]] = field(default_factory=dict)  # resolution -> aspect -> samples

    @property
    def dropped(self) -> int:
        return self.rows_in - self.kept


def tokens_per_sample(bucket: Bucket) -> int:
    side = PIXELS_PER_TOKEN_SIDE
    return bucket.num_frames * (bucket.height // side) * (bucket.width // side)


def build_report(
    assignments: Assignments,
    names: Sequence[str],
    rejected: Mapping[str, Sequence[str]] | None = None,
) -> Report:
    """Aggregate assignments of rows named `names` (e.g. paths); `rejected` are rows that
    never reached assignment (reason -> names), such as files that could not be probed."""
    tally = Tally(assignments.config)
    for reason, examples in (rejected or {}).items():
        tally.reject(reason, len(examples), examples)
    tally.add(assignments, names)
    return tally.report()


@dataclass
class Tally:
    """What a report counts, gathered a batch of rows at a time: a table streamed through a
    cluster is tallied per batch, and the tallies merged in row order give the report of the
    whole table (the same as tallying it at once), with memory for counts and examples only."""

    config: BucketConfig
    kept: dict[int, int] = field(default_factory=dict)  # bucket code (Assignments.codes) -> samples
    drops: dict[str, list] = field(default_factory=dict)  # reason -> [count, examples]
    rows_in: int = 0

    def add(self, assignments: Assignments, names: Sequence[str]) -> None:
        """Count assigned rows (`names[i]` names row i in the examples of its drop reason)."""
        self.rows_in += len(assignments)
        codes = assignments.codes()
        for code, count in zip(*np.unique(codes[codes >= 0], return_counts=True), strict=True):
            self.kept[int(code)] = self.kept.get(int(code), 0) + int(count)
        for reason in Drop:
            where = np.flatnonzero(assignments.reason == reason) if reason != Drop.KEPT else ()
            if len(where):
                self._drop(reason.description, len(where), [names[i] for i in where[:MAX_EXAMPLES]])

    def reject(self, reason: str, count: int, examples: Sequence[str]) -> None:
        """Count rows that never reached assignment (an empty caption, a file that cannot be probed)."""
        self.rows_in += count
        self._drop(reason, count, examples)

    def _drop(self, reason: str, count: int, examples: Sequence[str]) -> None:
        if count:
            entry = self.drops.setdefault(reason, [0, []])
            entry[0] += count
            entry[1].extend(examples[: MAX_EXAMPLES - len(entry[1])])

    def merge(self, other: Tally) -> None:
        """Add the tally of the rows after these."""
        self.rows_in += other.rows_in
        for key, count in other.kept.items():
            self.kept[key] = self.kept.get(key, 0) + count
        for reason, (count, examples) in other.drops.items():
            self._drop(reason, count, examples)

    def to_json(self) -> str:
        kept = [[code, count] for code, count in self.kept.items()]
        return json.dumps({"rows_in": self.rows_in, "kept": kept, "drops": self.drops})

    @classmethod
    def from_json(cls, config: BucketConfig, text: str) -> Tally:
        data = json.loads(text)
        kept = {code: count for code, count in data["kept"]}
        return cls(config, kept, data["drops"], data["rows_in"])

    def report(self) -> Report:
        keys = sorted(self.kept)
        buckets = [bucket_of_code(self.config, code) for code in keys]
        counts = [self.kept[key] for key in keys]
        compute = [tokens_per_sample(bucket) * count for bucket, count in zip(buckets, counts, strict=True)]
        total_compute = sum(compute) or 1
        rows = [
            BucketRow(
                bucket=bucket,
                samples=count,
                full_batches=None if bucket.batch_size is None else count // bucket.batch_size,
                leftover=None if bucket.batch_size is None else count % bucket.batch_size,
                tokens_per_sample=tokens_per_sample(bucket),
                compute_share=cost / total_compute,
            )
            for bucket, count, cost in zip(buckets, counts, compute, strict=True)
        ]
        order = {entry.resolution.name: i for i, entry in enumerate(self.config.resolutions)}
        rows.sort(key=lambda row: (order[row.bucket.resolution], -row.bucket.num_frames, float(row.bucket.aspect)))

        # The largest drop first: an order that does not depend on how the rows were batched.
        reasons = sorted(self.drops, key=lambda reason: (-self.drops[reason][0], reason))
        drops = [DropRow(reason, self.drops[reason][0], tuple(self.drops[reason][1])) for reason in reasons]

        reached = {(row.bucket.resolution, row.bucket.num_frames) for row in rows}
        empty = tuple(
            f"{entry.resolution.name} T={bucket.num_frames}"
            for entry in self.config.resolutions
            for bucket in entry.frames
            if bucket.keep_prob > 0 and (entry.resolution.name, bucket.num_frames) not in reached
        )
        aspects: dict[str, dict[str, int]] = {}
        for row in rows:
            per_resolution = aspects.setdefault(row.bucket.resolution, {})
            per_resolution[row.bucket.aspect] = per_resolution.get(row.bucket.aspect, 0) + row.samples

        kept = sum(counts)
        report = Report(self.rows_in, kept, tuple(rows), tuple(drops), empty, (), self.config.frame_interval, aspects)
        return dataclasses.replace(report, warnings=tuple(_warnings(report)))


def _warnings(report: Report) -> list[str]:
    warnings = []
    for row in report.buckets:
        if row.full_batches == 0:
            warnings.append(
                f"bucket {row.bucket.name} yields no batch: {row.samples} samples < batch size "
                f"{row.bucket.batch_size}, so they are never trained on"
            )
    searched = [row.bucket.name for row in report.buckets if row.full_batches is None]
    if searched:
        warnings.append(
            f"the batch size of {', '.join(searched)} is a search range: `sora train` needs an integer there"
        )
    if report.rows_in and report.dropped / report.rows_in > DROP_WARNING_SHARE:
        warnings.append(
            f"the config drops {report.dropped / report.rows_in:.0%} of the data "
            f"({report.dropped} of {report.rows_in} rows); see the drop reasons"
        )
    return warnings


def report_to_dict(report: Report) -> dict:
    """A JSON-ready dict of the report."""
    return {
        "rows_in": report.rows_in,
        "kept": report.kept,
        "dropped": report.dropped,
        "frame_interval": report.frame_interval,
        "buckets": [
            {
                "name": row.bucket.name,
                "resolution": row.bucket.resolution,
                "num_frames": row.bucket.num_frames,
                "aspect": row.bucket.aspect,
                "height": row.bucket.height,
                "width": row.bucket.width,
                "batch_size": row.bucket.batch_size,
                "batch_search": row.bucket.batch_search and dataclasses.asdict(row.bucket.batch_search),
                "samples": row.samples,
                "full_batches": row.full_batches,
                "leftover": row.leftover,
                "tokens_per_sample": row.tokens_per_sample,
                "compute_share": round(row.compute_share, 6),
            }
            for row in report.buckets
        ],
        "drops": [{"reason": d.reason, "count": d.count, "examples": list(d.examples)} for d in report.drops],
        "empty_buckets": list(report.empty_buckets),
        "warnings": list(report.warnings),
    }


def format_report(report: Report) -> str:
    """The report as a plain-text table for a terminal."""
    lines = [
        f"rows in: {report.rows_in}   kept: {report.kept}   dropped: {report.dropped}   "
        f"(frame_interval {report.frame_interval})",
        "",
        f"{'bucket':<22} {'size HxW':>10} {'samples':>8} {'batch':>6} {'batches':>8} {'leftover':>9} {'compute':>8}",
    ]
    for row in report.buckets:
        size = f"{row.bucket.height}x{row.bucket.width}"
        searched = row.full_batches is None  # a batch-size search range: no batches to count yet
        batch = str(row.bucket.batch_search) if searched else row.bucket.batch_size
        batches, leftover = ("-", "-") if searched else (row.full_batches, row.leftover)
        lines.append(
            f"{row.bucket.name:<22} {size:>10} {row.samples:>8} {batch:>6} {batches:>8} {leftover:>9} "
            f"{row.compute_share:>8.1%}"
        )
    if not report.buckets:
        lines.append("(no sample is in any bucket)")
    lines += ["", f"{'dropped':<8} reason"]
    for drop in report.drops:
        lines.append(f"{drop.count:<8} {drop.reason}")
        lines.append(f"{'':<8} e.g. {', '.join(drop.examples)}")
    if not report.drops:
        lines.append("(nothing dropped)")
    if report.empty_buckets:
        lines += ["", "configured buckets no sample reached: " + ", ".join(report.empty_buckets)]
    for warning in report.warnings:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines) + "\n"
