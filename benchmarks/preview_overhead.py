"""Training previews: step time with previews on against off, the same run otherwise.

Runs `sora train` twice on one cache with the demo config (`--num-workers`, 2 by default), `log_every = 1`, a
checkpoint every `--every` steps; the second run also previews `preview_prompts` at each
checkpoint, in Ray tasks beside the workers. The step time is what the trainer logs per
step (waiting for data plus the step's compute, not checkpoint writing), so the ratio is
what previews cost the training step itself. The first `--warmup` steps are left out.

    python benchmarks/preview_overhead.py [--cache demo/cache] [--steps 60] [--every 10] [--num-workers 2]

The cache defaults to `demo/cache` (`make demo` writes it); the runs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo" / "train.py"
# Rank 0's step lines, as Ray forwards them: "(RayTrainWorker pid=...) step 12/60 epoch 1 ... samples_per_s 7.9 ..."
STEP_LINE = re.compile(r"\bstep (\d+)/\d+ epoch \d+ .*samples_per_s ([0-9.e+-]+)")


def run(cache: Path, outputs: Path, steps_per_epoch: int, args, previews: bool) -> tuple[list[float], float]:
    """Per-step seconds (from the logged samples/s and batch) and the run's wall time."""
    text = CONFIG.read_text()
    text += f"\nlog_every = 1\nckpt_every = {args.every}\neval_every = {10**6}\n"
    if not previews:
        text += "preview_prompts = None\n"
    config = outputs.with_suffix(".py")
    config.write_text(text)
    epochs = max(1, -(-args.steps // steps_per_epoch))
    command = [str(Path(sys.executable).parent / "sora"), "train", str(config), "--data-path", str(cache)]
    command += ["--outputs", str(outputs), "--num-workers", str(args.num_workers), "--epochs", str(epochs)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-3000:])
    rates = {int(step): float(rate) for step, rate in STEP_LINE.findall(result.stdout)}
    batch = args.samples_per_step
    return [batch / rate for step, rate in sorted(rates.items()) if step > args.warmup], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / "demo" / "cache")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="checkpoint (and preview) every N steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=2, help="training workers (1: a core left for previews)")
    parser.add_argument("--samples-per-step", type=int, help="bucket batch size x workers (default: 4 x workers)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipelines.cache import Cache
    from pipelines.config import load_config
    from pipelines.train import make_plan

    args.samples_per_step = args.samples_per_step or 4 * args.num_workers
    steps_per_epoch = make_plan(Cache(args.cache), load_config(CONFIG, "train"), args.num_workers).steps_per_epoch
    with tempfile.TemporaryDirectory() as folder:
        figures = {}
        for index, previews in enumerate((False, True, False, True)):  # alternated: drift hits both alike
            outputs = Path(folder) / f"run-{index}"
            times, wall = run(args.cache, outputs, steps_per_epoch, args, previews)
            figures.setdefault(previews, []).append((times, wall))
            previewed = sorted(outputs.glob("*/previews/step-*"))
            label = "on " if previews else "off"
            print(f"previews {label}: {statistics.median(times):.3f} s/step (median of {len(times)} steps), "
                  f"wall {wall:.0f} s, previews drawn: {len(previewed)}", flush=True)  # fmt: skip
    off = statistics.median([t for times, _ in figures[False] for t in times])
    on = statistics.median([t for times, _ in figures[True] for t in times])
    print(f"step time, previews on / off: {on / off:.3f} ({on:.3f} / {off:.3f} s, medians over both runs each)")


if __name__ == "__main__":
    main()
