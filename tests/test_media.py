"""Real collections are messy: codecs, containers, rotation, variable frame rate, odd sizes, images."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pipelines.media import read_frames, resize_crop
from pipelines.probe import ProbeError, probe

WIDTH, HEIGHT, FRAMES = 160, 96, 12

# name: (codec, pixel format, encoder options, width, height)
VIDEOS = {
    "h264.mp4": ("libx264", "yuv420p", {}, WIDTH, HEIGHT),
    "hevc.mp4": ("libx265", "yuv420p", {"x265-params": "log-level=none"}, WIDTH, HEIGHT),
    "vp9.webm": ("libvpx-vp9", "yuv420p", {}, WIDTH, HEIGHT),
    "av1.mkv": ("libsvtav1", "yuv420p", {"preset": "12"}, WIDTH, HEIGHT),
    "prores.mov": ("prores_ks", "yuv422p10le", {}, WIDTH, HEIGHT),
    "mjpeg.avi": ("mjpeg", "yuvj420p", {}, WIDTH, HEIGHT),
    "mpeg4.avi": ("mpeg4", "yuv420p", {}, WIDTH, HEIGHT),
    "odd_size.mkv": ("ffv1", "yuv444p", {}, 161, 97),
}


def pattern(height: int, width: int) -> np.ndarray:
    """A white stripe on the left quarter, a green band on the top quarter, black elsewhere."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[:, : width // 4] = 255
    frame[: height // 4, width // 4 :] = (0, 255, 0)
    return frame


def write_video(path: Path, codec: str, pix_fmt: str, options: dict, width: int, height: int, **extra) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=12, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if "rotation" in extra:
            stream.set_display_rotation(extra["rotation"])
        if "pts" in extra:
            stream.codec_context.time_base = Fraction(1, 1000)
        for index in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(pattern(height, width), format="rgb24")
            if "pts" in extra:
                frame.pts, frame.time_base = extra["pts"][index], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    for name, (codec, pix_fmt, options, width, height) in VIDEOS.items():
        write_video(folder / name, codec, pix_fmt, options, width, height)
    write_video(folder / "rotated.mp4", "libx264", "yuv420p", {}, WIDTH, HEIGHT, rotation=90)
    # Variable frame rate: irregular gaps between timestamps (milliseconds).
    gaps = [0, 40, 120, 160, 300, 340, 380, 600, 640, 700, 900, 960]
    write_video(folder / "vfr.mp4", "libx264", "yuv420p", {}, WIDTH, HEIGHT, pts=gaps)
    image = Image.fromarray(pattern(HEIGHT, WIDTH))
    for extension in ("png", "webp", "bmp", "tiff"):
        image.save(folder / f"image.{extension}")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(folder / "phone.jpg", exif=exif)
    return folder


@pytest.mark.parametrize("name", [*VIDEOS, "vfr.mp4"])
def test_every_codec_and_container_probes_and_decodes(media: Path, name: str):
    width, height = VIDEOS.get(name, (None, None, None, WIDTH, HEIGHT))[3:]
    found = probe(media / name)
    assert (found.num_frames, found.height, found.width) == (FRAMES, height, width), found
    frames = read_frames(media / name, np.array([0, 5, 11]))
    assert frames.shape == (3, height, width, 3)
    # The picture survived: the left stripe is white, the right bottom is black.
    assert frames[:, :, : width // 8].mean() > 200 and frames[:, height // 2 :, width // 2 :].mean() < 40


def test_rotated_video_is_measured_and_read_as_displayed(media: Path):
    found = probe(media / "rotated.mp4")
    assert (found.height, found.width) == (WIDTH, HEIGHT)  # portrait on screen
    frames = read_frames(media / "rotated.mp4", np.array([0]))
    assert frames.shape == (1, WIDTH, HEIGHT, 3)
    # Turned a quarter counterclockwise: the left stripe is now along the bottom.
    assert frames[0, -WIDTH // 8 :].mean() > 200 and frames[0, : WIDTH // 2, HEIGHT // 2 :, 0].mean() < 40


@pytest.mark.parametrize("name", ["image.png", "image.webp", "image.bmp", "image.tiff"])
def test_image_formats(media: Path, name: str):
    found = probe(media / name)
    assert (found.num_frames, found.height, found.width) == (1, HEIGHT, WIDTH)
    frames = read_frames(media / name, np.array([0]))
    assert frames.shape == (1, HEIGHT, WIDTH, 3)
    error = np.abs(frames[0].astype(int) - pattern(HEIGHT, WIDTH))
    if name == "image.webp":  # PIL writes lossy WebP by default
        assert error.mean() < 2, error.mean()
    else:
        assert error.max() == 0  # lossless: the very pixels written


def test_exif_rotated_photo_is_measured_and_read_upright(media: Path):
    found = probe(media / "phone.jpg")
    assert (found.height, found.width) == (WIDTH, HEIGHT)
    frames = read_frames(media / "phone.jpg", np.array([0]))
    assert frames.shape == (1, WIDTH, HEIGHT, 3)
    # Turned a quarter clockwise, as EXIF orientation 6 says: the left stripe is now along the top.
    upright = np.rot90(pattern(HEIGHT, WIDTH), k=-1)
    assert np.abs(frames[0].astype(int) - upright).mean() < 2  # JPEG's error: about 0.6 levels


def test_a_file_with_a_video_name_but_other_bytes(tmp_path: Path):
    fake = tmp_path / "fake.mov"
    fake.write_bytes(b"\x00\x00\x00\x18ftypqt  " + bytes(200))
    with pytest.raises(ProbeError, match="not a readable video"):
        probe(fake)


def test_resize_crop_covers_then_centre_crops():
    frames = np.stack([pattern(HEIGHT, WIDTH)] * 2)  # (2, 96, 160, 3)
    video = resize_crop(frames, 64, 64)  # square out of landscape: the sides are cut
    assert video.shape == (3, 2, 64, 64)
    assert float(video.min()) >= -1.0 and float(video.max()) <= 1.0
    # Scaled by 64/96 the frame is 107 wide and the white stripe spans 0..27; the centred crop
    # starts at 21, so only its first ~5 columns are white, and below the green band all else is black.
    assert float(video[:, :, 40:, :4].mean()) > 0.9
    assert float(video[:, :, 40:, 10:].mean()) < -0.9
