"""`sora bucket-report`: how a dataset falls into a config's buckets, before encoding anything."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from bucketing.assign import assign_buckets, sample_keys
from bucketing.report import MAX_EXAMPLES, Report, Tally, build_report, format_report, report_to_dict
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
from pipelines.cluster import connect
from pipelines.config import TrainConfig
from pipelines.dataset import (
    BATCH_ROWS,
    SIZE_COLUMNS,
    is_parquet,
    iter_table,
    map_table,
    normalise,
    read_metadata,
    reads_on_ray,
    resolve_paths,
    row_problems,
    sample_id,
    table_columns,
)
from pipelines.probe import ProbeError, probe


def report_from_table(
    table_path: str | Path, config: TrainConfig, progress: bool = True, address: str | None = None,
    on_ray: bool | None = None, batch_rows: int = BATCH_ROWS,
) -> Report:  # fmt: skip
    """Assign every row of a CSV/Parquet table; rows without metadata columns are probed.

    The table is never held whole: it is read a batch of rows at a time, each batch is
    validated, probed where it lacks metadata and bucketed, and only the counts and a few
    examples per drop reason are kept. A table over IN_PROCESS_BYTES (or any table when
    `address` names a cluster, or `on_ray`) is read and tallied by Ray Data tasks in the
    cluster: this process then holds the tallies only. Either way the report is the same."""
    table_path = Path(table_path).absolute()  # workers resolve relative file paths against it
    if config.root:  # and against root: the driver's, not a worker's working directory
        config = dataclasses.replace(config, root=str(Path(config.root).absolute()))
    table_columns(table_path)  # a missing file or column fails here, before Ray starts
    if on_ray is None:
        on_ray = reads_on_ray(table_path, address)
    tally = Tally(config.buckets)
    if on_ray:
        for text in _tallies_on_ray(table_path, config, progress, address, batch_rows):
            tally.merge(Tally.from_json(config.buckets, text))
        return tally.report()
    total = pq.ParquetFile(table_path).metadata.num_rows if is_parquet(table_path) else None
    with tqdm(total=total, desc="bucket", unit="row", unit_scale=True, disable=not progress) as bar:
        for frame in iter_table(table_path, batch_rows):
            tally.merge(tally_rows(frame, table_path, config))
            bar.update(len(frame))
    return tally.report()


def tally_rows(frame: pd.DataFrame, table_path: Path, config: TrainConfig) -> Tally:
    """The tally of one batch of rows (normalised), as preprocess would decide them: rows no file
    can make usable, then files probed where metadata is missing, the pixel limit, the buckets."""
    tally = Tally(config.buckets)
    paths, texts = frame["path"], frame["text"]
    usable = np.ones(len(frame), dtype=bool)
    for mask, reason in row_problems(paths, texts):
        rows = np.flatnonzero(mask.to_numpy(dtype=bool) & usable)
        tally.reject(reason, len(rows), [_name(paths.iat[row], texts.iat[row]) for row in rows[:MAX_EXAMPLES]])
        usable[rows] = False
    metadata, has_size = read_metadata(frame)
    frames, heights, widths = np.array(metadata[list(SIZE_COLUMNS)].fillna(0), dtype=np.int64).T
    unknown = np.flatnonzero(usable & ~has_size.to_numpy(dtype=bool))
    if len(unknown):
        unprobed: dict[str, list[str]] = {}
        for row, file in zip(unknown, resolve_paths(paths.iloc[unknown], table_path, config.root), strict=True):
            try:
                found = probe(file)
            except ProbeError as error:
                unprobed.setdefault(f"could not be probed: {error.reason}", []).append(paths.iat[row])
                usable[row] = False
                continue
            frames[row], heights[row], widths[row] = found.num_frames, found.height, found.width
        for reason, names in unprobed.items():
            tally.reject(reason, len(names), names)

    limit = config.preprocess.max_pixels_per_frame  # as preprocess rejects them, before decoding
    large = np.flatnonzero(usable & (heights * widths > limit))
    reason = f"too large: over {limit} pixels per frame (preprocess.max_pixels_per_frame)"
    tally.reject(reason, len(large), [paths.iat[row] for row in large[:MAX_EXAMPLES]])
    usable[large] = False

    rows = np.flatnonzero(usable)
    ids = (sample_id(path, text) for path, text in zip(paths.iloc[rows], texts.iloc[rows], strict=True))
    assignments = assign_buckets(
        config.buckets, frames[rows], heights[rows], widths[rows], sample_keys(ids), config.seed
    )
    tally.add(assignments, paths.iloc[rows].tolist())
    return tally


def _name(path: str, text: str) -> str:
    """How a rejected row is named among the examples (a row without a path, by its caption)."""
    return path if path.strip() else f"(no path; caption {text[:40]!r})"


def _tallies_on_ray(table_path: Path, config: TrainConfig, progress: bool, address: str | None,
                    batch_rows: int) -> Iterator[str]:  # fmt: skip
    """Each batch's tally, in row order, computed where Ray Data reads the table."""
    connect(address, local_cpus=os.cpu_count() or 1)
    kwargs = {"table_path": table_path, "config": config}
    for record in map_table(table_path, _tally_batch, kwargs, batch_rows, progress):
        yield record["tally"]


def _tally_batch(batch: pa.Table, table_path: Path, config: TrainConfig) -> dict[str, list[str]]:
    return {"tally": [tally_rows(normalise(batch), table_path, config).to_json()]}


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


def bucket_report(source: str | Path, config: TrainConfig, as_json: bool, plot: str | Path | None,
                  address: str | None = None) -> str:  # fmt: skip
    """The report of `source` (a CSV/Parquet table or a cache folder) as text or JSON; optionally a PNG."""
    is_cache = "://" in str(source) or Path(source).is_dir()
    report = report_from_cache(source, config) if is_cache else report_from_table(source, config, address=address)
    if plot is not None:
        from pipelines.plots import plot_report  # matplotlib only when asked for

        plot_report(report, plot)
    return json.dumps(report_to_dict(report), indent=2) + "\n" if as_json else format_report(report)
