"""How much cheaper is reading video metadata than decoding the video?

`sora preprocess` probes every row (frame count, size, fps) before it assigns buckets,
and decodes only the frames a bucket needs. This measures, side by side on the same
files in one run: metadata through decord (open + length + fps + one frame for the
size), metadata through PyAV (container header only), and a full decode with decord.

    python benchmarks/probe.py [--num 24] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import decord

from pipelines.demo_data import plan_demo, write_demo_data


def probe_decord(path: Path) -> tuple[int, int, int, float]:
    reader = decord.VideoReader(str(path))
    height, width, _ = reader[0].shape
    return len(reader), height, width, reader.get_avg_fps()


def probe_pyav(path: Path) -> tuple[int, int, int, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return (
            stream.frames,
            stream.codec_context.height,
            stream.codec_context.width,
            float(stream.average_rate),
        )


def decode_all(path: Path) -> tuple[int, int, int, float]:
    reader = decord.VideoReader(str(path))
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    return frames.shape[0], frames.shape[1], frames.shape[2], reader.get_avg_fps()


def best_time(function: Callable[[Path], object], paths: list[Path], repeat: int) -> float:
    """Best of `repeat` passes over all files, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for path in paths:
            function(path)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=24, help="demo samples to generate")
    parser.add_argument("--repeat", type=int, default=3, help="passes; the best is reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_demo_data(folder, num=args.num, seed=0, progress=False)
        videos = [item for item in plan_demo(args.num, seed=0) if item.kind == "video"]
        paths = [Path(folder) / item.path for item in videos]
        # All three methods must agree with what was written before any timing counts.
        for item, path in zip(videos, paths, strict=True):
            expected = (item.num_frames, item.height, item.width)
            for probe in (probe_decord, probe_pyav, decode_all):
                assert probe(path)[:3] == expected, (probe.__name__, path, probe(path), expected)
        frames = sum(item.num_frames for item in videos)
        full = best_time(decode_all, paths, args.repeat)
        results = {
            "decode all frames (decord)": full,
            "metadata (decord)": best_time(probe_decord, paths, args.repeat),
            "metadata (PyAV)": best_time(probe_pyav, paths, args.repeat),
        }
    print(f"{len(paths)} clips, {frames} frames, best of {args.repeat}")
    print(f"{'method':<28} {'ms/clip':>9} {'x faster than decoding':>24}")
    for name, seconds in results.items():
        print(f"{name:<28} {1000 * seconds / len(paths):>9.2f} {full / seconds:>24.1f}")


if __name__ == "__main__":
    main()
