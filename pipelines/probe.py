"""Frame count, displayed size and frame rate of a video or image, without decoding it."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import decord
from PIL import Image

from pipelines.dataset import IMAGE_EXTENSIONS

av.logging.set_level(av.logging.PANIC)  # failures are reported per row, not as FFmpeg log lines


class ProbeError(Exception):
    """A file whose metadata cannot be read; `reason` is short and groups alike failures."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Probe:
    num_frames: int
    height: int  # as displayed (after rotation)
    width: int
    fps: float  # 0 for images


def probe(path: str | Path) -> Probe:
    """Read a file's metadata: PIL for images, PyAV's container header for videos
    (decord when PyAV cannot open it)."""
    path = Path(path)
    if not path.exists():
        raise ProbeError("file not found", str(path))
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return _probe_image(path)
    try:
        return _probe_pyav(path)
    except av.error.InvalidDataError as error:
        # FFmpeg's demuxer rejects the bytes; decord (FFmpeg too) would fail the same way.
        raise ProbeError("not a readable video", str(error)) from None
    except (av.FFmpegError, IndexError, ValueError) as pyav_error:
        try:
            return _probe_decord(path)
        except (RuntimeError, decord.DECORDError) as decord_error:
            raise ProbeError("not a readable video", f"{pyav_error}; {decord_error}") from None


def _probe_image(path: Path) -> Probe:
    try:
        with Image.open(path) as image:
            width, height = image.size
            # EXIF orientations 5-8 rotate by 90 degrees: displayed width and height swap.
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ProbeError("not a readable image", str(error)) from None
    return Probe(1, height, width, 0.0)


def _probe_pyav(path: Path) -> Probe:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        frames = stream.frames
        if frames <= 0:  # some containers (mkv, webm) do not record it: count packets
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    if quarter_turns(path) % 2:  # shown on its side: displayed width and height swap
        width, height = height, width
    if frames <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"no frames or no size in the container header ({frames} frames, {width}x{height})")
    return Probe(frames, height, width, fps)


# ISO media files (mp4, mov) keep a video's display rotation in the track header ("tkhd")
# matrix. Reading it costs a few seeks, where asking FFmpeg costs decoding a frame.
ISO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".3gp"}
_ISO_CONTAINERS = {b"moov", b"trak", b"mdia"}


def quarter_turns(path: str | Path) -> int:
    """Counterclockwise quarter turns to display a video upright (0 when unknown or none)."""
    path = Path(path)
    if path.suffix.lower() not in ISO_EXTENSIONS:
        return 0
    try:
        with path.open("rb") as handle:
            angle = _video_track_angle(handle, handle.seek(0, 2))
    except (OSError, struct.error, IndexError):
        return 0
    return 0 if angle is None else round(-angle / 90) % 4


def _boxes(handle: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the ISO boxes between start and end."""
    position = start
    while position + 8 <= end:
        handle.seek(position)
        size, kind = struct.unpack(">I4s", handle.read(8))
        header = 8
        if size == 1:  # 64-bit size follows
            size, header = struct.unpack(">Q", handle.read(8))[0], 16
        elif size == 0:  # to the end of the enclosing box
            size = end - position
        if size < header:
            return
        yield kind, position + header, position + size
        position += size


def _video_track_angle(handle: BinaryIO, end: int) -> float | None:
    """Angle in degrees of the first video track's tkhd matrix, or None."""
    for kind, start, stop in _boxes(handle, 0, end):
        if kind != b"moov":
            continue
        for track_kind, track_start, track_stop in _boxes(handle, start, stop):
            if track_kind != b"trak":
                continue
            matrix, is_video = None, False
            for box, box_start, box_stop in _boxes(handle, track_start, track_stop):
                if box == b"tkhd":
                    handle.seek(box_start)
                    version = handle.read(1)[0]
                    # version+flags (4), times/ids (20 or 32), reserved/layer/volume (16), then the matrix
                    handle.seek(box_start + 4 + (32 if version == 1 else 20) + 16)
                    matrix = struct.unpack(">9i", handle.read(36))
                elif box == b"mdia":
                    for inner, inner_start, _ in _boxes(handle, box_start, box_stop):
                        if inner == b"hdlr":
                            handle.seek(inner_start + 8)
                            is_video = handle.read(4) == b"vide"
            if is_video and matrix is not None:
                return math.degrees(math.atan2(matrix[1], matrix[0]))
    return None


def _probe_decord(path: Path) -> Probe:
    reader = decord.VideoReader(str(path))
    height, width, _ = reader[0].shape
    return Probe(len(reader), height, width, float(reader.get_avg_fps()))
