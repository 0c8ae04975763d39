"""Bucket assignment throughput, and `sora bucket-report` on a million-row CSV.

Side by side in one run, on the same synthetic metadata (a realistic mix of sizes, lengths
and images) with the seed's mixed bucket_config:

- per-row: a plain per-sample loop over the same rules (the way Open-Sora 1.1 assigns
  buckets, one Python call per row, redone on every rank every epoch);
- vectorised: `bucketing.assign_buckets` on whole columns;
- the full `sora bucket-report` on a CSV with metadata columns (read, ids, assign, report).

    python benchmarks/bucketing_speed.py [--rows 1000000] [--loop-rows 100000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bucketing.assign import assign_buckets, keep_draw, sample_keys
from bucketing.config import parse_bucket_config
from pipelines.config import read_config_file

MIXED_CONFIG = Path(__file__).resolve().parent.parent / "configs/opensora-v1-1/train/mixed.py"
# The seed documents' mixed image and video table.
BUCKETS = read_config_file(MIXED_CONFIG)["bucket_config"]
SIZES = np.array(
    [(240, 426), (360, 640), (480, 854), (720, 1280), (1080, 1920), (1440, 2560), (1080, 1080), (1920, 1080)]
)


def synthetic(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    size = SIZES[rng.integers(0, len(SIZES), rows)]
    frames = np.where(rng.random(rows) < 0.25, 1, rng.integers(8, 600, rows))  # a quarter are images
    return pd.DataFrame(
        {
            "path": [f"videos/clip_{i:07d}.mp4" for i in range(rows)],
            "text": [f"a scene number {i}" for i in range(rows)],
            "num_frames": frames,
            "height": size[:, 0],
            "width": size[:, 1],
            "fps": 24,
        }
    )


def per_row_loop(config, frames, heights, widths, keys, seed) -> int:
    """One Python call per sample, as Open-Sora's get_bucket_id, same rules and draws."""
    kept = 0
    for f, h, w, key in zip(frames.tolist(), heights.tolist(), widths.tolist(), keys, strict=True):
        for entry in config:
            if h * w < entry.resolution.min_pixels:
                continue
            if f == 1:
                chosen = entry.frame_bucket(1)
            else:
                chosen = next((b for b in entry.frames if b.num_frames != 1 and f > b.num_frames), None)
            if chosen is None:
                continue
            draw = keep_draw(seed, np.array([key], np.uint64), entry.resolution.name, chosen.num_frames)[0]
            if chosen.keep_prob >= 1 or draw < chosen.keep_prob:
                kept += 1
                break
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--loop-rows", type=int, default=100_000, help="rows for the (slow) per-row loop")
    args = parser.parse_args()
    table = synthetic(args.rows)
    config = parse_bucket_config(BUCKETS)
    keys = sample_keys(table["path"] + "\0" + table["text"])
    columns = [table[name].to_numpy() for name in ("num_frames", "height", "width")]

    start = time.perf_counter()
    result = assign_buckets(config, *columns, keys, seed=42)
    vectorised = args.rows / (time.perf_counter() - start)

    n = args.loop_rows
    start = time.perf_counter()
    kept_loop = per_row_loop(config, *(column[:n] for column in columns), keys[:n], 42)
    loop = n / (time.perf_counter() - start)
    assert kept_loop == int((result.reason[:n] == 0).sum()), "the loop and the vectorised code disagree"

    with tempfile.TemporaryDirectory() as folder:
        csv = Path(folder) / "data.csv"
        table.to_csv(csv, index=False)
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cli",
                "bucket-report",
                str(csv),
                "--config",
                "configs/opensora-v1-1/train/mixed.py",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        report_seconds = time.perf_counter() - start

    print(f"{'assignment':<34} {'rows/s':>12} {'x per-row loop':>15}")
    print(f"{'per-row loop (' + str(n) + ' rows)':<34} {loop:>12,.0f} {1.0:>15.1f}")
    print(f"{'vectorised (' + str(args.rows) + ' rows)':<34} {vectorised:>12,.0f} {vectorised / loop:>15.1f}")
    print(f"sora bucket-report, {args.rows:,}-row CSV with metadata, end to end: {report_seconds:.1f} s")


if __name__ == "__main__":
    main()
