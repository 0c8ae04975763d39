"""benchmarks/gpu_check.py, the one-call GPU check: on a CPU machine it stops before the first CUDA-only
step with a clear message, and its --smoke mode runs every row at toy sizes, so the check a lent GPU runs
has already run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_without_a_gpu_it_says_so_and_stops():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "device: CPU" in result.stdout
    assert "no CUDA device: the rest of the check needs one (`--smoke`" in result.stdout
    assert "packages: deepspeed yes, diffusers yes" in result.stdout


@pytest.mark.slow
def test_smoke_runs_every_row(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert len(rows) == 9 and all(row["value"] not in ("FAILED", "skipped") for row in rows.values()), rows
    assert rows["SDPA backends running bf16 attention"]["value"].endswith("math")
    assert "data wait" in rows["training steps, cache -> DeepSpeed (debug)"]["note"]
    assert "9 of 9 rows measured" in result.stdout
