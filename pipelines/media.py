"""Reading frames from videos and images, and fitting them to a bucket's size."""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import av
import decord
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipelines.dataset import IMAGE_EXTENSIONS


class DecodeError(Exception):
    """A file that opens but does not give the frames a bucket needs."""


def frame_indices(src_frames: int, num_frames: int, frame_interval: int, factor: float) -> np.ndarray:
    """Source frame indices to store for a bucket of T = num_frames.

    Frames are taken at frame_interval stride: up to max(T, floor(factor x T)) of them,
    centred in the clip, so training can still draw a random T-window each epoch.
    Images (and T = 1 buckets) keep one frame, the middle one for a video.
    """
    available = (src_frames - 1) // frame_interval + 1  # strided frames the clip has
    if num_frames == 1:
        return np.array([(src_frames - 1) // 2]) if src_frames > 1 else np.array([0])
    keep = min(available, max(num_frames, math.floor(factor * num_frames)))
    start = ((available - keep) // 2) * frame_interval
    return start + frame_interval * np.arange(keep)


def read_frames(path: str | Path, indices: np.ndarray) -> np.ndarray:
    """Frames (F, H, W, 3) uint8 at `indices`, as displayed. decord first, PyAV when it fails."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        try:
            with Image.open(path) as image:
                return np.array(ImageOps.exif_transpose(image).convert("RGB"))[None]  # writable, for torch
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise DecodeError(f"cannot decode image: {error}") from None
    try:
        reader = decord.VideoReader(str(path))
        if int(indices.max()) >= len(reader):
            raise DecodeError(f"needs frame {int(indices.max())} but decord sees {len(reader)} frames")
        return reader.get_batch(indices.tolist()).asnumpy()
    except (RuntimeError, decord.DECORDError):
        return _read_frames_pyav(path, indices)


def _read_frames_pyav(path: Path, indices: np.ndarray) -> np.ndarray:
    wanted = set(indices.tolist())
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    # Shown upright as decord shows it: FFmpeg's rotation is counterclockwise degrees.
                    turns = round(frame.rotation / 90) % 4
                    frames[index] = np.rot90(frame.to_ndarray(format="rgb24"), turns)
                if index >= max(wanted):
                    break
    except (av.FFmpegError, IndexError) as error:
        raise DecodeError(f"cannot decode video: {error}") from None
    missing = wanted - frames.keys()
    if missing:
        raise DecodeError(f"decoded {len(frames)} of the {len(wanted)} frames needed (first missing: {min(missing)})")
    return np.stack([frames[i] for i in indices.tolist()])


def resize_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, height, width) float in [-1, 1]: scale to cover, centre crop."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    src_h, src_w = video.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    if (new_h, new_w) != (src_h, src_w):
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    video = video[:, :, top : top + height, left : left + width]  # (F, 3, height, width)
    return (video.clamp(0, 255) / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()  # (3, F, height, width)


# x264 settings of our videos: one encoder thread, and no macroblock-tree rate control (with
# it, x264 gave different bytes for the same frames from one call to the next, seen on noisy
# frames in threads). The same frames give the same bytes.
X264_OPTIONS = {"crf": "18", "x264-params": "threads=1:mbtree=0"}


def encode_mp4(frames: Iterable[np.ndarray], fps: int, options: Mapping[str, str] = X264_OPTIONS) -> bytes:
    """(H, W, 3) uint8 frames -> the bytes of an H.264 mp4 (yuv420p); `options` go to libx264."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("an mp4 needs at least one frame")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=dict(options))
        stream.height, stream.width, stream.pix_fmt = first.shape[0], first.shape[1], "yuv420p"
        for frame in itertools.chain([first], frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def write_mp4(frames: Iterable[np.ndarray], path: Path, fps: int) -> None:
    """Write an mp4 under a temporary name and rename it: no partial file is ever visible."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_mp4(frames, fps))
    tmp.replace(path)
