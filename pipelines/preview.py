"""Training previews: videos sampled from the EMA weights while training goes on.

With `preview_prompts` set, rank 0 hands each preview step (`preview_every`, default: every
checkpoint) to a `Previewer`, which loads the EMA weights the step wrote, samples one video
per prompt with the training config's own VAE, text encoder and scheduler, and writes, under
`<experiment>/previews/step-NNNNNNN/`,

    sample_NNN_<prompt>.mp4   one per prompt (`sora sample`'s names)
    samples.csv               path,text: `sora demo-eval` judges a folder of demo previews
    contact_sheet.png         a few frames of every preview, its prompt under each row

and adds the sheet to the experiment's TensorBoard as the image `preview`. Under Ray the work
runs in an actor of its own (`Previewer`) at the lowest CPU priority (`lowest_priority`: Linux's
SCHED_IDLE, which runs only on a core nothing else wants, else nice 19) with one thread, one step
after another, so the training step never waits for it; training waits for the last previews
only after its last step.

Previews are drawn at the size of the cache's largest bucket (the size the model saw most),
with the training config's `scheduler` settings (`num_sampling_steps`, `cfg_scale`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

from bucketing.aspect import RESOLUTIONS
from bucketing.assign import parse_bucket_name
from pipelines.config import InferenceConfig, TrainConfig
from sora_model.stdit import UNKNOWN_FPS

PREVIEWS = "previews"
WEIGHTS = "ema.safetensors"  # a preview step's EMA weights when the step wrote no checkpoint
SHEET = "contact_sheet.png"
LOWEST_PRIORITY = 19  # nice value of a preview task where SCHED_IDLE is not available


@dataclasses.dataclass(frozen=True)
class PreviewTask:
    """One step's previews: what rank 0 hands to the runner (`WorkerHooks.preview`)."""

    config: TrainConfig
    weights: Path  # EMA weights (safetensors)
    size: tuple[int, int, int]  # (num_frames, height, width)
    out: Path  # preview_dir(experiment, step)
    step: int


class Previewer:
    """Draws previews one step after another, keeping the VAE, T5 and model loaded between
    steps (only the weights change). Under Ray it is an actor of its own at the lowest CPU
    priority (`niced`), so previews queue there instead of piling up processes."""

    def __init__(self, niced: bool = False) -> None:
        if niced:
            import torch

            lowest_priority()
            torch.set_num_threads(1)  # one core's worth at most, whatever the node has spare
        self.sampler = None

    def render(self, task: PreviewTask) -> Path:
        """Sample one step's previews into `task.out`; returns the contact sheet's path."""
        from tensorboardX import SummaryWriter

        from pipelines.contact_sheet import SheetRow, sheet_frames, write_contact_sheet
        from pipelines.media import read_frames
        from pipelines.sample import Sampler, sample
        from sora_model.checkpoint import load_weights

        config = preview_config(task.config, task.weights, task.size, task.out)
        if self.sampler is None:
            self.sampler = Sampler(config)
        else:
            load_weights(self.sampler.model, task.weights)
        videos = sample(config, self.sampler)
        num_frames = task.size[0]
        rows = [
            SheetRow(sheet_frames(read_frames(video, np.arange(num_frames))), f"step {task.step}: {prompt}")
            for video, prompt in zip(videos, config.prompt, strict=True)
        ]
        sheet = write_contact_sheet(rows, task.out / SHEET)
        writer = SummaryWriter(str(task.out.parent.parent / "tensorboard"), filename_suffix=".previews")
        with Image.open(sheet) as image:
            writer.add_image("preview", np.asarray(image.convert("RGB")), task.step, dataformats="HWC")
        writer.close()
        return sheet


def lowest_priority() -> str:
    """Put every thread of this process at the lowest CPU priority; returns which one it got.

    SCHED_IDLE (Linux) runs a thread only on a core no other thread wants, and a waking training
    thread takes the core back at once; nice 19 still gets a small share (about 1.5 %) of a busy
    core, and only the calling thread's. Threads started later inherit the setting."""
    if hasattr(os, "SCHED_IDLE") and os.path.isdir("/proc/self/task"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread: new ones inherit it
            for thread in map(int, os.listdir("/proc/self/task")):
                with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                    os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:  # a kernel without it: nice does what it can
            pass
    os.nice(LOWEST_PRIORITY - os.nice(0))
    return f"nice {LOWEST_PRIORITY}"


def preview_dir(experiment: Path, global_step: int) -> Path:
    return experiment / PREVIEWS / f"step-{global_step:07d}"


def is_preview_step(config: TrainConfig, global_step: int, last: bool) -> bool:
    """Whether rank 0 previews after this step: every `preview_every` steps (default: at each
    checkpoint) and after the last one, when there are prompts."""
    return bool(config.preview_prompts) and (global_step % (config.preview_every or config.ckpt_every) == 0 or last)


def preview_size(buckets: dict[str, int]) -> tuple[int, int, int]:
    """(num_frames, height, width) of the bucket with the most rows (the first such by name)."""
    if not buckets:
        raise ValueError("the cache has no buckets to take a preview size from")
    name = max(sorted(buckets), key=lambda bucket: buckets[bucket])
    resolution, num_frames, aspect = parse_bucket_name(name)
    height, width = RESOLUTIONS[resolution].table[aspect]
    return num_frames, height, width


def preview_config(config: TrainConfig, weights: Path, size: tuple[int, int, int], out: Path) -> InferenceConfig:
    """What `sora sample` would be given to draw the previews of `weights`: the config's
    frame_interval, and 24 fps, the rate Open-Sora conditions on when a video does not say
    (STDiT2 trains on each file's own rate; saved at 24 // frame_interval)."""
    num_frames, height, width = size
    model = dataclasses.replace(config.model, from_pretrained=str(weights))
    return InferenceConfig(
        num_frames=num_frames,
        fps=int(UNKNOWN_FPS),
        frame_interval=config.frame_interval,
        image_size=(height, width),
        model=model,
        vae=config.vae,
        text_encoder=config.text_encoder,
        scheduler=config.scheduler,
        dtype=config.dtype,
        batch_size=len(config.preview_prompts),
        seed=config.seed,
        prompt=tuple(config.preview_prompts),
        save_dir=str(out),
    )
