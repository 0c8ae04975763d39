"""A small real dataset for the demo and the tests: clips and images of moving shapes.

`write_demo_data` writes H.264 mp4 clips and PNG/JPEG images of one coloured shape on a
plain background, at varied sizes (landscape, portrait, square), lengths and frame
rates, each with a caption that says what it shows, plus `data.csv` (`path,text`,
paths relative to the CSV). A few rows are broken on purpose (a truncated mp4, a text
file named `.mp4`, a path that does not exist) so the pipeline's handling of bad input
shows. Everything is a function of the seed.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.media import encode_mp4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "orange": (240, 140, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# (width, height): landscape, portrait and square; all even (H.264 4:2:0 needs even sides).
SIZES = (
    (256, 144),
    (320, 180),
    (426, 240),
    (384, 216),
    (144, 256),
    (180, 320),
    (240, 426),
    (192, 192),
    (256, 256),
    (224, 224),
)
FRAME_RATES = (8, 12, 24, 25, 30)
IMAGE_SHARE = 0.3  # fraction of the good samples that are still images
BROKEN = ("broken_truncated.mp4", "broken_not_a_video.mp4", "broken_missing.mp4")


@dataclass(frozen=True)
class DemoItem:
    """One row of the demo dataset and what its file holds."""

    path: str  # relative to the CSV
    text: str
    kind: str  # "video", "image" or "broken"
    width: int = 0
    height: int = 0
    num_frames: int = 0  # 1 for images
    fps: int = 0
    shape: str = ""
    color: str = ""
    background: str = ""
    direction: str = ""  # "" for images


def plan_demo(num: int = 24, seed: int = 0) -> list[DemoItem]:
    """The rows `write_demo_data` writes: `num` good samples, then the broken ones."""
    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    rng = random.Random(seed)
    items = []
    num_images = round(num * IMAGE_SHARE)
    for index in range(num):
        shape, color, background, direction = random_scene(rng)
        scene = {"shape": shape, "color": color, "background": background}
        width, height = SIZES[index % len(SIZES)]
        if index >= num - num_images:
            extension = "png" if index % 2 else "jpg"
            text = caption(shape, color, background)
            items.append(DemoItem(f"image_{index:03d}.{extension}", text, "image", width, height, 1, 0, **scene))
        else:
            # One crossing, a little longer than the 16 frames a demo training window spans (8
            # latent frames at stride 2): every window shows nearly all of it (README, The demo model).
            num_frames = rng.randrange(17, 21)
            fps = rng.choice(FRAME_RATES)
            text = caption(shape, color, background, direction)
            items.append(
                DemoItem(
                    f"clip_{index:03d}.mp4",
                    text,
                    "video",
                    width,
                    height,
                    num_frames,
                    fps,
                    **scene,
                    direction=direction,
                )
            )
    items += [
        DemoItem(BROKEN[0], "a truncated clip that cannot be decoded", "broken"),
        DemoItem(BROKEN[1], "a text file that pretends to be a video", "broken"),
        DemoItem(BROKEN[2], "a file that does not exist", "broken"),
    ]
    return items


def caption(shape: str, color: str, background: str, direction: str = "") -> str:
    """What a demo item shows, in the demo's words: "a white square moves down on a yellow
    background" (a clip), "an orange circle on a blue background" (an image, no direction)."""
    motion = f" moves {direction}" if direction else ""
    return f"{_article(color)} {color} {shape}{motion} on {_article(background)} {background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: random.Random) -> tuple[str, str, str, str]:
    """(shape, colour, background colour, direction), the two colours distinct."""
    color, background = rng.sample(sorted(COLORS), 2)
    return rng.choice(SHAPES), color, background, rng.choice(sorted(DIRECTIONS))


def render_frames(item: DemoItem) -> Iterator[np.ndarray]:
    """Frames (H, W, 3) uint8 of a demo item: the shape crossing the frame in its direction."""
    height, width = item.height, item.width
    radius = max(6, min(height, width) // 6)
    ys, xs = np.mgrid[0:height, 0:width]
    background = np.array(COLORS[item.background], dtype=np.uint8)
    color = np.array(COLORS[item.color], dtype=np.uint8)
    dx, dy = DIRECTIONS.get(item.direction, (0, 0))  # images stand still
    for t in range(item.num_frames):
        progress = (t + 0.5) / item.num_frames if item.num_frames > 1 else 0.5
        # From one edge to the other along the direction of motion, centred across it.
        cx = width / 2 + dx * (progress - 0.5) * (width - 2 * radius)
        cy = height / 2 + dy * (progress - 0.5) * (height - 2 * radius)
        u, v = xs - cx, ys - cy
        if item.shape == "circle":
            inside = u * u + v * v <= radius * radius
        elif item.shape == "square":
            inside = (np.abs(u) <= radius) & (np.abs(v) <= radius)
        else:  # triangle pointing up
            inside = (v <= radius) & (np.abs(u) <= (v + radius) / 2)
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[...] = background
        frame[inside] = color
        yield frame


def write_demo_data(out_dir: str | Path, num: int = 24, seed: int = 0, progress: bool = True) -> Path:
    """Write the demo dataset under `out_dir`; returns the path of its `data.csv`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = plan_demo(num, seed)
    for item in tqdm(items, desc="demo data", unit="file", disable=not progress):
        target = out_dir / item.path
        if item.kind == "video":
            _atomic(target, lambda tmp, item=item: _write_mp4(tmp, item))
        elif item.kind == "image":
            frame = next(render_frames(item))
            _atomic(target, lambda tmp, frame=frame, item=item: _write_image(tmp, frame, item.path))
        elif item.path == BROKEN[0]:
            good = DemoItem(item.path, item.text, "video", 256, 144, 24, 24, "circle", "red", "blue", "left")
            _atomic(target, lambda tmp, good=good: _write_truncated_mp4(tmp, good))
        elif item.path == BROKEN[1]:
            _atomic(target, lambda tmp: tmp.write_text("this is not a video, only text with an .mp4 name\n"))
        else:
            target.unlink(missing_ok=True)  # the missing file must really be missing
    csv_path = out_dir / "data.csv"

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "text"])
            writer.writerows([item.path, item.text] for item in items)

    _atomic(csv_path, write_csv)
    return csv_path


def _atomic(target: Path, write) -> None:
    """Write through a temporary name and rename, so no partial file is ever visible."""
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)


# Small files, quick to write; no B-frames.
DEMO_X264_OPTIONS = {"crf": "20", "preset": "veryfast", "x264-params": "threads=1:lookahead-threads=1:bframes=0"}


def _write_mp4(path: Path, item: DemoItem) -> None:
    path.write_bytes(encode_mp4(render_frames(item), item.fps, DEMO_X264_OPTIONS))


def _write_image(path: Path, frame: np.ndarray, name: str) -> None:
    image_format = "PNG" if name.endswith(".png") else "JPEG"
    Image.fromarray(frame).save(path, format=image_format)


def _write_truncated_mp4(path: Path, item: DemoItem) -> None:
    _write_mp4(path, item)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
