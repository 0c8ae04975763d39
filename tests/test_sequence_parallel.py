"""Sequence parallelism (`plugin="zero2-seq"`): split models equal one device, and `sora train`
with sp_size=2 on 2 workers trains what sp_size=1 on 1 worker trains, resumes, and refuses
what it cannot split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.cache import Cache
from pipelines.config import ConfigError, load_config
from pipelines.demo_data import plan_demo
from pipelines.sequence_parallel import Layout, TimeSplit, check_model, check_time_split, check_world, layout
from pipelines.train import check_sequence_parallel, make_plan
from tests.conftest import DEMO_NUM, ROOT, run_sora, write_config

OPENSORA_SP = ROOT / "tests" / "fixtures" / "opensora" / "v1_0_train_64x512x512_sp.py"


def losses(experiment: Path, name: str = "losses.jsonl") -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in map(json.loads, (experiment / name).read_text().splitlines())}


# --------------------------------------------------------------------------- layout and checks


def test_ranks_of_a_group_share_the_dp_rank():
    places = [layout(rank, 4, 2) for rank in range(4)]
    assert [(p.dp_rank, p.sp_rank) for p in places] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {p.dp_size for p in places} == {2}
    assert Layout(0, 3).dp_size == 3  # sp_size 1: every rank is its own group


def test_workers_must_make_whole_groups():
    with pytest.raises(ConfigError, match=r"sp_size=2 needs a number of workers divisible by it .* got 3: use"):
        check_world(3, 2)


def test_heads_must_divide_among_the_ranks_and_dit_is_refused():
    check_model("STDiT-XL/2", 2)  # 16 heads
    with pytest.raises(ConfigError, match="model debug has 4 heads, not divisible by sp_size=3"):
        check_model("debug", 3)
    with pytest.raises(ConfigError, match="model DiT-XL/2 attends over all frames at once"):
        check_model("DiT-XL/2", 2)


def test_training_checks_before_anything_starts(tmp_path, debug_models):
    config = load_config(write_config(tmp_path, debug_models, **{'plugin = "zero2"': 'plugin = "zero2-seq"'}), "train")
    check_sequence_parallel(config, 1)  # sp_size 1 under zero2-seq: one group of one
    text = (tmp_path / "train.py").read_text().replace("sp_size = 1", "sp_size = 2")
    (tmp_path / "train.py").write_text(text)
    with pytest.raises(ConfigError, match="got 1: use --num-workers 2"):
        check_sequence_parallel(load_config(tmp_path / "train.py", "train"), 1)


def test_time_split_needs_frames_that_divide_among_the_ranks():
    check_time_split(["144p-8f-0.56", "240p-16f-1.00"], "debug", 2)
    with pytest.raises(ConfigError, match=r"sp_split='time' with sp_size=2: the frames of bucket\(s\) 144p-1f-0.56, "
                       r"144p-3f-0.56 do not divide .* or use sp_split='space'"):  # fmt: skip
        check_time_split(["144p-1f-0.56", "144p-3f-0.56", "144p-8f-0.56"], "debug", 2)
    split = TimeSplit(None, 2)
    split.frames = 3  # a latent the start check did not see (the model called directly)
    with pytest.raises(ConfigError, match=r"a latent of 3 frames .* does not divide among sp_size=2 ranks"):
        split.split(torch.zeros(1, 3 * 4, 8))


def test_training_refuses_a_time_split_of_the_image_buckets_before_starting(clean_cache, debug_models, tmp_path):
    config = load_config(sp_config(tmp_path, debug_models, 2, "time"), "train")
    with pytest.raises(ConfigError, match=r"sp_split='time' with sp_size=2: the frames of bucket\(s\) .*-1f-"):
        make_plan(Cache(clean_cache[0]), config, 2)


# --------------------------------------------------------------------------- the split model


@pytest.mark.slow
def test_split_model_gives_the_one_device_loss_and_gradients():
    """tests/sp_ranks.py: 2 gloo ranks; STDiT2 and STDiT split by space (a padded token grid
    (15 -> 16), an image) and by time; a frame mask, activation checkpointing. Gradients averaged
    over the group as DeepSpeed does. Split by space, spatial attention exchanges; by time, as in
    Open-Sora 1.0, temporal attention and cross-attention."""
    result = subprocess.run([sys.executable, "-m", "tests.sp_ranks", "29561"], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 8
    for report in reports:
        assert report["state_keys_equal"], report
        assert report["loss_diff"] < 1e-6 * report["loss"], report
        assert report["grad_rel_diff"] < 1e-5, report
        split = report["case"][-1]
        assert report["exchanged"] == (["attn"] if split == "space" else ["attn_temp", "cross_attn"]), report


# --------------------------------------------------------------------------- sora train


def sp_config(folder: Path, models: dict, sp_size: int, split: str = "space") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(
        folder,
        models,
        **{
            'plugin = "zero2"': 'plugin = "zero2-seq"',
            "sp_size = 1": f"sp_size = {sp_size}",
            "log_every = 5": "log_every = 1",
            "ckpt_every = 20": "ckpt_every = 4",
            "lr = 1e-4": "lr = 1e-3",
            "\nload = None": f"\nload = None\neval_fraction = 0.25\neval_every = 2\nsp_split = {split!r}",
        },
    )


def train(config: Path, cache: Path, outputs: Path, workers: int, epochs: int, *extra: str) -> Path:
    args = ["train", str(config), "--data-path", str(cache), "--outputs", str(outputs)]
    result = run_sora(*args, "--num-workers", str(workers), "--epochs", str(epochs), *extra)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return Path(result.stdout.split("experiment: ")[-1].split()[0])


@pytest.fixture(scope="module")
def runs(clean_cache, debug_models, tmp_path_factory) -> dict:
    """The demo cache trained for 2 epochs three ways: 1 worker, 2 workers with sp_size=2, and
    the latter resumed from its first checkpoint."""
    cache = clean_cache[0]
    folder = tmp_path_factory.mktemp("sp")
    one = train(sp_config(folder / "one", debug_models, 1), cache, folder / "one" / "out", 1, 2)
    split_config = sp_config(folder / "split", debug_models, 2)
    split = train(split_config, cache, folder / "split" / "out", 2, 2)
    resumed = folder / "resumed"
    shutil.copytree(split / "checkpoints" / "step-0000004", resumed / "checkpoints" / "step-0000004")
    train(split_config, cache, folder / "unused", 2, 2, "--load", str(resumed))
    return {"one": one, "split": split, "resumed": resumed}


@pytest.mark.slow
def test_two_workers_with_sp_2_train_what_one_worker_trains(runs):
    one, split = losses(runs["one"]), losses(runs["split"])
    assert len(one) >= 6 and sorted(one) == sorted(split)
    for step, loss in one.items():
        assert split[step] == pytest.approx(loss, rel=1e-5), step
    one_eval, split_eval = losses(runs["one"], "eval_losses.jsonl"), losses(runs["split"], "eval_losses.jsonl")
    assert one_eval.keys() == split_eval.keys()
    for step, loss in one_eval.items():
        assert split_eval[step] == pytest.approx(loss, rel=1e-5), step
    info = json.loads((runs["split"] / "worker.json").read_text())
    assert (info["world_size"], info["sp_size"]) == (2, 2)
    # ZeRO-2 shards the optimizer over the whole world: one shard per worker.
    assert len(list((runs["split"] / "checkpoints" / "step-0000004" / "deepspeed").rglob("*optim_states.pt"))) == 2


@pytest.mark.slow
def test_sp_run_resumes_with_the_same_losses(runs):
    split, resumed = losses(runs["split"]), losses(runs["resumed"])
    assert sorted(resumed) == [step for step in sorted(split) if step > 4]
    for step, loss in resumed.items():
        assert loss == pytest.approx(split[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_resuming_with_another_sp_size_continues_from_the_global_position(runs, clean_cache, debug_models, tmp_path):
    """Written by 2 workers in one SP group (1 DP group: a batch a step), resumed by 2 workers
    without SP (2 DP groups): it continues at step 5, from the checkpoint's place in the epoch."""
    config = sp_config(tmp_path / "config", debug_models, 1)
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["split"] / "checkpoints" / "step-0000004", resumed / "checkpoints" / "step-0000004")
    assert json.loads((resumed / "checkpoints" / "step-0000004" / "state.json").read_text())["global_step"] == 4
    args = ["train", str(config), "--data-path", str(clean_cache[0]), "--load", str(resumed)]
    result = run_sora(*args, "--num-workers", "2", "--epochs", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    # ZeRO shards over the whole world (2 workers both times): the optimizer's state loads whole.
    assert "the optimizer's moments start afresh" not in result.stdout + result.stderr
    steps = [json.loads(line)["step"] for line in (resumed / "losses.jsonl").read_text().splitlines()]
    assert steps[0] == 5


@pytest.mark.slow
def test_opensora_sp_file_in_debug_size_preprocesses_and_trains_stdit(demo_csv, debug_models, tmp_path):
    """Open-Sora 1.0's 64x512x512-sp.py with debug models, 64x64 and 4 frames (the demo clips are
    shorter than its 16 x 3): STDiT split over 2 workers, by space and by time (Open-Sora 1.0's
    layout), its loss that of 1 worker."""
    text = OPENSORA_SP.read_text()
    for old, new in {
        '"STDiT-XL/2"': '"debug-stdit"',
        "num_frames=16": "num_frames=4",
        "frame_interval=3": "frame_interval=1",
        "image_size=(512, 512)": "image_size=(64, 64)",
        "enable_flashattn=True": "enable_flashattn=False",
        '"stabilityai/sd-vae-ft-ema"': f'"{debug_models["vae"]}"',
        '"DeepFloyd/t5-v1_1-xxl"': f'"{debug_models["text_encoder"]}"',
        "model_max_length=120": "model_max_length=32",
        "batch_size = 1": "batch_size = 2",
        "log_every = 10": "log_every = 1",
    }.items():
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "64x512x512-sp-debug.py"
    config.write_text(text)
    result = run_sora("preprocess", str(demo_csv), "--config", str(config), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    videos = sum(item.kind == "video" for item in plan_demo(DEMO_NUM, 0))
    assert f"kept: {videos}" in result.stdout  # the fixed-size form trains videos only
    assert "as plugin 'zero2-seq'" in result.stdout + result.stderr  # the notice of the sp switch
    one = train(config, tmp_path / "cache", tmp_path / "one", 1, 1, "--sp-size", "1")
    split = train(config, tmp_path / "cache", tmp_path / "split", 2, 1)
    time_config = tmp_path / "64x512x512-sp-debug-time.py"
    time_config.write_text(text + '\nsp_split = "time"\n')
    by_time = train(time_config, tmp_path / "cache", tmp_path / "time", 2, 1)
    one_losses = losses(one)
    assert len(one_losses) >= 4
    for run in (split, by_time):
        run_losses = losses(run)
        assert one_losses.keys() == run_losses.keys()
        for step, loss in one_losses.items():
            assert run_losses[step] == pytest.approx(loss, rel=1e-5), (run, step)
