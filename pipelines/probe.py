"""Frame count, displayed size and frame rate of a video or image, without decoding it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import decord
from PIL import Image

av.logging.set_level(av.logging.PANIC)  # failures are reported per row, not as FFmpeg log lines

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


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
    except (OSError, SyntaxError, ValueError) as error:
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
        rotation = int(float(stream.metadata.get("rotate", 0) or 0)) % 180
    if rotation == 90:
        width, height = height, width
    if frames <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"no frames or no size in the container header ({frames} frames, {width}x{height})")
    return Probe(frames, height, width, fps)


def _probe_decord(path: Path) -> Probe:
    reader = decord.VideoReader(str(path))
    height, width, _ = reader[0].shape
    return Probe(len(reader), height, width, float(reader.get_avg_fps()))
