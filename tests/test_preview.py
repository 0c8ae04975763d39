"""Training previews: when they are drawn, at what size, and with which settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.preview import is_preview_step, preview_config, preview_size
from tests.conftest import ROOT


@pytest.fixture()
def config():
    overrides = {"preview_prompts": ["a red circle moves left on a blue background", "a cat"], "ckpt_every": 20}
    return load_config(ROOT / "configs" / "debug" / "train.py", "train", overrides)


def test_previews_come_at_checkpoints_by_default_and_after_the_last_step(config):
    assert [step for step in range(1, 51) if is_preview_step(config, step, last=step == 50)] == [20, 40, 50]


def test_preview_every_sets_its_own_period(config):
    import dataclasses

    every_7 = dataclasses.replace(config, preview_every=7)
    assert [step for step in range(1, 22) if is_preview_step(every_7, step, last=False)] == [7, 14, 21]


def test_no_prompts_no_previews(config):
    import dataclasses

    silent = dataclasses.replace(config, preview_prompts=None)
    assert not any(is_preview_step(silent, step, last=True) for step in range(1, 100))


def test_previews_take_the_size_of_the_largest_bucket():
    # Open-Sora's 144p table: 0.56 (9:16) is 144x256, 1.00 is 192x192; a tie goes to the first name.
    assert preview_size({"144p-1f-0.56": 30, "144p-8f-0.56": 12}) == (1, 144, 256)
    assert preview_size({"144p-8f-1.00": 10, "144p-8f-0.56": 9, "240p-16f-0.56": 3}) == (8, 192, 192)
    assert preview_size({"144p-8f-1.00": 9, "144p-8f-0.56": 9}) == (8, 144, 256)
    with pytest.raises(ValueError, match="no buckets"):
        preview_size({})


def test_preview_config_samples_the_prompts_with_the_training_models(config, tmp_path):
    weights = Path("exp/checkpoints/step-0000020/ema.safetensors")
    built = preview_config(config, weights, (8, 144, 256), tmp_path)
    assert built.prompt == tuple(config.preview_prompts) and built.batch_size == 2
    assert (built.num_frames, built.image_size) == (8, (144, 256))
    assert built.model.from_pretrained == str(weights) and built.model.type == config.model.type
    assert (built.vae, built.text_encoder, built.scheduler) == (config.vae, config.text_encoder, config.scheduler)
    assert built.save_dir == str(tmp_path) and built.seed == config.seed
    # STDiT2 is conditioned on 24 fps (Open-Sora's rate for a video that does not say) at the
    # training stride, not on the saved rate.
    assert (built.fps, built.frame_interval) == (24, config.frame_interval)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_a_previewer_takes_only_idle_cpu_with_every_thread():
    # In a process of its own: the setting cannot be undone without privileges. A thread that
    # exists before the call (as Ray's do in an actor) is moved too, and later ones inherit it.
    code = (
        "import os, threading, time\n"
        "stop = threading.Event()\n"
        "before = threading.Thread(target=stop.wait); before.start()\n"
        "from pipelines.preview import lowest_priority\n"
        "print(lowest_priority())\n"
        "after = threading.Thread(target=stop.wait); after.start()\n"
        "policies = {os.sched_getscheduler(int(tid)) for tid in os.listdir('/proc/self/task')}\n"
        "print(sorted(policies) == [os.SCHED_IDLE])\n"
        "stop.set()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SCHED_IDLE", "True"]
