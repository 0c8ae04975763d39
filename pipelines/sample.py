"""`sora sample`: prompts -> T5 -> diffusion with guidance -> VAE decode -> one H.264 mp4 per prompt."""

from __future__ import annotations

import re
from pathlib import Path

import av
import numpy as np
import torch

from pipelines.config import ConfigError, InferenceConfig
from sora_model.loading import torch_dtype


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


def video_name(index: int, prompt: str) -> str:
    """Stable file names: index and the first words of the prompt."""
    words = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40]
    return f"sample_{index:03d}_{words or 'prompt'}.mp4"


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """(T, H, W, 3) uint8 -> H.264 mp4, written under a temporary name and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "x264-params": "threads=1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def sample(config: InferenceConfig) -> list[Path]:
    """Generate one video per prompt into `save_dir`; returns their paths."""
    from pipelines.models import load_model, load_text_encoder, load_vae
    from sora_model.diffusion import build_scheduler
    from sora_model.stdit import STDiT2

    if config.loop > 1 or config.reference_path or config.mask_strategy:
        raise ConfigError("long video (loop, reference_path, mask_strategy) is not implemented yet")
    if any(side % 16 for side in config.image_size):
        raise ConfigError(f"image_size {config.image_size}: height and width must be multiples of 16")
    prompts = read_prompts(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(config.dtype) if device.type == "cuda" else torch.float32
    text = load_text_encoder(config.text_encoder)
    text.model.to(device)
    vae = load_vae(config.vae, dtype).to(device)
    frames, height, width = vae.latent_size(config.num_frames, *config.image_size)
    model = load_model(config.model, text.output_dim, config.text_encoder.model_max_length, (frames, height, width))
    model = model.to(device=device, dtype=dtype).eval()
    scheduler = build_scheduler(
        config.scheduler.type,
        config.scheduler.num_sampling_steps,
        config.scheduler.cfg_scale,
        config.scheduler.cfg_channel,
    )
    save_dir = Path(config.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(prompts), config.batch_size):
        batch = prompts[start : start + config.batch_size]
        y, y_mask = text.encode(batch)  # (B, L, D), (B, L)
        y = y.to(dtype)
        null = model.null_caption(len(batch), y.shape[1]).to(device=device, dtype=dtype)
        extra = {}
        if isinstance(model, STDiT2):
            count = 2 * len(batch)  # the guidance batch: [prompts; null captions]
            full = lambda value, n=count: torch.full((n,), float(value), device=device)  # noqa: E731
            extra = {"height": full(config.image_size[0]), "width": full(config.image_size[1]),
                     "num_frames": full(config.num_frames), "fps": full(config.save_fps)}  # fmt: skip
        both = torch.cat([y, null])

        def model_fn(x, t, x_mask, both=both, y_mask=y_mask, extra=extra):
            return model(x.to(dtype), t, both, y_mask, x_mask, **extra).float()

        # One generator per batch, seeded by (seed, batch): the same seed gives the same videos.
        generator = torch.Generator(device=device).manual_seed(config.seed + start)
        noise = torch.randn((len(batch), vae.out_channels, frames, height, width), generator=generator, device=device)
        with torch.no_grad():
            latents = scheduler.sample(model_fn, noise, generator=generator)
            video = vae.decode(latents.to(dtype)).float()  # (B, 3, T, H, W) in about [-1, 1]
        pixels = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        for offset, prompt in enumerate(batch):
            path = save_dir / video_name(start + offset, prompt)
            write_mp4(pixels[offset], path, config.save_fps)
            written.append(path)
    return written
