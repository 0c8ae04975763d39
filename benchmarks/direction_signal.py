"""Does the caption's direction of motion teach the model anything? Uniform times against times
shifted towards noise (Open-Sora 1.2's timestep transform), side by side in one run.

Four demo clips of one scene (`--scene`), the same but for the direction the shape moves in, are
encoded with the demo VAE and the demo T5 (configs/demo); the demo model's STDiT is trained on them
from scratch with rectified flow (Open-Sora 1.2's loss), once per `--transform-scale` (0: uniform
times, no transform). Every `--every` steps it prints

    loss        the training loss of the step
    from noise  of the 4 captions, how many the prediction from pure noise (x0 = noise + v) puts
                nearest the clip of its own direction
    own / swap  the loss at 90 % noise with each clip's own caption, and with left<->right and
                up<->down swapped: equal means the direction word is ignored

    python benchmarks/direction_signal.py [--steps 1000] [--size 80 128] [--transform-scale 0 14]

The README (The demo model) quotes its figures: at 90 % noise the clip still shows where the shape
is, so under uniform times the model learns the clips without reading the direction word.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DIRECTIONS = ("left", "right", "up", "down")
SWAPPED = (1, 0, 3, 2)  # left<->right, up<->down


def clips(args) -> tuple[torch.Tensor, list[str]]:
    """(4, C, T, h, w) scaled latents of the scene moving each way, and their captions."""
    from pipelines.demo_data import DemoItem, caption, render_frames
    from pipelines.media import resize_crop
    from sora_model.vae import VideoAutoencoderKL

    vae = VideoAutoencoderKL.from_pretrained(str(ROOT / "configs" / "demo" / "vae"))
    shape, color, background = args.scene
    height, width = args.size
    latents, captions = [], []
    for direction in DIRECTIONS:
        # One crossing, every other frame, as the demo trains (frame_interval = 2).
        item = DemoItem("clip.mp4", "", "video", width, height, 2 * args.frames + 1, 8, shape, color, background,
                        direction)  # fmt: skip
        frames = np.stack(list(render_frames(item)))[0 : 2 * args.frames : 2]  # (T, H, W, 3)
        video = resize_crop(frames, height, width)[None]  # (1, 3, T, H, W) in [-1, 1], as preprocessing makes it
        with torch.no_grad():
            latents.append(vae.encode(video, torch.Generator().manual_seed(0))[0])
        captions.append(caption(shape, color, background, direction))
    return torch.stack(latents), captions


def train(latents: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor, scale: float, args) -> list[tuple]:
    from sora_model.diffusion.rflow import RFlow
    from sora_model.stdit import build_model

    torch.manual_seed(0)
    model = build_model("demo", caption_channels=y.shape[-1], model_max_length=y.shape[1],
                        input_size=tuple(latents.shape[2:]))  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    flow = RFlow(sample_method="uniform", use_timestep_transform=scale > 0, transform_scale=scale)
    sizes = (args.size[0], args.size[1], latents.shape[2])  # pixels, latent frames: the transform's input
    generator = torch.Generator().manual_seed(1)
    probe_noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    rows = []
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        t = flow.sample_timesteps(len(latents), generator, sizes)
        noise = torch.randn(latents.shape, generator=generator)
        loss = flow.training_losses(lambda x, t, mask: model(x, t, y, y_mask), latents, t, noise)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0:
            model.eval()
            with torch.no_grad():
                t = torch.full((len(latents),), float(flow.num_timesteps))
                x0 = probe_noise + model(probe_noise, t, y, y_mask)[:, : latents.shape[1]]  # (4, C, T, h, w)
                distance = ((x0[:, None] - latents[None]) ** 2).flatten(2).mean(-1)  # (4 predicted, 4 clips)
                right = int((distance.argmin(1) == torch.arange(len(latents))).sum())
                t = torch.full((len(latents),), 0.9 * flow.num_timesteps)
                x_t = flow.add_noise(latents, probe_noise, t)
                target = latents - probe_noise
                swapped = list(SWAPPED)
                own = ((model(x_t, t, y, y_mask)[:, : latents.shape[1]] - target) ** 2).mean().item()
                swap = ((model(x_t, t, y[swapped], y_mask[swapped])[:, : latents.shape[1]] - target) ** 2).mean().item()
            model.train()
            rows.append((step, loss.item(), right, own, swap, time.perf_counter() - started))
            print(f"  scale {scale:g} step {step}: loss {loss.item():.4f}  from noise {right}/4  "
                  f"own {own:.4f} swap {swap:.4f}  ({rows[-1][-1]:.0f} s)", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, nargs=2, default=(80, 128), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--frames", type=int, default=8, help="latent frames (every other frame of a crossing)")
    parser.add_argument("--scene", nargs=3, default=("white", "square", "yellow"), metavar=("COLOR", "SHAPE", "BG"))
    parser.add_argument("--transform-scale", type=float, nargs="+", default=(0.0, 14.0),
                        help="0: uniform times; else use_timestep_transform with this transform_scale")  # fmt: skip
    args = parser.parse_args()
    args.scene = (args.scene[1], args.scene[0], args.scene[2])  # (shape, colour, background)
    sys.path.insert(0, str(ROOT))
    from sora_model.text_encoder import T5Encoder

    latents, captions = clips(args)
    y, y_mask = T5Encoder.from_pretrained(str(ROOT / "configs" / "demo" / "t5"), 16).encode(captions)
    print(f"{len(captions)} clips {tuple(latents.shape[1:])} (C, T, h, w): {captions[0]!r} and the other directions")
    results = {}
    for scale in args.transform_scale:
        print(f"transform_scale {scale:g}:", flush=True)
        results[scale] = train(latents, y, y_mask, scale, args)
    print("\nstep  " + "  ".join(f"scale {scale:g}: from noise, own/swap loss at 90 %".ljust(44) for scale in results))
    for index, step in enumerate(row[0] for row in results[args.transform_scale[0]]):
        cells = [f"{rows[index][2]}/4, {rows[index][3]:.4f} / {rows[index][4]:.4f}" for rows in results.values()]
        print(f"{step:<5} " + "  ".join(cell.ljust(44) for cell in cells))


if __name__ == "__main__":
    main()
