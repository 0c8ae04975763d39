"""`sora train` on the demo cache: 2 workers over gloo, DeepSpeed ZeRO-2 on CPU, the debug model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_sora

TOTAL = 24  # steps of the short run (checkpoints at 8, 16, 24; previews at 12 and 24)
PREVIEW_PROMPT = "a red circle moves left on a blue background"


def losses(experiment: Path) -> list[dict]:
    return [json.loads(line) for line in (experiment / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def schedule(clean_cache) -> tuple[int, int]:
    """(steps per epoch, epochs) giving TOTAL steps on the session's demo cache with 2 workers."""
    from pipelines.cache import Cache
    from pipelines.config import load_config
    from pipelines.train import make_plan

    steps = make_plan(Cache(clean_cache[0]), load_config(clean_cache[1], "train"), 2).steps_per_epoch
    assert TOTAL % steps == 0
    return steps, TOTAL // steps


@pytest.fixture(scope="module")
def trained(clean_cache, schedule, tmp_path_factory) -> tuple[Path, Path]:
    cache, config = clean_cache
    folder = tmp_path_factory.mktemp("train")
    text = config.read_text()
    for old, new in {
        "log_every = 5": "log_every = 1",
        "ckpt_every = 20": "ckpt_every = 8",
        "lr = 1e-4": "lr = 1e-3",
        'timestep_respacing="",': 'timestep_respacing="", num_sampling_steps=4,',
        "\nload = None": f"\nload = None\npreview_prompts = [{PREVIEW_PROMPT!r}]\npreview_every = 12",
    }.items():
        assert old in text
        text = text.replace(old, new)
    train_config = folder / "train.py"
    train_config.write_text(text)
    args = ["train", str(train_config), "--data-path", str(cache), "--outputs", str(folder / "out")]
    result = run_sora(*args, "--num-workers", "2", "--epochs", str(schedule[1]))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    experiment = folder / "out" / "000-debug"  # the first experiment of a fresh outputs folder
    assert f"experiment: {experiment}" in result.stdout
    return experiment, train_config


def test_plan_is_printed_with_buckets_that_yield_nothing(trained, clean_cache, schedule):
    experiment, config = trained
    result = run_sora("train", str(config), "--data-path", str(clean_cache[0]), "--load", str(experiment),
                      "--num-workers", "2", "--epochs", str(schedule[1]))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]  # finished already: loads, plans, has nothing to do
    assert f"2 worker(s), {schedule[0]} steps per epoch" in result.stdout
    assert "yields no full batch" in result.stdout


def test_previews_are_drawn_from_the_ema_weights_beside_training(trained):
    experiment = trained[0]
    previews = experiment / "previews"
    assert sorted(p.name for p in previews.iterdir()) == ["step-0000012", "step-0000024"]
    for folder in previews.iterdir():
        videos = sorted(folder.glob("*.mp4"))
        assert len(videos) == 1 and videos[0].stat().st_size > 0
        assert (folder / "samples.csv").read_text().splitlines()[1].endswith(PREVIEW_PROMPT)
        assert (folder / "contact_sheet.png").stat().st_size > 0
    # Step 12 wrote no checkpoint: its EMA weights were saved for the preview; step 24's are the checkpoint's.
    assert (previews / "step-0000012" / "ema.safetensors").is_file()
    assert not (previews / "step-0000024" / "ema.safetensors").exists()
    images = [(step, tag) for step, tag, kind in tensorboard_values(experiment / "tensorboard") if kind == "image"]
    assert images == [(12, "preview"), (24, "preview")]
    scalars = {tag for _, tag, kind in tensorboard_values(experiment / "tensorboard") if kind == "simple_value"}
    assert "train/loss" in scalars  # the previews' event file sits beside the training's


def tensorboard_values(folder: Path) -> list[tuple[int, str, str]]:
    """(step, tag, value kind) of every summary value in a TensorBoard folder's event files (TFRecord
    framing: length, its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            found += [(event.step, value.tag, value.WhichOneof("value")) for value in event.summary.value]
    return sorted(found)


def test_the_loss_falls(trained):
    values = [entry["loss"] for entry in losses(trained[0])][:TOTAL]
    assert len(values) == TOTAL
    first, last = sum(values[:6]) / 6, sum(values[-6:]) / 6
    assert last < 0.9 * first, values


def test_checkpoints_hold_weights_ema_optimizer_state_and_config(trained, schedule):
    experiment, _ = trained
    folders = sorted((experiment / "checkpoints").glob("step-*"))
    assert [f.name for f in folders] == [f"step-{s:07d}" for s in (8, 16, 24)]
    last = folders[-1]
    for name in ("model.safetensors", "ema.safetensors", "state.json", "config.py"):
        assert (last / name).is_file(), name
    assert len(list((last / "deepspeed").rglob("*optim_states.pt"))) == 2  # one ZeRO shard per worker
    assert json.loads((last / "state.json").read_text()) == {"epoch": schedule[1], "step": 0, "global_step": TOTAL}


def test_workers_never_load_the_vae_or_text_encoder(trained):
    info = json.loads((trained[0] / "worker.json").read_text())
    assert info["world_size"] == 2
    assert info["dtype"] == "fp32"  # on CPU, whatever the config asks
    assert not [name for name in info["encoders_loaded"] if name.startswith("sora_model.")]


def test_resume_continues_with_the_same_losses(trained, clean_cache, schedule, tmp_path):
    experiment, config = trained
    original = {entry["step"]: entry["loss"] for entry in losses(experiment)[:TOTAL]}
    # Resume from the first checkpoint into a copy of the experiment, run to the same end.
    copy = tmp_path / "resumed"
    (copy / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(experiment / "checkpoints" / "step-0000008", copy / "checkpoints" / "step-0000008")
    result = run_sora("train", str(config), "--data-path", str(clean_cache[0]), "--load", str(copy),
                      "--num-workers", "2", "--epochs", str(schedule[1]))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = {entry["step"]: entry["loss"] for entry in losses(copy)}
    assert sorted(resumed) == list(range(9, TOTAL + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(original[step], rel=1e-5, abs=1e-6), step


def test_gpu_asked_on_a_cluster_without_gpus_is_a_clear_error(clean_cache, tmp_path):
    cache, config = clean_cache
    result = run_sora("train", str(config), "--data-path", str(cache), "--outputs", str(tmp_path / "out"), "--gpu")
    assert result.returncode == 2
    assert "--gpu: 1 worker(s) need 1 GPU(s), the cluster has 0; pass --no-gpu to train on CPUs" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing left behind


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(clean_cache, schedule, tmp_path):
    import os
    import signal
    import subprocess
    import time

    import psutil

    from tests.conftest import SORA

    cache, config = clean_cache
    text = config.read_text()
    for old, new in {"log_every = 5": "log_every = 1", "ckpt_every = 20": "ckpt_every = 4"}.items():
        text = text.replace(old, new)
    (tmp_path / "train.py").write_text(text)
    epochs = 2 * schedule[1]  # 48 steps: time to kill one mid-run
    args = [SORA, "train", str(tmp_path / "train.py"), "--data-path", str(cache), "--outputs", str(tmp_path / "out"),
            "--num-workers", "2", "--epochs", str(epochs)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    experiment = tmp_path / "out" / "000-debug"
    deadline = time.monotonic() + 300
    # Wait until Ray Train has registered the step-4 checkpoint and training went on past it.
    while not (list((experiment / "ray" / "run").glob("checkpoint_*")) and (experiment / "losses.jsonl").exists()
               and losses(experiment)[-1]["step"] >= 6):  # fmt: skip
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    # This run's workers only: descendants of its driver (its local Ray), not another job's.
    descendants = psutil.Process(process.pid).children(recursive=True)
    workers = [p for p in descendants if "RayTrainWorker" in " ".join(p.cmdline() or [])]
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    steps = [entry["step"] for entry in losses(experiment)]
    assert steps[-1] == epochs * schedule[0]  # finished
    assert len(steps) > len(set(steps))  # some steps ran twice: after the restart from the checkpoint
    restarted_at = next(s for i, s in enumerate(steps) if s in steps[:i])
    assert restarted_at > 4  # ... and it resumed after step 4, not from scratch
