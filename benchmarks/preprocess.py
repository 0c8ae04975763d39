"""`sora preprocess` speed and cache size, measured side by side in one run.

1. Probe throughput (videos/s) on short clips: the project's probe stage against a bare
   PyAV header-reading loop and a plain decord open loop over the same files.
2. End to end on the demo data with the debug models: rows/s, and how busy the VAE and T5
   actors were during the encoding (their model time over the wall time of the encoding).
3. Cache bytes per sample against the padded layout Open-Sora's estimate assumes (text
   padded to model_max_length in fp16), measured on the demo cache and projected to T5-XXL.
4. Incremental builds: a clean build of N rows; then +10 % rows, 5 captions edited, one
   bucket's keep_prob changed, each built into the same cache folder, against a clean build of
   the same final table and config in a fresh folder: rows each encoder saw, and wall time
   (Ray started beforehand, so its start-up is in neither).

    python benchmarks/preprocess.py [--clips 300] [--rows 48] [--incremental-rows 220] [--only 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import av
import decord
import numpy as np
import pandas as pd

from pipelines.cache import LATENT_MEAN, NUM_TOKENS, REJECT_COLUMNS, REJECT_STAGE, SRC_FPS, TEXT_EMB, TEXT_SHAPE, Cache
from pipelines.config import load_config
from pipelines.demo_data import plan_demo, write_demo_data
from pipelines.preprocess import FILE, SOURCE_SIZE, preprocess, probe_batch
from sora_model.debug import write_debug_models

ROOT = Path(__file__).resolve().parent.parent
T5_XXL_DIM = 4096


def pyav_loop(paths: list[str]) -> None:
    for path in paths:
        with av.open(path) as container:
            stream = container.streams.video[0]
            _ = (stream.frames, stream.codec_context.width, stream.codec_context.height, stream.average_rate)


def decord_loop(paths: list[str]) -> None:
    for path in paths:
        reader = decord.VideoReader(path)
        _ = (len(reader), reader.get_avg_fps())


def probe_stage(paths: list[str]) -> None:
    batch = pd.DataFrame({FILE: paths, **dict.fromkeys(SOURCE_SIZE, 0), SRC_FPS: 0.0})
    for column in REJECT_COLUMNS:
        batch[column] = None
    out = probe_batch(batch)
    assert out[REJECT_STAGE].isna().all()


def best_rate(function, paths: list[str], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function(paths)
        times.append(time.perf_counter() - start)
    return len(paths) / min(times)


def incremental(folder: Path, models: dict[str, Path], rows: int) -> None:
    """Section 4: each change built incrementally and clean, side by side."""
    csv = write_demo_data(folder / "incremental", num=rows, seed=3, progress=False)
    full = pd.read_csv(csv)
    base = round(len(full) / 1.1)
    tables = {"warm-up": full.iloc[:4], "base": full.iloc[:base], "grown": full}
    edited = full.copy()
    for row in range(5):
        edited.loc[row * 7, "text"] = f"{edited.loc[row * 7, 'text']}, seen again"
    tables["edited"] = edited
    paths = {}
    for name, frame in tables.items():
        paths[name] = csv.parent / f"{name}.csv"
        frame.to_csv(paths[name], index=False)
    overrides = {"vae.from_pretrained": str(models["vae"]), "text_encoder.from_pretrained": str(models["text_encoder"])}
    buckets = load_config(ROOT / "configs/debug/train.py", "train").bucket_config
    keep_half = {"bucket_config": {**buckets, "144p": {**buckets["144p"], 1: (0.5, 4)}}}

    def build(table: str, cache: Path, **extra) -> tuple[float, object]:
        changes = {**overrides, "data_path": str(paths[table]), **extra}
        config = load_config(ROOT / "configs/debug/train.py", "train", changes, notice=lambda message: None)
        start = time.perf_counter()
        summary = preprocess(config, cache)
        return time.perf_counter() - start, summary

    build("warm-up", folder / "warm-up")  # starts Ray outside the figures
    cache = folder / "incremental-cache"
    seconds, _ = build("base", cache)
    print(f"4. incremental builds: clean build of {base} rows {seconds:.1f} s; then, into the same folder:")
    print(f"   {'change':<28} {'changed':>7} {'VAE rows':>8} {'T5 captions':>11} {'incremental':>11} {'clean':>7} "
          f"{'ratio':>6} {'target':>6}")  # fmt: skip
    changes = [
        ("+10 % rows", "grown", {}, len(full) - base),
        ("5 captions edited", "edited", {}, 5),
        ("144p T=1 keep_prob 1 -> 0.5", "edited", keep_half, 0),
    ]
    for index, (label, table, extra, changed) in enumerate(changes):
        took, summary = build(table, cache, **extra)
        clean, _ = build(table, folder / f"clean-{index}", **extra)
        share = changed / len(full)
        reuse = summary.reuse
        print(f"   {label:<28} {changed:>7} {reuse.vae_encoded:>8} {reuse.text_encoded:>11} {took:>10.1f}s "
              f"{clean:>6.1f}s {took / clean:>6.2f} {share + 0.10:>6.2f}")  # fmt: skip
    print(
        "   changed: rows whose encodings the change touches (the keep_prob change only drops rows); "
        "target: changed share + 0.10 of a clean build"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=300, help="clips for the probe comparison")
    parser.add_argument("--rows", type=int, default=48, help="demo rows for the end-to-end run")
    parser.add_argument("--incremental-rows", type=int, default=220, help="demo rows for the incremental builds")
    parser.add_argument("--only", type=int, choices=[1, 4], help="run section 1-3 or section 4 only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if args.only == 4:
            incremental(folder, write_debug_models(folder / "models"), args.incremental_rows)
            return
        write_demo_data(folder / "clips", num=args.clips, seed=1, progress=False)
        items = [item for item in plan_demo(args.clips, seed=1) if item.kind == "video"]
        paths = [str(folder / "clips" / item.path) for item in items]
        seconds = [item.num_frames / item.fps for item in items]
        rates = {
            "bare PyAV header loop": best_rate(pyav_loop, paths),
            "plain decord open loop": best_rate(decord_loop, paths),
            "probe stage (pipelines.probe)": best_rate(probe_stage, paths),
        }
        print(f"1. probe: {len(paths)} clips of {min(seconds):.1f}-{max(seconds):.1f} s, one process, best of 3")
        bare = rates["bare PyAV header loop"]
        for name, rate in rates.items():
            print(f"   {name:<32} {rate:>8.0f} videos/s  {rate / bare:>6.0%} of bare PyAV")

        models = write_debug_models(folder / "models")
        csv = write_demo_data(folder / "data", num=args.rows, seed=0, progress=False)
        config = load_config(
            ROOT / "configs/debug/train.py",
            "train",
            {"vae.from_pretrained": str(models["vae"]), "text_encoder.from_pretrained": str(models["text_encoder"]),
             "data_path": str(csv)},
            notice=lambda message: None,
        )  # fmt: skip
        start = time.perf_counter()
        summary = preprocess(config, folder / "cache")
        total = time.perf_counter() - start
        window = summary.vae_window_seconds
        print(f"2. end to end: {summary.rows_in} rows ({summary.encoded_rows} encoded) in {total:.1f} s "
              f"= {summary.rows_in / total:.1f} rows/s, including Ray and actor start-up")  # fmt: skip
        print(f"   encoding stage {summary.encode_wall_seconds:.1f} s; model time VAE {summary.vae_seconds:.1f} s, "
              f"T5 {summary.text_seconds:.1f} s")  # fmt: skip
        if window > 0:
            busy = (summary.vae_seconds + summary.text_seconds) / window
            print(f"   steady state (the VAE's first to last batch, {window:.1f} s): VAE + T5 compute {busy:.0%} "
                  f"of the wall time, pipeline overhead {max(0.0, 1 - busy):.0%}")  # fmt: skip

        cache = Cache(folder / "cache")
        shard_bytes = sum(
            cache.store.fs.get_file_info(cache.store.path(shard)).size
            for bucket in cache.buckets()
            for shard in cache.shards(bucket)
        )
        tokens, latent_bytes, text_bytes, dim = [], 0, 0, 0
        for bucket in cache.buckets():
            table = cache.table(bucket)
            tokens += table.column(NUM_TOKENS).to_pylist()
            latent_bytes += sum(len(b) for b in table.column(LATENT_MEAN).to_pylist()) * 2
            text_bytes += sum(len(b) for b in table.column(TEXT_EMB).to_pylist())
            dim = table.column(TEXT_SHAPE).to_pylist()[0][1]
        kept = len(tokens)
        max_length = config.text_encoder.model_max_length
        padded_text = kept * max_length * dim * 2  # fp16, padded to model_max_length
        per_sample = shard_bytes / kept / 1024
        latents, text = latent_bytes / kept / 1024, text_bytes / kept / 1024
        print(f"3. cache: {kept} samples, {per_sample:.1f} KiB/sample on disk "
              f"(latents {latents:.1f} KiB, text {text:.1f} KiB fp32)")  # fmt: skip
        mean_tokens = float(np.mean(tokens))
        ours = mean_tokens * dim * 2 / 1024
        padded = padded_text / kept / 1024
        print(f"   text, real tokens only: mean {mean_tokens:.1f} of model_max_length {max_length}; "
              f"fp16 {ours:.1f} KiB vs padded {padded:.1f} KiB ({max_length / mean_tokens:.1f}x smaller)")  # fmt: skip
        real = load_config(ROOT / "configs/opensora-v1-1/train/stage2.py", "train")
        xxl_padded = real.text_encoder.model_max_length * T5_XXL_DIM * 2
        xxl_ours = np.mean(tokens) * T5_XXL_DIM * 2
        print(f"   projected to T5-XXL (D={T5_XXL_DIM}, model_max_length {real.text_encoder.model_max_length}, "
              f"bf16): {xxl_ours / 1024:.0f} KiB vs padded {xxl_padded / 1024:.0f} KiB per caption")  # fmt: skip
        if args.only is None:
            incremental(folder, models, args.incremental_rows)


if __name__ == "__main__":
    main()
