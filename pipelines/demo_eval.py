"""`sora demo-eval`: does a sampled video show what its demo caption says? Judged from the pixels.

The demo dataset (demo_data.py) shows one coloured shape moving in one direction on a plain
background, captioned "a white square moves down on a yellow background". A model that learnt
it draws that. From a video's frames alone this module measures

    background  the per-channel median of the border pixels, named by the nearest palette colour
    colour      the per-channel median of the shape mask's core, named the same way; the mask is
                the pixels clearly unlike the background, less isolated specks
    shape       how much of the mask's bounding box the mask fills: square 1, circle pi/4, triangle 1/2
    direction   the mask's median point, first quarter of the frames against the last quarter;
                the axis and sign that moved most, or "none" under a small threshold

and compares them with the caption, parsed with demo_data's own vocabulary. Medians, a light
blur and the specks' removal make it indifferent to codec noise and to blurry, noisy model
output; the demo's own files score 100 % against their own captions (tests/test_demo_eval.py).
A shape under ~20 px across, blurred, can read as a circle: the fill ratio needs its corners.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pipelines.config import ConfigError
from pipelines.contact_sheet import SheetRow, evenly_spaced, sheet_frames, write_contact_sheet
from pipelines.dataset import SAMPLES_TABLE, read_table, resolve_paths
from pipelines.demo_data import COLORS, DIRECTIONS, SHAPES
from pipelines.media import DecodeError, read_frames
from pipelines.probe import ProbeError, probe

# The attributes judged, in report order, with the words the report uses for them.
ATTRIBUTES = {"background": "background colour", "color": "shape colour", "shape": "shape", "direction": "direction"}
NONE = "none"  # what is measured when there is no shape, or it does not move

# 5x5 box blur before measuring: averaging 25 pixels divides per-pixel noise by 5 (sigma 20 -> 4
# grey levels), far under SHAPE_DISTANCE, while the demo's shapes (radius >= 6 px, 24 px at the
# smallest demo size) keep their extent at the half-way contour the threshold draws.
BLUR_RADIUS = 2
# Opening (erode, then dilate) of the shape mask by a 3x3 square: removes the specks of a few
# pixels that strong noise still pushes over SHAPE_DISTANCE after the blur (they would stretch the
# shape's bounding box), and keeps a square whole and a circle or triangle all but a corner pixel.
OPENING = 3
# Border ring (px) sampled for the background. The demo's shapes never touch the frame edge, and
# a model's shape that does covers a minority of the ring, which the median ignores.
BORDER = 2
# A pixel belongs to the shape when its colour is this far (RGB distance) from the background:
# half the distance between the two closest palette colours (yellow and orange, 71), so a
# pixel over it is nearer to some other palette colour than to the background's.
SHAPE_DISTANCE = min(math.dist(a, b) for a, b in itertools.combinations(COLORS.values(), 2)) / 2
# A frame shows a shape when its mask covers this share of the frame: 6x below the smallest demo
# shape (a triangle, 2r^2 with r = short side / 6: ~3 % of a 16:9 frame), far above the few
# pixels that noise or codec ringing push over SHAPE_DISTANCE after the blur.
MIN_SHAPE_SHARE = 0.005
# Share of the frames at each end whose median point is compared. A quarter averages out
# jitter and, for the demo's edge-to-edge motion, still leaves ~0.5 of the frame between ends.
END_SHARE = 0.25
# Under this displacement (a fraction of the frame's width or height) the shape "does not move":
# ten times below the demo's (~0.5), ten times above the jitter of a median point (< 1 px of 144).
MIN_MOTION = 0.05
# Mask area / bounding-box area of each shape as demo_data draws it (triangle: base 2r, height 2r).
FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}


class CaptionError(ConfigError):
    """A caption that is not one demo_data writes."""


@dataclass(frozen=True)
class Caption:
    """What a demo caption says."""

    color: str
    shape: str
    background: str
    direction: str | None  # None for a still image's caption


def _choice(name: str, words: Iterable[str]) -> str:
    return rf"(?P<{name}>{'|'.join(map(re.escape, sorted(words, key=len, reverse=True)))})"


# demo_data's grammar: "a|an COLOUR SHAPE [moves DIRECTION] on a|an COLOUR background".
CAPTION = re.compile(
    rf"an? {_choice('color', COLORS)} {_choice('shape', SHAPES)}(?: moves {_choice('direction', DIRECTIONS)})?"
    rf" on an? {_choice('background', COLORS)} background"
)
GRAMMAR = (
    "'a COLOUR SHAPE [moves DIRECTION] on a COLOUR background' with COLOUR one of "
    f"{', '.join(COLORS)}; SHAPE one of {', '.join(SHAPES)}; DIRECTION one of {', '.join(DIRECTIONS)}"
)


def parse_caption(text: str) -> Caption:
    """The attributes of a demo caption; case, extra spaces and a final period do not matter."""
    match = CAPTION.fullmatch(" ".join(text.lower().split()).removesuffix("."))
    if match is None:
        raise CaptionError(f"not a demo caption: {text!r}; expected {GRAMMAR}")
    return Caption(match["color"], match["shape"], match["background"], match["direction"])


@dataclass(frozen=True)
class Measurement:
    """What a video shows. color and shape are None when no frame shows a shape."""

    background: str
    background_rgb: tuple[int, int, int]
    color: str | None
    color_rgb: tuple[int, int, int] | None
    shape: str | None
    fill: float | None  # mask area / bounding-box area, median over the frames with a shape
    direction: str  # a DIRECTIONS name, or NONE
    motion: tuple[float, float]  # (dx, dy) of the median point, as fractions of width and height


def nearest_color(rgb: np.ndarray) -> str:
    """The palette name nearest (RGB distance) to a colour."""
    return min(COLORS, key=lambda name: math.dist(COLORS[name], rgb))


def measure(frames: np.ndarray) -> Measurement:
    """Measure a video's frames (T, H, W, 3) uint8 (an image is T = 1)."""
    _, height, width, _ = frames.shape
    blurred = np.stack([_blur(frame) for frame in frames]).astype(np.float32)  # (T, H, W, 3)
    border = np.concatenate(
        [
            blurred[:, :BORDER].reshape(-1, 3),
            blurred[:, -BORDER:].reshape(-1, 3),
            blurred[:, :, :BORDER].reshape(-1, 3),
            blurred[:, :, -BORDER:].reshape(-1, 3),
        ]
    )  # (N, 3)
    # Of the blurred frames, as the mask compares them: noise clipped at 0 or 255 moves a blurred
    # (averaged) pixel off the median of the unblurred ones.
    background = np.median(border, axis=0)  # (3,)
    distance = ((blurred - background) ** 2).sum(axis=-1)  # (T, H, W) squared RGB distance
    masks = np.stack([_open(mask) for mask in distance > SHAPE_DISTANCE**2])  # (T, H, W)
    shown = masks.sum(axis=(1, 2)) >= MIN_SHAPE_SHARE * height * width  # (T,) frames with a shape
    if not shown.any():
        return Measurement(nearest_color(background), _rgb(background), None, None, None, None, NONE, (0.0, 0.0))

    # The shape's colour from its core, the half of its pixels least like the background, as
    # the frames show them: a blurry shape's rim, and the blur above, mix it with the background.
    inside = masks & shown[:, None, None]
    core = inside & (distance >= np.median(distance[inside]))
    color = np.median(frames[core], axis=0)  # (3,)
    points = [(np.median(xs) / width, np.median(ys) / height) for ys, xs in map(np.nonzero, masks[shown])]
    fill = float(np.median([fill_ratio(mask) for mask in masks[shown]]))
    ends = max(1, round(END_SHARE * len(points)))
    dx, dy = np.median(points[-ends:], axis=0) - np.median(points[:ends], axis=0)
    return Measurement(
        background=nearest_color(background),
        background_rgb=_rgb(background),
        color=nearest_color(color),
        color_rgb=_rgb(color),
        shape=min(FILL, key=lambda shape: abs(FILL[shape] - fill)),
        fill=round(fill, 3),
        direction=direction_of(float(dx), float(dy)),
        motion=(round(float(dx), 3), round(float(dy), 3)),
    )


def _blur(frame: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).filter(ImageFilter.BoxBlur(BLUR_RADIUS)))


def _open(mask: np.ndarray) -> np.ndarray:
    """A mask (H, W) less its specks: morphological opening (erode, then dilate) by OPENING."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.filter(ImageFilter.MinFilter(OPENING)).filter(ImageFilter.MaxFilter(OPENING))) > 0


def fill_ratio(mask: np.ndarray) -> float:
    """How much of its bounding box a mask (H, W) with at least one pixel fills."""
    ys, xs = np.nonzero(mask)
    return len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    red, green, blue = (round(float(value)) for value in values)
    return red, green, blue


def direction_of(dx: float, dy: float) -> str:
    """The DIRECTIONS name of a displacement (fractions of the frame): its larger axis, by sign."""
    if max(abs(dx), abs(dy)) < MIN_MOTION:
        return NONE
    step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
    return next(name for name, vector in DIRECTIONS.items() if vector == step)


# Frames read of a video, evenly spaced, first and last included: every frame of a demo clip
# (10-48) or of a sample, while a long file stays a bounded read.
MAX_FRAMES = 64


def read_video(path: Path) -> np.ndarray:
    """Up to MAX_FRAMES frames (T, H, W, 3) uint8 of a video, evenly spaced; an image as T = 1."""
    return read_frames(path, evenly_spaced(probe(path).num_frames, MAX_FRAMES))


@dataclass(frozen=True)
class Judgement:
    """One row of the table: the caption against what its file shows."""

    path: str  # as the table writes it
    prompt: str
    caption: Caption
    frames: np.ndarray | None  # the few frames the contact sheet shows; None when unreadable
    measured: Measurement | None
    error: str | None = None  # why the file could not be measured

    @property
    def checks(self) -> dict[str, bool]:
        """Attribute -> whether the video shows it; direction only when the caption has one.
        An unreadable file fails every check of its caption."""
        said = {
            "background": self.caption.background,
            "color": self.caption.color,
            "shape": self.caption.shape,
            "direction": self.caption.direction,
        }
        return {
            name: self.measured is not None and getattr(self.measured, name) == value
            for name, value in said.items()
            if value is not None
        }


def judge_file(path: Path, shown_as: str, prompt: str, caption: Caption) -> Judgement:
    try:
        frames = read_video(path)
    except (ProbeError, DecodeError, OSError) as error:
        reason = error.reason if isinstance(error, ProbeError) else str(error)  # a ProbeError's detail repeats the path
        return Judgement(shown_as, prompt, caption, None, None, f"cannot read: {reason}")
    return Judgement(shown_as, prompt, caption, sheet_frames(frames), measure(frames))


def judge_table(table_path: Path) -> list[Judgement]:
    """Judge every row of a `path,text` CSV; relative paths are against the CSV's folder."""
    table = read_table(table_path)
    if table.empty:
        raise ConfigError(f"{table_path}: no rows to judge")
    paths, texts = table["path"].astype(str).tolist(), table["text"].astype(str).tolist()
    captions = []
    for row, text in enumerate(texts, start=1):
        try:
            captions.append(parse_caption(text))
        except CaptionError as error:
            raise CaptionError(f"{table_path} row {row}: {error}") from None
    files = resolve_paths(table["path"].astype(str), table_path, None)
    return [
        judge_file(file, path, text, caption)
        for file, path, text, caption in zip(files, paths, texts, captions, strict=True)
    ]


def accuracy(judgements: list[Judgement]) -> dict[str, tuple[int, int]]:
    """Attribute -> (samples that show it, samples whose caption says it)."""
    counts = {name: [0, 0] for name in ATTRIBUTES}
    for judgement in judgements:
        for name, correct in judgement.checks.items():
            counts[name][0] += correct
            counts[name][1] += 1
    return {name: (correct, total) for name, (correct, total) in counts.items()}


def _verdicts(judgement: Judgement) -> list[tuple[str, bool]]:
    """('direction up (caption: down)', False) per checked attribute, in report order."""
    if judgement.measured is None:
        return [(judgement.error or "cannot read", False)]
    verdicts = []
    for name, correct in judgement.checks.items():
        measured = getattr(judgement.measured, name) or NONE
        said = getattr(judgement.caption, name)
        verdicts.append((f"{ATTRIBUTES[name]} {measured}" + ("" if correct else f" (caption: {said})"), correct))
    return verdicts


def format_report(judgements: list[Judgement], table_path: Path, sheet: Path) -> str:
    unreadable = sum(judgement.measured is None for judgement in judgements)
    lines = [
        f"judged {len(judgements)} samples of {table_path}" + (f" ({unreadable} unreadable)" if unreadable else "")
    ]
    for name, (correct, total) in accuracy(judgements).items():
        percent = f"{100 * correct / total:5.1f} %" if total else "    -"
        lines.append(f"  {ATTRIBUTES[name]:<18} {correct:>4}/{total:<4} {percent}")
    wrong = [judgement for judgement in judgements if not all(judgement.checks.values())]
    lines.append(f"wrong: {len(wrong)} of {len(judgements)}")
    for judgement in wrong:
        faults = "; ".join(text for text, correct in _verdicts(judgement) if not correct)
        lines.append(f"  {judgement.path}  {judgement.prompt!r}: {faults}")
    lines.append(f"contact sheet: {sheet}")
    return "\n".join(lines) + "\n"


def report_to_dict(judgements: list[Judgement], table_path: Path, sheet: Path) -> dict:
    return {
        "table": str(table_path),
        "samples": len(judgements),
        "accuracy": {
            name: {"correct": correct, "total": total, "percent": round(100 * correct / total, 1) if total else None}
            for name, (correct, total) in accuracy(judgements).items()
        },
        "rows": [
            {
                "path": judgement.path,
                "prompt": judgement.prompt,
                "caption": asdict(judgement.caption),
                "measured": None if judgement.measured is None else asdict(judgement.measured),
                "error": judgement.error,
                "correct": judgement.checks,
            }
            for judgement in judgements
        ],
        "contact_sheet": str(sheet),
    }


OK, WRONG = (20, 130, 40), (200, 30, 30)


def _sheet_row(judgement: Judgement) -> SheetRow:
    notes = [
        (f"{text} {'ok' if correct else 'WRONG'}   ", OK if correct else WRONG)
        for text, correct in _verdicts(judgement)
    ]
    return SheetRow(judgement.frames, f"{judgement.path}: {judgement.prompt}", notes)


def demo_eval(samples_dir: str | Path, prompts: str | Path | None, sheet: str | Path | None, as_json: bool) -> str:
    """Judge the videos of a `path,text` table (default SAMPLES_DIR/samples.csv), draw the contact
    sheet (default SAMPLES_DIR/contact_sheet.png); returns the report as text or JSON."""
    samples_dir = Path(samples_dir)
    if not samples_dir.is_dir():
        raise ConfigError(f"{samples_dir} is not a folder; give the folder `sora sample` wrote (its --save-dir)")
    table_path = Path(prompts) if prompts is not None else samples_dir / SAMPLES_TABLE
    if not table_path.is_file():
        hint = "" if prompts is not None else "; `sora sample` writes it, or name a path,text CSV with --prompts"
        raise ConfigError(f"prompt table not found: {table_path}{hint}")
    judgements = judge_table(table_path)
    sheet = Path(sheet) if sheet is not None else samples_dir / "contact_sheet.png"
    write_contact_sheet([_sheet_row(judgement) for judgement in judgements], sheet)
    if as_json:
        return json.dumps(report_to_dict(judgements, table_path, sheet), indent=2) + "\n"
    return format_report(judgements, table_path, sheet)
