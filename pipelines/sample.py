"""`sora sample`: prompts -> T5 -> diffusion with guidance -> VAE decode -> one H.264 mp4 per prompt.

The same pieces serve HTTP requests (`pipelines/serve.py`):

- `prepare_item` reads a prompt's reference images/videos and checks its mask strategy
  against them and the clip layout: every error a user can make surfaces here, before a
  model is loaded or a step is sampled;
- `Sampler` holds the models of an inference config, loaded once, and turns prepared items
  into videos, clip by clip for long video (`sora_model.long_video`).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.checkpoint import resolve_weights
from pipelines.config import ConfigError, InferenceConfig
from pipelines.dataset import SAMPLES_TABLE
from pipelines.media import DecodeError, read_frames, resize_crop, write_mp4
from pipelines.models import load_model, load_text_encoder, load_vae, size_inputs
from pipelines.probe import ProbeError, probe
from sora_model.layers import warn_once
from sora_model.loading import torch_dtype
from sora_model.mask_strategy import ConditionError, MaskTuple, check_strategy, frames_needed, parse_mask_strategy
from sora_model.sizes import MODEL_SIZES, Family
from sora_model.stdit import sampling_conditions


class FieldError(ConfigError):
    """A sampling input that cannot be used; `field` names it (for HTTP error bodies)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SampleItem:
    """One prompt, ready to sample: its mask tuples and the reference frames they take.

    `references[i]` is (3, F, H, W) in [-1, 1]: frames `frames[i]` of reference i (those
    the tuples take), fitted to the sampling size (scaled to cover, centre-cropped) as
    Open-Sora does; None for a reference no tuple uses.
    """

    prompt: str
    masks: tuple[MaskTuple, ...] = ()
    references: tuple[torch.Tensor | None, ...] = ()
    frames: tuple[tuple[int, ...], ...] = ()


# --------------------------------------------------------------------------- inputs


def read_prompts(config: InferenceConfig) -> list[str]:
    """`prompt` wins over `prompt_path` (one prompt per line, blank lines skipped)."""
    if config.prompt:
        return list(config.prompt)
    if config.prompt_path is None:
        raise ConfigError("no prompts: give --prompt TEXT or --prompt-path FILE (or set prompt in the config)")
    path = Path(config.prompt_path)
    if not path.is_file():
        raise ConfigError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{path}: no prompts in the file")
    return prompts


def check_sampling(config: InferenceConfig, conditioned_by: str | None) -> None:
    """What the model and scheduler must support for this config (before anything loads).

    `conditioned_by` names the field that asks for condition frames (`loop` or
    `mask_strategy`), None when nothing does; errors about them name it.
    """
    height, width = config.image_size
    if height % 16 or width % 16:
        raise FieldError("image_size", f"image_size {config.image_size}: height and width must be multiples of 16")
    if conditioned_by is None:
        return
    if MODEL_SIZES[config.model.type].family is Family.DIT:
        message = f"{conditioned_by}: model {config.model.type} cannot condition on frames; use an STDiT model"
        raise FieldError(conditioned_by, message)
    if config.scheduler.type == "dpm-solver":
        message = (
            f"{conditioned_by}: scheduler {config.scheduler.type!r} cannot condition on frames; use 'iddpm' or 'rflow'"
        )
        raise FieldError(conditioned_by, message)


def conditioned_by(loop: int, strategies: Sequence[str | None]) -> str | None:
    """The field that asks for condition frames, if any."""
    return "loop" if loop > 1 else "mask_strategy" if any(strategies) else None


def check_fixed_size(built: InferenceConfig, config: InferenceConfig) -> None:
    """STDiT-XL/2 and DiT-XL/2 sample at the size their models were `built` for only."""
    fixed = (built.num_frames, tuple(built.image_size))
    if MODEL_SIZES[built.model.type].family is not Family.STDIT2 and (config.num_frames, config.image_size) != fixed:
        raise FieldError(
            "num_frames" if config.num_frames != fixed[0] else "image_size",
            f"model {built.model.type} samples {fixed[0]} frames of {fixed[1][0]}x{fixed[1][1]} only",
        )


def prepare_item(
    prompt: str,
    media: Sequence[Path],
    strategy: str | None,
    config: InferenceConfig,
    media_labels: Sequence[str],
    strategy_field: str = "mask_strategy",
    max_pixels: int | None = None,
    notice: Callable[[str], None] | None = None,
    refuse_unused: bool = False,
) -> SampleItem:
    """Read and check one prompt's conditioning; errors name the field, the entry and the tuple.

    `media` are files (images or videos); `media_labels[i]` names entry i in messages (and
    is the field of its errors). Only the frames the tuples take are decoded. A reference
    no tuple uses is not read, and `notice` is told (or, with `refuse_unused`, it is an
    error: a server's client may not see notices); `max_pixels` bounds a reference's size.
    """
    try:
        masks = parse_mask_strategy(strategy)
    except ConditionError as error:
        raise FieldError(strategy_field, f"{strategy_field}: {error}") from None
    counts = []
    for path, label in zip(media, media_labels, strict=True):
        try:
            found = probe(path)
        except ProbeError as error:
            # The label names the file; the detail without its folder (never a server's path).
            detail = error.detail.replace(str(path), path.name)
            raise FieldError(label, f"{label}: {error.reason}" + (f" ({detail})" if detail else "")) from None
        if max_pixels is not None and found.height * found.width > max_pixels:
            size = f"{found.height}x{found.width}"
            raise FieldError(label, f"{label}: {size} pixels; the limit is {max_pixels} (height x width)")
        counts.append(found.num_frames)
    try:
        unused = check_strategy(masks, counts, config.long_video)
    except ConditionError as error:
        raise FieldError(strategy_field, f"{strategy_field}: {error}") from None
    if unused and refuse_unused:
        label = media_labels[unused[0]]
        raise FieldError(label, f"{label}: no {strategy_field} tuple uses it; name it in a tuple or leave it out")
    if unused and notice is not None:
        names = ", ".join(media_labels[index] for index in unused)
        notice(f"note: {strategy_field} uses no frame of {names}; not read")
    references, frames_taken = [], []
    for index, (path, label) in enumerate(zip(media, media_labels, strict=True)):
        wanted = frames_needed(masks, index)
        if not wanted:
            references.append(None)
            frames_taken.append(())
            continue
        try:
            frames = read_frames(path, np.array(wanted))
        except DecodeError as error:
            raise FieldError(label, f"{label}: {error}".replace(str(path), path.name)) from None
        references.append(resize_crop(frames, *config.image_size))  # (3, F, H, W)
        frames_taken.append(wanted)
    return SampleItem(prompt, tuple(masks), tuple(references), tuple(frames_taken))


def _per_prompt(config: InferenceConfig, name: str, count: int) -> list[str | None]:
    values = getattr(config, name)
    if values is None:
        return [None] * count
    if len(values) != count:
        raise ConfigError(f"{name}: {len(values)} entries for {count} prompts; give one per prompt (None to skip)")
    return list(values)


def prepare_prompts(config: InferenceConfig) -> list[SampleItem]:
    """The config's prompts with their `reference_path` / `mask_strategy` entries, checked."""
    prompts = read_prompts(config)
    paths = _per_prompt(config, "reference_path", len(prompts))
    strategies = _per_prompt(config, "mask_strategy", len(prompts))
    check_sampling(config, conditioned_by(config.loop, strategies))
    notice = lambda message: print(message, file=sys.stderr)  # noqa: E731
    items = []
    for index, (prompt, entry, strategy) in enumerate(zip(prompts, paths, strategies, strict=True)):
        parts = [part.strip() for part in (entry or "").split(";") if part.strip()]
        labels = [f"reference_path[{index}] entry {i} ({part})" for i, part in enumerate(parts)]
        for part, label in zip(parts, labels, strict=True):
            if "://" in part:  # checked on the text: Path("https://x") is "https:/x"
                raise FieldError(label, f"{label}: a URL; download the file and give its path")
        media = [Path(part) for part in parts]
        items.append(prepare_item(prompt, media, strategy, config, labels, f"mask_strategy[{index}]", notice=notice))
    return items


# --------------------------------------------------------------------------- outputs


def video_name(index: int, prompt: str) -> str:
    """Stable file names: index and the first words of the prompt."""
    words = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40]
    return f"sample_{index:03d}_{words or 'prompt'}.mp4"


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Progress:
    """Where a sampling call is: diffusion step `step` of `steps` of clip `clip` of `loops`."""

    clip: int  # 1-based
    loops: int
    step: int  # steps done in this clip
    steps: int  # per clip

    @property
    def done(self) -> int:
        """Steps done over all clips."""
        return (self.clip - 1) * self.steps + self.step

    @property
    def total(self) -> int:
        return self.loops * self.steps


class Sampler:
    """The VAE, T5 and diffusion transformer of an inference config, loaded once.

    Sizes, steps, guidance, seed and loop come with each call, so one Sampler serves many
    requests. STDiT-XL/2 and DiT-XL/2 have one fixed size (the config's).
    """

    def __init__(self, config: InferenceConfig, device: str | torch.device | None = None) -> None:
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Half precision only on a GPU; on CPU it is slower and less exact.
        self.dtype = torch_dtype(config.dtype) if self.device.type == "cuda" else torch.float32
        if self.dtype != torch_dtype(config.dtype):
            warn_once(f"dtype {config.dtype!r} needs CUDA: sampling on {self.device.type} computes in fp32")
        self.text = load_text_encoder(config.text_encoder)
        self.text.model.to(self.device)
        self.vae = load_vae(config.vae, self.dtype).to(self.device)
        latent = self.vae.latent_size(config.num_frames, *config.image_size)
        self.model = load_model(config.model, self.text.output_dim, config.text_encoder.model_max_length, latent)
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval()

    @torch.no_grad()
    def generate(
        self,
        items: Sequence[SampleItem],
        config: InferenceConfig | None = None,
        seed: int | None = None,
        progress: bool | Callable[[Progress], None] = False,
    ) -> np.ndarray:
        """Videos (B, frames, H, W, 3) uint8 for a batch of prepared items.

        `config` gives the sampling settings (default: the one the models were loaded
        with); `seed` (default: the config's) makes the result reproducible. `progress`: a
        bar per clip, or a callable given a `Progress` after every diffusion step (it may
        raise to stop sampling there).
        """
        from sora_model.diffusion import build_scheduler
        from sora_model.long_video import sample_long

        config = config or self.config
        check_fixed_size(self.config, config)
        device, dtype, batch = self.device, self.dtype, len(items)
        scheduler = build_scheduler(
            config.scheduler.type,
            config.scheduler.num_sampling_steps,
            config.scheduler.cfg_scale,
            config.scheduler.cfg_channel,
            **config.scheduler.rflow_options,
        )
        y, y_mask = self.text.encode([item.prompt for item in items])  # (B, L, D), (B, L)
        both = torch.cat([y.to(dtype), self.model.null_caption(batch, y.shape[1]).to(device=device, dtype=dtype)])
        height, width = config.image_size
        ar_fps = sampling_conditions(height, width, config.num_frames, config.fps)  # Open-Sora 1.1's values
        sizes = size_inputs(self.config.model.type, 2 * batch, device, dtype, height=height, width=width,
                            num_frames=config.num_frames, **ar_fps)  # fmt: skip

        def model_fn(x, t, x_mask):  # the guidance batch: [prompts; null captions]
            return self.model(x.to(dtype), t, both, y_mask, x_mask, **sizes).float()

        conditions = [self._encode_references(item) if item.masks else None for item in items]
        channels = self.vae.out_channels
        shape = (channels, *self.vae.latent_size(config.num_frames, *config.image_size))  # (C, T, h, w)
        # One generator per batch: the same seed gives the same videos.
        generator = torch.Generator(device=device).manual_seed(config.seed if seed is None else seed)

        clips = itertools.count(1)

        def sample_clip(reference, edit):
            noise = torch.randn((batch, *shape), generator=generator, device=device)
            on_step = progress
            if callable(progress):
                clip, loops = next(clips), config.long_video.loop
                on_step = lambda done, steps: progress(Progress(clip, loops, done, steps))  # noqa: E731
            return scheduler.sample(model_fn, noise, reference, edit, generator=generator, progress=on_step,
                                    sizes=(*config.image_size, shape[1]))  # fmt: skip

        latents = sample_long(sample_clip, conditions, config.long_video, shape, device)
        video = self.vae.decode(latents.to(dtype)).float()  # (B, 3, T, H, W) in about [-1, 1]
        pixels = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 4, 1).cpu().numpy()  # (B, T, H, W, 3)

    def _encode_references(self, item: SampleItem):
        from sora_model.long_video import Conditioning

        latents = tuple(
            None if frames is None
            else self.vae.encode_moments(frames[None].to(self.device, self.dtype))[0][0].float()  # posterior mean
            for frames in item.references
        )  # fmt: skip
        return Conditioning(item.masks, latents, item.frames)


def sample(config: InferenceConfig, sampler: Sampler | None = None) -> list[Path]:
    """Generate one video per prompt into `save_dir`; returns their paths. A `sampler` given
    (its models loaded for a config of the same models) is used instead of loading them."""
    items = prepare_prompts(config)  # every input checked before a model loads
    if config.model.from_pretrained is None:
        print("note: model.from_pretrained is not set: sampling with untrained weights (pass --ckpt-path)",
              file=sys.stderr)  # fmt: skip
    else:  # resolved once: what is printed is what loads, even while training writes new checkpoints
        weights = resolve_weights(config.model.from_pretrained)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, from_pretrained=weights))
        print(f"weights: {weights}", file=sys.stderr)
    sampler = sampler or Sampler(config)
    save_dir = Path(config.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    frames = config.long_video.total_frames
    written = []
    for start in range(0, len(items), config.batch_size):
        batch = items[start : start + config.batch_size]
        print(
            f"sampling {start + 1}-{start + len(batch)} of {len(items)}: {frames} frames of "
            f"{config.image_size[0]}x{config.image_size[1]}" + (f" in {config.loop} clips" if config.loop > 1 else ""),
            file=sys.stderr,
            flush=True,
        )
        videos = sampler.generate(batch, config, seed=config.seed + start, progress=sys.stderr.isatty())
        for offset, item in enumerate(batch):
            path = save_dir / video_name(start + offset, item.prompt)
            write_mp4(videos[offset], path, config.save_fps)
            written.append(path)
    write_samples_table(save_dir, written, [item.prompt for item in items])
    return written


def write_samples_table(save_dir: Path, videos: Sequence[Path], prompts: Sequence[str]) -> Path:
    """`samples.csv` beside the videos: path,text as in an input table (paths relative to it), so
    the samples can be judged (`sora demo-eval`) or read back like any dataset."""
    table = save_dir / SAMPLES_TABLE
    tmp = table.with_name(f".{table.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "text"])
        writer.writerows((video.name, prompt) for video, prompt in zip(videos, prompts, strict=True))
    tmp.replace(table)
    return table
