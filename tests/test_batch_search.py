"""`sora search-batch-size`: the search logic with fake trials, and real trials on CPU against a memory budget."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bucketing.config import parse_bucket_config
from pipelines.batch_search import (
    BucketShape,
    SubprocessTrials,
    Trial,
    bucket_shapes,
    caption_channels,
    format_results,
    largest_fitting,
    matching_batch,
    parse_memory,
    search,
)
from pipelines.config import ConfigError, load_config
from tests.conftest import ROOT, run_sora

GiB = 1024**3


def debug_config(folder: Path, models: dict[str, Path], buckets: str) -> Path:
    """configs/debug/train.py with the session's debug models and another bucket_config."""
    text = (ROOT / "configs/debug/train.py").read_text()
    text = text.replace('"demo/models/vae"', f'"{models["vae"]}"')
    text = text.replace('"demo/models/t5"', f'"{models["text_encoder"]}"')
    text = re.sub(r"bucket_config = \{.*?\n\}\n", f"bucket_config = {buckets}\n", text, flags=re.S)
    path = folder / "train.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [("16GiB", 16 * GiB), ("16G", 16 * GiB), ("16gb", 16 * GiB), ("512MiB", 512 * 1024**2),
     ("1.5TiB", int(1.5 * 1024**4)), ("4096", 4096)],
)  # fmt: skip
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "16 PB"])
def test_bad_memory_sizes_are_named(text):
    with pytest.raises(ConfigError, match=f"--max-memory: {re.escape(repr(text))} is not a memory size"):
        parse_memory(text)


def fake(limit: int, seconds_per_sample: float = 0.1):
    """Trials that fit up to `limit` samples, with step time linear in the batch."""
    calls = []

    def run(batch: int) -> Trial:
        calls.append(batch)
        fits = batch <= limit
        return Trial(batch, fits, batch * 100, batch * seconds_per_sample if fits else None, "" if fits else "oom")

    return run, calls


@pytest.mark.parametrize("limit", [0, 1, 7, 13, 19, 20, 25])
def test_binary_search_finds_the_largest_fitting_batch(limit):
    candidates = tuple(range(1, 21))
    run, calls = fake(limit)
    best, trials = largest_fitting(candidates, run)
    expected = min(limit, 20)
    assert (best.batch if best else 0) == expected
    assert len(calls) <= 5 and len(trials) == len(calls)  # log2(20) rounded up
    assert all(batch in candidates for batch in calls)


def test_search_ranges_give_the_candidates():
    config = parse_bucket_config({"240p": {16: (1.0, (2, 9, 3)), 32: (0.5, (4,)), 64: (0.0, None), 1: (1.0, 8)}})

    class Holder:
        buckets = config

    shapes = {(s.resolution, s.num_frames): s for s in bucket_shapes(Holder, max_batch=5)}
    assert shapes[("240p", 16)].candidates == (2, 5, 8)
    assert shapes[("240p", 32)].candidates == (2,)  # (max,): from 2 in steps of 2, max excluded, as Open-Sora
    assert shapes[("240p", 1)].candidates == (1, 2, 3, 4, 5)  # a plain batch size: 1 .. --max-batch
    assert ("240p", 64) not in shapes  # keep_prob 0 is not searched
    assert shapes[("240p", 16)].height * shapes[("240p", 16)].width >= 240 * 426  # the largest aspect


def test_equalize_matches_the_base_step_time():
    shape = BucketShape("144p", 16, 1.0, 144, 256, tuple(range(1, 65)))
    assert matching_batch(shape.candidates, Trial(40, True, 1, 20.0), target_seconds=5.0) == 10  # 0.5 s/sample


def test_search_and_the_bucket_config_it_prints(debug_models, tmp_path):
    config = load_config(
        debug_config(tmp_path, debug_models, '{"144p": {1: (0.5, 4), 16: (1.0, (2, 32))}, "240p": {16: (0.0, None)}}'),
        "train",
    )
    limits = {1: 24, 16: 6}  # what fits, per num_frames
    seen = []

    def run(shape: BucketShape, batch: int) -> Trial:
        seen.append((shape.num_frames, batch))
        fits = batch <= limits[shape.num_frames]
        per_sample = {1: 0.2, 16: 0.8}[shape.num_frames]
        return Trial(batch, fits, batch, batch * per_sample if fits else None, "" if fits else "oom")

    lines = []
    results = search(config, run, max_batch=32, report=lines.append)
    assert {(r.shape.num_frames, r.chosen.batch) for r in results} == {(1, 24), (16, 6)}
    assert len(lines) == len(seen) and "does not fit (oom)" in "\n".join(lines)
    text = format_results(config, results, budget=GiB)
    pasted = text[text.index("bucket_config = ") + len("bucket_config = ") :]
    assert pasted.strip().startswith('{\n    "144p": {1: (0.5, 24), 16: (1.0, 6)},')
    assert '"240p": {16: (0.0, None)}' in pasted
    parse_bucket_config(eval(pasted))  # our own output: a dict literal

    # Equalised: the base (most tokens: T=16, at its largest 6: 4.8 s) sets the step time; T=1 takes
    # 4.8 / 0.2 = 24 of the 64 that would fit, checked by one more trial.
    limits[1] = 64
    seen.clear()
    equalized = search(config, run, max_batch=64, equalize=True, report=lambda line: None)
    assert {(r.shape.num_frames, r.chosen.batch) for r in equalized} == {(16, 6), (1, 24)}
    assert seen[-1] == (1, 24) and (1, 64) in seen
    with pytest.raises(ConfigError, match=r"--base 144p:8: no such bucket.*144p:16, 144p:1"):
        search(config, run, equalize=True, base="144p:8", report=lambda line: None)

    # Nothing fits: the bucket is excluded in the printed config, and the table says so.
    limits[16] = 0
    text = format_results(config, search(config, run, max_batch=4, report=lambda line: None), budget=GiB)
    assert "16: (0.0, None)" in text.split("bucket_config = ")[1].splitlines()[1]
    assert "not even batch 2 fits" in text


def test_excluded_and_empty_ranges_and_the_fixed_size_form(debug_models, tmp_path):
    """keep_prob 0 needs no batch size, searched or not; Open-Sora's (1, 1) range is empty (max excluded);
    a config without bucket_config gets `batch_size = N`."""
    buckets = '{"144p": {1: (0.5, (1, 1)), 8: (1.0, (2, 5)), 16: (0.0, (2, 8))}}'
    config = load_config(debug_config(tmp_path, debug_models, buckets), "train")
    seen = []

    def run(shape, batch):
        seen.append((shape.num_frames, batch))
        return Trial(batch, True, batch, 0.1 * batch)

    text = format_results(config, search(config, run, report=lambda line: None), budget=GiB)
    assert sorted(seen) == [(8, 2), (8, 4)]  # only the searched bucket with candidates, [2,5) in steps of 2
    assert '"144p": {1: (0.0, None), 8: (1.0, 4), 16: (0.0, None)},' in text
    assert "its search range is empty (Open-Sora's max is excluded)" in text
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    text = (tmp_path / "train.py").read_text().replace(f"bucket_config = {buckets}", "bucket_config = None")
    (fixed / "train.py").write_text(text + "num_frames = 8\nimage_size = (144, 256)\nbatch_size = 2\n")
    config = load_config(fixed / "train.py", "train")
    results = search(config, run, max_batch=3, report=lambda line: None)
    assert format_results(config, results, budget=GiB).splitlines()[-1] == "batch_size = 3"


def test_cpu_needs_a_budget_and_bad_flags_are_named(debug_models, tmp_path):
    config = debug_config(tmp_path, debug_models, '{"144p": {8: (1.0, (2, 4))}}')
    result = run_sora("search-batch-size", str(config), "--no-gpu")
    assert result.returncode == 2 and "on CPU give --max-memory (e.g. --max-memory 16GiB)" in result.stderr
    result = run_sora("search-batch-size", str(config), "--no-gpu", "--max-memory", "plenty")
    assert result.returncode == 2 and "--max-memory: 'plenty' is not a memory size" in result.stderr
    result = run_sora("search-batch-size", str(config), "--gpu", "--max-memory", "1GiB")
    assert result.returncode == 2 and "--gpu: this machine has no CUDA GPU" in result.stderr


@pytest.mark.slow
def test_real_trials_find_the_largest_batch_under_a_cpu_budget(debug_models, tmp_path):
    """Trials in fresh processes: peak memory grows with the batch; the search's answer fits the budget
    and the next candidate does not."""
    path = debug_config(tmp_path, debug_models, '{"144p": {8: (1.0, (2, 11, 4))}}')  # candidates 2, 6, 10
    config = load_config(path, "train")
    (shape,) = bucket_shapes(config, 256)
    probe = SubprocessTrials(config, use_gpu=False, budget=64 * GiB, text_dim=caption_channels(config, None), steps=1)
    try:
        small, large = probe(shape, 2), probe(shape, 10)
    finally:
        probe.close()
    assert small.fits and large.fits and large.peak_bytes > small.peak_bytes + 100 * 1024**2, (small, large)
    budget = (small.peak_bytes + large.peak_bytes) // 2
    result = run_sora("search-batch-size", str(path), "--no-gpu", "--max-memory", str(budget), "--steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = re.search(r'"144p": \{8: \(1\.0, (\d+)\)\}', result.stdout)
    assert chosen is not None, result.stdout
    batch = int(chosen[1])
    assert batch in (2, 6)
    verdicts = dict(re.findall(r"144p T=8 batch (\d+): (fits|does not fit)", result.stdout))
    assert verdicts[str(batch)] == "fits"
    assert verdicts[str(batch + 4)] == "does not fit"  # the next candidate passed the budget
