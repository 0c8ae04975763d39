"""`sora fit-demo-vae`: a small SD-geometry VAE fitted to the demo's frames, so the demo can learn.

The debug VAE (`sora debug-models`) has random weights: it keeps the SD VAE's latent shapes
but reconstructs nothing, so whatever the demo's diffusion model learns decodes to noise.
This module fits a small diffusers `AutoencoderKL` with the same geometry (4 latent
channels, spatial stride 8) to frames of the kind `sora demo-data` writes: one coloured
shape on a plain background. The frames are drawn by `render_frames` (no codec), from
random `plan_demo`-style scenes, whole but small (48 to 96 pixels a side): the network is
convolutional, so what it learns there holds at the demo's sizes. Held-out frames from
another seed, at the demo's own sizes, measure the fit: PSNR, and whether the demo's judge
reads each round trip with its scene's background and shape colour. The shape is a few per
cent of a frame, so its pixels weigh more in the loss (`foreground_weight`): without that the
fit learns the backgrounds and leaves every shape some average colour.

The latents' spread is then measured on the held-out frames and stored the way diffusers
stores it (`scaling_factor`, `shift_factor`), so that `VideoAutoencoderKL` hands the
diffusion model latents of about zero mean and unit variance, as 0.18215 does for SD.
The folder loads with the same `from_pretrained` as `stabilityai/sd-vae-ft-ema`.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from pipelines.demo_data import DemoItem, plan_demo, random_scene, render_frames

FIT_FILE = "fit.json"
SPATIAL_STRIDE = 8  # the SD VAE's: 3 downsamplings


@dataclass(frozen=True)
class DemoVaeFit:
    """How `fit_demo_vae` builds and fits the VAE; the defaults made the candidate the README reports."""

    steps: int = 1000
    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 64, 64, 64)  # 4 blocks: stride 8
    layers_per_block: int = 1
    norm_num_groups: int = 8
    batch_size: int = 16
    frame_sides: tuple[int, int] = (48, 96)  # training frames' smallest and largest side, multiples of 8
    # AdamW, cosine decay to 0 after a linear warm-up. On one fixed batch, 3e-4 learned faster
    # than 1e-3 in the first 90 steps, and 3e-3 stalled (the GroupNorms make the net touchy).
    lr: float = 1e-3
    warmup_steps: int = 100
    # KL weight on the summed KL, relative to the summed per-pixel loss (as LDM's 1e-6). The
    # frames are piecewise constant, so L1 is the reconstruction loss (sharp edges, no blur).
    kl_weight: float = 1e-6
    # The shape covers ~5 % of a frame: under a plain per-pixel loss the fit gets the background
    # right and leaves the shape's colour wrong. Pixels unlike the frame's background count this
    # many times over.
    foreground_weight: float = 10.0
    # The posterior's log-variance starts here, not at 0: with std 1 the sampled latents would
    # be mostly noise at first, and the tiny KL weight barely pulls it back up.
    initial_logvar: float = -8.0
    eval_items: int = 10  # held-out frames: one per demo size
    eval_seed_offset: int = 1000  # held-out scenes come from seed + this offset


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak range 2)."""
    mse = torch.mean((reconstruction.clamp(-1, 1).double() - target.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(2.0**2 / mse)


def build_demo_vae(fit: DemoVaeFit) -> AutoencoderKL:
    """A small AutoencoderKL with the SD VAE's geometry; the scale is set after fitting."""
    if len(fit.block_out_channels) != 4:
        raise ValueError(f"block_out_channels needs 4 entries (stride 8), got {fit.block_out_channels}")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=fit.block_out_channels,
        layers_per_block=fit.layers_per_block,
        latent_channels=4,
        norm_num_groups=fit.norm_num_groups,
        sample_size=256,  # the demo's frames are 144 to 426 pixels a side
    )


def _to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _random_frame(rng: random.Random, width: int, height: int) -> np.ndarray:
    """One frame of a random demo scene of the given size, at a random point of its motion."""
    shape, color, background, direction = random_scene(rng)
    num_frames = rng.randrange(10, 49)  # as plan_demo's clips
    scene = {"shape": shape, "color": color, "background": background, "direction": direction}
    item = DemoItem("", "", "video", width, height, num_frames, **scene)
    return next(itertools.islice(render_frames(item), rng.randrange(num_frames), None))


def training_batch(fit: DemoVaeFit, rng: random.Random) -> torch.Tensor:
    """(batch_size, 3, H, W) whole demo frames drawn small, one random size per batch, in [-1, 1].

    Whole frames, not crops of large ones: the VAE's GroupNorms normalise over the frame,
    so training frames must hold what held-out frames hold (a background and one shape
    that covers the same share of it); the shape scales with the frame.
    """
    low, high = fit.frame_sides
    sides = range(low, high + 1, SPATIAL_STRIDE)
    height, width = rng.choice(sides), rng.choice(sides)
    return _to_tensor([_random_frame(rng, width, height) for _ in range(fit.batch_size)])


def foreground_weights(frames: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, H, W) per-pixel loss weights: `weight` where a pixel differs from its frame's
    background (the median colour of the frame's border), 1 elsewhere."""
    border = torch.cat([frames[:, :, 0], frames[:, :, -1], frames[:, :, :, 0], frames[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    foreground = (frames - background).abs().amax(dim=1, keepdim=True) > 2 / 127.5
    return 1 + (weight - 1) * foreground.float()


def held_out_scenes(fit: DemoVaeFit) -> list[tuple[DemoItem, torch.Tensor]]:
    """The middle frame (1, 3, H, W) of each of `eval_items` demo scenes of another seed, cropped
    to multiples of 8, with the scene it shows."""
    items = [item for item in plan_demo(fit.eval_items, fit.seed + fit.eval_seed_offset) if item.kind != "broken"]
    scenes = []
    for item in items:
        frame = next(itertools.islice(render_frames(item), item.num_frames // 2, None))
        height, width = (side - side % SPATIAL_STRIDE for side in frame.shape[:2])
        top, left = (frame.shape[0] - height) // 2, (frame.shape[1] - width) // 2
        scenes.append((item, _to_tensor([frame[top : top + height, left : left + width]])))
    return scenes


def held_out_frames(fit: DemoVaeFit) -> list[torch.Tensor]:
    """The frames of `held_out_scenes`."""
    return [frame for _, frame in held_out_scenes(fit)]


@torch.no_grad()
def colors_kept(vae: AutoencoderKL, scenes: list[tuple[DemoItem, torch.Tensor]]) -> float:
    """Share of the scenes whose round trip through the VAE the demo's judge (`sora demo-eval`)
    reads with the scene's background colour and shape colour."""
    from pipelines.demo_eval import measure

    right = 0
    for item, frame in scenes:
        reconstruction = vae.decode(vae.encode(frame).latent_dist.mean).sample.clamp(-1, 1)
        pixels = ((reconstruction[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()  # (H, W, 3)
        seen = measure(pixels[None])
        right += seen.background == item.background and seen.color == item.color
    return right / len(scenes)


@torch.no_grad()
def evaluate(vae: AutoencoderKL, frames: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """PSNR of decode(posterior mean) over all held-out pixels, and the posterior means' (4, N) values."""
    reconstructions, means = [], []
    for frame in frames:  # (1, 3, H, W): the demo's sizes differ
        mean = vae.encode(frame).latent_dist.mean  # (1, 4, H/8, W/8)
        reconstructions.append(vae.decode(mean).sample.flatten())
        means.append(mean.flatten(2)[0])  # (4, h*w)
    targets = torch.cat([frame.flatten() for frame in frames])
    return psnr(torch.cat(reconstructions), targets), torch.cat(means, dim=1)


@torch.no_grad()
def balance_latent_channels(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Reparametrise the latent space so each channel has mean 0 and std 1 (given each channel's
    `mean` and `std`, (4,)), leaving reconstructions unchanged.

    diffusers keeps one `scaling_factor` for all channels; a fitted VAE's channels can differ
    several times in spread, and the diffusion model, which sees unit noise in every channel,
    then makes errors that the low-spread channels magnify into colour changes. Folding a
    per-channel affine map into the 1x1 convolutions on both sides of the latent removes that:
    the encoder's `quant_conv` emits z' = (z - mean) / std (and the log-variance less 2 log std),
    the decoder's `post_quant_conv` takes z' and multiplies it back before its own weights.
    """
    channels = mean.numel()
    encode, decode = vae.quant_conv, vae.post_quant_conv  # 1x1 convolutions: (2C, ...) and (C, C)
    encode.weight[:channels] /= std[:, None, None, None]
    encode.bias[:channels] = (encode.bias[:channels] - mean) / std
    encode.bias[channels:] -= 2 * torch.log(std)
    decode.bias += (decode.weight[:, :, 0, 0] @ mean[:, None])[:, 0]
    decode.weight *= std[None, :, None, None]


def _lr_factor(step: int, fit: DemoVaeFit) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < fit.warmup_steps:
        return (step + 1) / fit.warmup_steps
    progress = (step - fit.warmup_steps) / max(1, fit.steps - fit.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def fit_demo_vae(out_dir: str | Path, fit: DemoVaeFit = DemoVaeFit(), progress: bool = True) -> dict:
    """Fit the demo VAE, set its latent scale and shift, write it to `out_dir`; returns fit.json's content."""
    if any(side % SPATIAL_STRIDE or side < SPATIAL_STRIDE for side in fit.frame_sides):
        raise ValueError(f"frame_sides must be multiples of {SPATIAL_STRIDE}, got {fit.frame_sides}")
    start = time.monotonic()
    rng = random.Random(fit.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fit.seed)
        vae = build_demo_vae(fit)
        with torch.no_grad():  # quant_conv's output: 4 mean channels, then 4 log-variance channels
            vae.quant_conv.weight[4:] = 0.0
            vae.quant_conv.bias[4:] = fit.initial_logvar
        optimizer = torch.optim.AdamW(vae.parameters(), lr=fit.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, fit))
        vae.train()
        bar = tqdm(range(fit.steps), desc="fit demo vae", unit="step", disable=not progress)
        for _ in bar:
            frames = training_batch(fit, rng)  # (B, 3, H, W)
            posterior = vae.encode(frames).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            weights = foreground_weights(frames, fit.foreground_weight)  # (B, 1, H, W)
            reconstruction_loss = (weights * torch.abs(reconstruction - frames)).mean() / weights.mean()
            kl_loss = posterior.kl().sum() / frames.numel()  # both per pixel, as LDM's sums
            loss = reconstruction_loss + fit.kl_weight * kl_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(l1=f"{reconstruction_loss.item():.4f}")
    vae.eval()
    scenes = held_out_scenes(fit)
    frames = [frame for _, frame in scenes]
    _, unbalanced = evaluate(vae, frames)
    balance_latent_channels(vae, unbalanced.mean(dim=1), unbalanced.std(dim=1))
    held_out, means = evaluate(vae, frames)
    # One scale and one shift for all channels, as diffusers stores them (about 1 and 0 once the
    # channels are balanced): the diffusion model sees latents of mean 0 and std 1.
    shift, scale = means.mean().item(), 1.0 / means.std().item()
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out_dir, safe_serialization=True)
    report = {
        "fit": asdict(fit),
        "seconds": round(time.monotonic() - start, 1),
        "held_out_psnr_db": round(held_out, 2),
        "held_out_colors_kept": colors_kept(vae, scenes),
        "parameters": sum(parameter.numel() for parameter in vae.parameters()),
        "scaling_factor": scale,
        "shift_factor": shift,
        "latent_channel_mean": [round(value, 4) for value in means.mean(dim=1).tolist()],
        "latent_channel_std": [round(value, 4) for value in means.std(dim=1).tolist()],
        "balanced_from": {
            "latent_channel_mean": [round(value, 4) for value in unbalanced.mean(dim=1).tolist()],
            "latent_channel_std": [round(value, 4) for value in unbalanced.std(dim=1).tolist()],
        },
    }
    (Path(out_dir) / FIT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
