"""Contact sheets: a PNG grid with a few frames of each video, and lines of text under each row.

`sora demo-eval` draws one with the judge's verdicts under every sample; training previews draw
one per checkpoint with the prompt under every preview.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

SHEET_FRAMES = 4  # frames per row, evenly spaced over the video
# Layout, in pixels.
CELL = 128  # each frame fitted into a CELL x CELL box
GAP = 6
LINE = 16  # one line of text (the default font at FONT_SIZE)
FONT_SIZE = 12
TEXT, PAPER, EMPTY = (20, 20, 20), (255, 255, 255), (200, 200, 200)

Color = tuple[int, int, int]


@dataclass(frozen=True)
class SheetRow:
    """One video's row: its frames (None: unreadable, drawn as empty cells), a title line, and a
    second line of coloured pieces of text written one after the other."""

    frames: np.ndarray | Sequence[np.ndarray] | None  # (T, H, W, 3) uint8, at most SHEET_FRAMES shown
    title: str
    notes: Sequence[tuple[str, Color]] = field(default_factory=tuple)


def evenly_spaced(count: int, most: int) -> np.ndarray:
    """Up to `most` indices of range(count), evenly spaced, the first and the last included."""
    return np.unique(np.linspace(0, count - 1, min(count, most)).round().astype(int))


def sheet_frames(frames: np.ndarray) -> np.ndarray:
    """The SHEET_FRAMES frames (evenly spaced) that a row shows of a video (T, H, W, 3)."""
    return frames[evenly_spaced(len(frames), SHEET_FRAMES)]


def contact_sheet(rows: Sequence[SheetRow]) -> Image.Image:
    """The sheet as an RGB image: per row SHEET_FRAMES cells, the title, then the notes."""
    font = ImageFont.load_default(size=FONT_SIZE)  # FreeType's default font; a bitmap one without FreeType
    measure_text = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    text_width = max(
        max(measure_text(row.title, font=font), sum(measure_text(text, font=font) for text, _ in row.notes))
        for row in rows
    )
    width = GAP + max(SHEET_FRAMES * (CELL + GAP), int(text_width) + GAP)
    row_height = CELL + 2 * LINE + 2 * GAP
    sheet = Image.new("RGB", (width, GAP + len(rows) * row_height), PAPER)
    draw = ImageDraw.Draw(sheet)
    for index, row in enumerate(rows):
        top = GAP + index * row_height
        frames = [] if row.frames is None else row.frames
        for column in range(SHEET_FRAMES):
            left = GAP + column * (CELL + GAP)
            if column < len(frames):
                thumb = ImageOps.contain(Image.fromarray(frames[column]), (CELL, CELL))
                sheet.paste(thumb, (left + (CELL - thumb.width) // 2, top + (CELL - thumb.height) // 2))
            else:
                draw.rectangle((left, top, left + CELL - 1, top + CELL - 1), fill=EMPTY)
        draw.text((GAP, top + CELL + GAP), row.title, fill=TEXT, font=font)
        x = GAP
        for text, color in row.notes:
            draw.text((x, top + CELL + GAP + LINE), text, fill=color, font=font)
            x += measure_text(text, font=font)
    return sheet


def write_contact_sheet(rows: Sequence[SheetRow], path: Path) -> Path:
    """Draw the sheet into a PNG at `path` (written under a temporary name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    contact_sheet(rows).save(tmp, format="PNG")
    tmp.replace(path)
    return path
