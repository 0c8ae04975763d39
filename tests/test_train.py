"""`sora train` on the demo cache: 2 workers over gloo, DeepSpeed ZeRO-2 on CPU, the debug model."""

from __future__ import annotations

import json
import re
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
    (folder / "output.txt").write_text(result.stdout + result.stderr)  # what the user saw
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


def test_the_output_says_each_step_once_and_no_state_api_noise(trained):
    output = (trained[1].parent / "output.txt").read_text()
    assert "Failed to query Ray Train Controller" not in output  # pipelines.cluster.quiet_local_worker
    step_lines = re.findall(r"step 2/\d+ epoch", output)
    assert len(step_lines) == 1, output[-3000:]


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
    assert json.loads((last / "state.json").read_text()) == {"epoch": schedule[1], "batches": 0, "global_step": TOTAL}


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
    while not (list((experiment / "ray").glob("run-*/checkpoint_*")) and (experiment / "losses.jsonl").exists()
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


def test_load_means_the_named_checkpoint_even_beside_an_earlier_runs_ray_state(trained, clean_cache, schedule,
                                                                               tmp_path):  # fmt: skip
    """The whole experiment, Ray Train's stored state of the finished run included: --load step 8
    resumes at step 9, not where Ray Train's own copy stands (step 24)."""
    import shutil

    experiment, config = trained
    copy = tmp_path / "again"
    shutil.copytree(experiment, copy)
    assert list((copy / "ray").glob("run-*/checkpoint_*")), "the earlier run's Ray Train state is there"
    (copy / "losses.jsonl").unlink()
    step_8 = copy / "checkpoints" / "step-0000008"
    result = run_sora("train", str(config), "--data-path", str(clean_cache[0]), "--load", str(step_8),
                      "--num-workers", "2", "--epochs", str(schedule[1]))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [entry["step"] for entry in losses(copy)] == list(range(9, TOTAL + 1))


def planted(folder: Path, marker: Path) -> None:
    """Replace a DeepSpeed file with a pickle that would create `marker` if it were ever unpickled
    freely, and list it in checksums.json as an attacker would."""
    import os

    import torch

    from pipelines.checkpoint import CHECKSUMS, checksums

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"module": Payload()}, folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt")
    (folder / CHECKSUMS).write_text(json.dumps(checksums(folder)))


def test_a_planted_pickle_is_refused_at_once_and_never_runs(trained, clean_cache, tmp_path):
    import shutil
    import time

    experiment, config = trained
    folder = tmp_path / "exp" / "checkpoints" / "step-0000008"
    shutil.copytree(experiment / "checkpoints" / "step-0000008", folder)
    marker = tmp_path / "it-ran"
    planted(folder, marker)
    start = time.monotonic()
    result = run_sora("train", str(config), "--data-path", str(clean_cache[0]), "--load", str(folder))
    assert result.returncode != 0 and not marker.exists()
    assert f"{folder}/deepspeed/state/mp_rank_00_model_states.pt: refused: it holds more than tensors" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - start < 60  # at once: before Ray starts


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "COMPLETE").unlink(), "no COMPLETE file: the checkpoint was not finished"),
        (
            lambda f: (f / "ema.safetensors").write_bytes(b"x" + (f / "ema.safetensors").read_bytes()[1:]),
            "ema.safetensors: changed since it was saved",
        ),
        (lambda f: __import__("shutil").rmtree(f / "deepspeed"), "/deepspeed/latest: missing"),
        (lambda f: (f / "state.json").unlink(), "state.json: missing"),
        (lambda f: (f / "checksums.json").write_text("{not json"), "checksums.json: not valid JSON"),
        (lambda f: (f / "deepspeed" / "state" / "extra.pt").write_bytes(b"x"), "extra.pt: not part of the checkpoint"),
    ],
    ids=["incomplete", "corrupt", "no-deepspeed", "no-state", "bad-checksums", "extra-file"],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(trained, tmp_path, damage, message):
    import shutil

    from pipelines.checkpoint import CheckpointError, verify_checkpoint

    folder = tmp_path / "step-0000008"
    shutil.copytree(trained[0] / "checkpoints" / "step-0000008", folder)
    assert verify_checkpoint(folder).global_step == 8  # as saved: trusted
    damage(folder)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        verify_checkpoint(folder)


def test_a_bad_state_json_is_named(trained, tmp_path):
    import shutil

    from pipelines.checkpoint import CHECKSUMS, CheckpointError, checksums, verify_checkpoint

    folder = tmp_path / "step-0000008"
    shutil.copytree(trained[0] / "checkpoints" / "step-0000008", folder)
    (folder / "state.json").write_text('{"epoch": 1, "step": -3, "global_step": "8"}')
    (folder / CHECKSUMS).write_text(json.dumps(checksums(folder)))
    with pytest.raises(CheckpointError, match=re.escape(f"{folder}/state.json: not a training state")):
        verify_checkpoint(folder)


# --------------------------------------------------------------------------- resuming with another worker count


def trained_batches(experiment: Path) -> list[tuple[int, int, int]]:
    """(step, rank, global batch) of epoch 0, from every rank's record_batches file."""
    found = []
    for path in sorted(experiment.glob("batches-rank*.jsonl")):
        rank = int(path.stem.removeprefix("batches-rank"))
        found += [(entry["step"], rank, entry["batch"]) for entry in map(json.loads, path.read_text().splitlines())
                  if entry["epoch"] == 0]  # fmt: skip
    return sorted(found)


def epoch_batches(clean_cache, config_path: Path) -> int:
    from pipelines.cache import Cache
    from pipelines.config import load_config
    from pipelines.train_data import CacheBatches, plan_epoch

    config = load_config(config_path, "train")
    data = CacheBatches(Cache(clean_cache[0]))
    return plan_epoch(data.train_rows(), data.batch_sizes(config.buckets), config.seed, 0, 1).total


def resume_config(clean_cache, folder: Path) -> Path:
    text = clean_cache[1].read_text()
    text += "\nlog_every = 1\nckpt_every = 1\nrecord_batches = True\neval_fraction = 0.0\nepochs = 1\n"
    text += (
        'bucket_config = {"144p": {1: (1.0, 1), 8: (1.0, 1), 16: (1.0, 1)}, '
        '"240p": {1: (1.0, 1), 8: (1.0, 1), 16: (0.0, None)}}\n'
    )  # a batch per sample: many steps
    path = folder / "resume.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_a_run_resumes_mid_epoch_on_another_number_of_workers(clean_cache, tmp_path, first, then):
    """Every batch of the interrupted epoch is trained once, in the epoch's global order."""
    import shutil

    from tests.test_trainer import run_one_process

    config = resume_config(clean_cache, tmp_path)
    total = epoch_batches(clean_cache, config)
    assert total >= 8, total

    def run(workers: int, experiment: Path, load: Path | None = None) -> None:
        if workers == 1:
            run_one_process(config, clean_cache[0], experiment, 1, str(load or ""), ckpt_every=1, log_every=1,
                            eval_fraction=0.0, record_batches=True)  # fmt: skip
            return
        args = ["train", str(config), "--data-path", str(clean_cache[0]), "--num-workers", str(workers)]
        args += ["--load", str(load)] if load else ["--outputs", str(experiment.parent)]
        result = run_sora(*args)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    before = tmp_path / "out" / "000-debug"
    run(first, before)
    after_step = 2  # interrupted here: 2 * first batches trained
    resumed = tmp_path / "resumed"
    checkpoint = resumed / "checkpoints" / f"step-{after_step:07d}"
    shutil.copytree(before / "checkpoints" / f"step-{after_step:07d}", checkpoint)
    run(then, resumed, checkpoint)

    done = [batch for step, _, batch in trained_batches(before) if step <= after_step]
    again = [batch for _, _, batch in trained_batches(resumed)]  # in (step, rank) order
    assert done == list(range(after_step * first))
    rest = total - len(done)
    assert again == list(range(len(done), len(done) + rest - rest % then)), (total, again)  # once each, in order
    assert not set(done) & set(again)
    state = json.loads((resumed / "checkpoints" / sorted(p.name for p in (resumed / "checkpoints").iterdir())[-1]
                        / "state.json").read_text())  # fmt: skip
    assert state["epoch"] == 1 and state["batches"] == 0
