"""`sora bucket-report`: how a dataset falls into a config's buckets, before encoding anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bucketing.assign import assign_buckets, sample_keys
from bucketing.report import Report, build_report, format_report, report_to_dict
from pipelines.cache import (
    BUCKETING,
    ID,
    PATH,
    REASON,
    ROW,
    SRC_HEIGHT,
    SRC_NUM_FRAMES,
    SRC_WIDTH,
    STAGE,
    Cache,
    check_cache_matches,
)
from pipelines.config import TrainConfig
from pipelines.dataset import SIZE_COLUMNS, read_metadata, read_table, resolve_paths, sample_id
from pipelines.probe import ProbeError, probe


def report_from_table(table_path: str | Path, config: TrainConfig, progress: bool = True) -> Report:
    """Assign every row of a CSV/Parquet table; rows without metadata columns are probed."""
    table = read_table(table_path)
    paths, texts = table["path"].tolist(), table["text"].tolist()
    metadata, has_size = read_metadata(table)
    known = np.array(has_size, dtype=bool)  # grows as files are probed
    frames, heights, widths = np.array(metadata[list(SIZE_COLUMNS)].fillna(0), dtype=np.int64).T

    rejected: dict[str, list[str]] = {}
    usable = np.ones(len(paths), dtype=bool)
    for row, (path, text) in enumerate(zip(paths, texts, strict=True)):  # as preprocess validates them
        reason = "empty path" if not path.strip() else "empty caption" if not text.strip() else None
        if reason is not None:
            rejected.setdefault(reason, []).append(path or f"row {row}")
            usable[row] = False
            known[row] = True  # settled: not probed
    unknown = np.flatnonzero(~known)
    if len(unknown):
        files = resolve_paths(table["path"].iloc[unknown].astype(str), table_path, config.root)
        for row, file in zip(tqdm(unknown, desc="probe", unit="file", disable=not progress), files, strict=True):
            try:
                found = probe(file)
            except ProbeError as error:
                rejected.setdefault(f"could not be probed: {error.reason}", []).append(paths[row])
                continue
            frames[row], heights[row], widths[row] = found.num_frames, found.height, found.width
            known[row] = True

    limit = config.preprocess.max_pixels_per_frame  # as preprocess rejects them, before decoding
    large = known & usable & (heights.astype(np.int64) * widths.astype(np.int64) > limit)
    for row in np.flatnonzero(large):
        rejected.setdefault(f"too large: over {limit} pixels per frame (preprocess.max_pixels_per_frame)", []).append(
            paths[row]
        )
    rows = np.flatnonzero(known & usable & ~large)
    keys = sample_keys(sample_id(paths[row], texts[row]) for row in rows)
    assignments = assign_buckets(config.buckets, frames[rows], heights[rows], widths[rows], keys, config.seed)
    return build_report(assignments, [paths[row] for row in rows], rejected)


def report_from_cache(cache_dir: str | Path, config: TrainConfig) -> Report:
    """The report of a finished cache: its probe table through the same assignment, with the
    rows the cache rejected (unreadable files, failed decodes) counted by stage and reason."""
    cache = Cache(cache_dir)  # refuses an unfinished folder
    check_cache_matches(cache.store, config)
    probed = cache.probe_table().to_pandas()
    rejects = cache.rejects().to_pandas()
    not_bucketing = rejects[rejects[STAGE] != BUCKETING]
    rejected: dict[str, list[str]] = {}
    for stage, reason, path in zip(not_bucketing[STAGE], not_bucketing[REASON], not_bucketing[PATH], strict=True):
        rejected.setdefault(f"{stage}: {reason}", []).append(path)
    rows = probed[~probed[ROW].isin(set(not_bucketing[ROW]))]
    assignments = assign_buckets(
        config.buckets,
        rows[SRC_NUM_FRAMES].to_numpy(),
        rows[SRC_HEIGHT].to_numpy(),
        rows[SRC_WIDTH].to_numpy(),
        sample_keys(rows[ID]),
        config.seed,
    )
    return build_report(assignments, rows[PATH].tolist(), rejected)


def bucket_report(source: str | Path, config: TrainConfig, as_json: bool, plot: str | Path | None) -> str:
    """The report of `source` (a CSV/Parquet table or a cache folder) as text or JSON; optionally a PNG."""
    is_cache = "://" in str(source) or Path(source).is_dir()
    report = report_from_cache(source, config) if is_cache else report_from_table(source, config)
    if plot is not None:
        from pipelines.plots import plot_report  # matplotlib only when asked for

        plot_report(report, plot)
    return json.dumps(report_to_dict(report), indent=2) + "\n" if as_json else format_report(report)
