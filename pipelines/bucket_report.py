"""`sora bucket-report`: how a dataset falls into a config's buckets, before encoding anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from bucketing.assign import assign_buckets, sample_keys
from bucketing.config import BucketConfig, fixed_bucket_config, parse_bucket_config
from bucketing.report import Report, build_report, format_report, report_to_dict
from pipelines.config import TrainConfig
from pipelines.dataset import METADATA_COLUMNS, read_table, resolve_paths, sample_id
from pipelines.probe import ProbeError, probe


def bucket_config_of(config: TrainConfig) -> BucketConfig:
    """The buckets a training config stands for (its bucket_config, or the fixed size)."""
    # TrainConfig has validated both forms already.
    if config.bucket_config is not None:
        return parse_bucket_config(config.bucket_config, config.frame_interval)
    return fixed_bucket_config(config.image_size, config.num_frames, config.batch_size, config.frame_interval)


def report_from_table(table_path: str | Path, config: TrainConfig, progress: bool = True) -> Report:
    """Assign every row of a CSV/Parquet table; rows without metadata columns are probed."""
    table = read_table(table_path)
    paths = table["path"].astype(str).tolist()
    texts = table["text"].fillna("").astype(str).tolist()
    count = len(table)
    frames = np.zeros(count, dtype=np.int64)
    heights = np.zeros(count, dtype=np.int64)
    widths = np.zeros(count, dtype=np.int64)
    known = np.zeros(count, dtype=bool)
    if all(column in table.columns for column in METADATA_COLUMNS[:3]):
        values = table[list(METADATA_COLUMNS[:3])].apply(_to_int)
        known = values.notna().all(axis=1).to_numpy()
        filled = values.fillna(0).to_numpy(dtype=np.int64)
        frames[known], heights[known], widths[known] = filled[known].T

    rejected: dict[str, list[str]] = {}
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

    rows = np.flatnonzero(known)
    keys = sample_keys(sample_id(paths[row], texts[row]) for row in rows)
    assignments = assign_buckets(bucket_config_of(config), frames[rows], heights[rows], widths[rows], keys, config.seed)
    return build_report(assignments, [paths[row] for row in rows], rejected)


def _to_int(column: pd.Series) -> pd.Series:
    """A metadata column as nullable integers; blanks and junk become missing (then probed)."""
    return pd.to_numeric(column, errors="coerce").round().astype("Int64")


def report_from_cache(cache_dir: str | Path, config: TrainConfig) -> Report:
    """The report of a finished cache: its probe table through the same assignment, with the
    rows the cache rejected (unreadable files, failed decodes) counted by stage and reason."""
    from pipelines import cache as C
    from pipelines.preprocess import check_cache_matches

    cache = C.Cache(cache_dir)  # refuses an unfinished folder
    check_cache_matches(cache.store, config)
    probed = cache.probe_table().to_pandas()
    rejects = cache.rejects().to_pandas()
    not_bucketing = rejects[rejects[C.STAGE] != "bucket"]
    rejected: dict[str, list[str]] = {}
    for row in not_bucketing.itertuples(index=False):
        rejected.setdefault(f"{row.stage}: {row.reason}", []).append(row.path)
    rows = probed[~probed[C.ROW].isin(set(not_bucketing[C.ROW]))]
    assignments = assign_buckets(
        bucket_config_of(config),
        rows["src_num_frames"].to_numpy(),
        rows["src_height"].to_numpy(),
        rows["src_width"].to_numpy(),
        sample_keys(rows[C.ID]),
        config.seed,
    )
    return build_report(assignments, rows[C.PATH].tolist(), rejected)


def bucket_report(source: str | Path, config: TrainConfig, as_json: bool, plot: str | Path | None) -> str:
    """The report of `source` (a CSV/Parquet table or a cache folder) as text or JSON; optionally a PNG."""
    is_cache = "://" in str(source) or Path(source).is_dir()
    report = report_from_cache(source, config) if is_cache else report_from_table(source, config)
    if plot is not None:
        from pipelines.plots import plot_report  # matplotlib only when asked for

        plot_report(report, plot)
    return json.dumps(report_to_dict(report), indent=2) + "\n" if as_json else format_report(report)
