"""`sora bucket-report` on a table of millions of rows: the driver's peak memory and rows/s.

A synthetic Parquet (or CSV) table with metadata columns (nothing to probe) and ~100-character
captions is bucketed under the seed's mixed bucket_config three ways, each in a fresh process
that reports its own peak resident memory (ru_maxrss):

- whole: the table read into one pandas frame (`read_table`: the same pyarrow reader, its
  batches concatenated) and bucketed in one go, as `sora bucket-report` did before it
  streamed (its reader then was pandas' own), on the smaller table (`--whole-rows`), and on
  the large one too with `--whole-on-large`;
- here: `report_from_table` streaming the table in batches in the command's own process;
- ray: `report_from_table` with Ray Data tasks reading and bucketing the table (a local
  instance); the figure is the driver's (the command's) process;
- with `--plan`, `sora preprocess`'s planning on both tables (read, validate, stat every
  file, find repeated rows, bucket, plan shards and keys, write probe.arrow), streamed like
  the report, with its whole-table steps on ids spilled to disk; once with the table read,
  digested and validated in the command's process, once in Ray Data tasks (as it is for a
  table over 256 MiB, or with `--address`).

All three must give the same report on the same table (checked). Printed: rows, seconds,
rows/s, peak MB, and rows/s and memory relative to `whole`.

    python benchmarks/large_table.py [--rows 10000000] [--whole-rows 1000000] [--format parquet] [--plan]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/opensora-v1-1/train/mixed.py"
SIZES = np.array(
    [(240, 426), (360, 640), (480, 854), (720, 1280), (1080, 1920), (1440, 2560), (1080, 1080), (1920, 1080)]
)
CHUNK = 500_000
MARK = "result: "  # a variant's result line (Ray prints to stdout too)


def write_table(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` synthetic rows, written a chunk at a time (this process never holds the table)."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        index = range(start, start + n)
        size = SIZES[rng.integers(0, len(SIZES), n)]
        frames = np.where(rng.random(n) < 0.25, 1, rng.integers(8, 600, n))  # a quarter are images
        chunk = pa.table(
            {
                "path": [f"videos/part-{i // 10000:04d}/clip_{i:08d}.mp4" for i in index],
                "text": [
                    f"clip {i}: a slow pan across a harbour at dusk, small boats rocking on the water" for i in index
                ],
                "num_frames": frames,
                "height": size[:, 0],
                "width": size[:, 1],
                "fps": np.full(n, 24.0),
            }
        )
        if path.suffix == ".parquet":
            writer = writer or pq.ParquetWriter(path, chunk.schema)
            writer.write_table(chunk, row_group_size=100_000)
        else:
            with path.open("ab") as file:
                pacsv.write_csv(chunk, file, pacsv.WriteOptions(include_header=start == 0))
    if writer is not None:
        writer.close()


def run_variant(variant: str, table: str) -> None:
    """In a fresh process: bucket `table` the `variant` way; print seconds, peak MB and the report's digest."""
    sys.path.insert(0, str(ROOT))
    from bucketing.report import format_report
    from pipelines.bucket_report import report_from_table, tally_rows
    from pipelines.config import load_config
    from pipelines.dataset import read_table

    config = load_config(CONFIG, "train")
    start = time.perf_counter()
    if variant.startswith("preprocess-plan"):
        print(MARK + json.dumps(plan_preprocess(Path(table), config, start, on_ray=variant.endswith("ray"))))
        return
    if variant == "whole":
        report = tally_rows(read_table(table), Path(table).absolute(), config).report()
    else:
        report = report_from_table(table, config, progress=False, on_ray=variant == "ray")
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    digest = hashlib.sha256(format_report(report).encode()).hexdigest()[:16]
    kept = {row.bucket.name: row.samples for row in report.buckets if row.samples}
    print(MARK + json.dumps({"rows": report.rows_in, "seconds": seconds, "peak_mb": peak_mb, "report": digest,
                             "kept": kept}))  # fmt: skip


def plan_preprocess(table: Path, config, start: float, on_ray: bool) -> dict:
    """`sora preprocess` up to its encoding: digest the table, then read it again to validate,
    bucket, plan the shards and the encoding keys and write probe.arrow (into a scratch cache
    beside the table). The result names the rows kept per bucket, to compare with the report."""
    from pipelines import cache, preprocess
    from pipelines.dataset import table_columns
    from pipelines.reuse import Encodings

    columns = table_columns(table)
    if on_ray:
        preprocess._connect_and_count_gpus(None)
    digest, rows_in = preprocess._table_digest(table, columns, None, on_ray)
    parts = cache.fingerprint(config, digest)
    store = cache.Store(table.parent / "scratch-cache")
    with tempfile.TemporaryDirectory(dir=table.parent) as scratch:
        rows = preprocess._read_table(store, "plan", table, config, on_ray)
        preprocess._plan(store, "plan", rows, rows_in, config, None, Encodings(), parts, preprocess.Reuse(),
                         Path(scratch))  # fmt: skip
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows, kept = 0, {}
    for batch in store.iter_batches("plan/probe.arrow"):
        rows += batch.num_rows
        for found in batch.column("bucket").value_counts().to_pylist():
            if found["values"] is not None:
                kept[found["values"]] = kept.get(found["values"], 0) + found["counts"]
    store.delete_dir("plan")
    return {"rows": rows, "seconds": seconds, "peak_mb": peak_mb, "report": "-", "kept": kept}


def measure(variant: str, table: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--variant", variant, str(table)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {variant} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    found = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if not found:
        raise SystemExit(f"the {variant} run printed no result:\n{done.stdout}\n{done.stderr}")
    return json.loads(found[-1][len(MARK) :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the large table")
    parser.add_argument("--whole-rows", type=int, default=1_000_000, help="rows of the table read whole")
    parser.add_argument("--whole-on-large", action="store_true", help="also read the large table whole")
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    parser.add_argument("--plan", action="store_true", help="also time sora preprocess's planning (whole-rows table)")
    variants = ["whole", "here", "ray", "preprocess-plan", "preprocess-plan-ray"]
    parser.add_argument("--variant", choices=variants, help=argparse.SUPPRESS)
    parser.add_argument("table", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.table)
        return

    with tempfile.TemporaryDirectory() as folder:
        small, large = Path(folder) / f"small.{args.format}", Path(folder) / f"large.{args.format}"
        write_table(small, args.whole_rows)
        write_table(large, args.rows)
        runs = [(f"whole, {args.whole_rows:,} rows", "whole", small)]
        runs += [(f"{variant}, {args.whole_rows:,} rows", variant, small) for variant in ("here", "ray")]
        if args.plan:
            runs.append((f"preprocess plan, {args.whole_rows:,}", "preprocess-plan", small))
            runs.append((f"plan on ray, {args.whole_rows:,}", "preprocess-plan-ray", small))
        if args.whole_on_large:
            runs.append((f"whole, {args.rows:,} rows", "whole", large))
        runs += [(f"{variant}, {args.rows:,} rows", variant, large) for variant in ("here", "ray")]
        if args.plan:
            runs.append((f"preprocess plan, {args.rows:,}", "preprocess-plan", large))
            runs.append((f"plan on ray, {args.rows:,}", "preprocess-plan-ray", large))
        results = [(name, measure(variant, table)) for name, variant, table in runs]
        sizes = {"small": small.stat().st_size, "large": large.stat().st_size}

    base = results[0][1]
    base_speed = base["rows"] / base["seconds"]
    same = {r["report"] for name, r in results if f"{args.whole_rows:,} rows" in name}
    print(f"{args.format} tables: {sizes['small'] / 2**20:,.0f} MB and {sizes['large'] / 2**20:,.0f} MB on disk")
    print(f"{'variant':<26} {'seconds':>8} {'rows/s':>11} {'x whole':>8} {'peak MB':>8} {'x whole':>8}")
    for name, r in results:
        speed = r["rows"] / r["seconds"]
        print(
            f"{name:<26} {r['seconds']:>8.1f} {speed:>11,.0f} {speed / base_speed:>8.2f} "
            f"{r['peak_mb']:>8,.0f} {r['peak_mb'] / base['peak_mb']:>8.2f}"
        )
    print(f"same report from every variant on the {args.whole_rows:,}-row table: {len(same) == 1}")
    for rows in (args.whole_rows, args.rows):
        kept = [r["kept"] for name, r in results if name.endswith(f"{rows:,} rows") or name.endswith(f"{rows:,}")]
        print(f"same rows per bucket from the report and the preprocess plan, {rows:,} rows: "
              f"{all(k == kept[0] for k in kept)}")  # fmt: skip


if __name__ == "__main__":
    main()
