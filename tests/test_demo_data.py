"""The demo dataset: real files that decode at the promised sizes, with captions that fit."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import decord
import numpy as np
import pytest
from PIL import Image

from pipelines.demo_data import BROKEN, COLORS, DIRECTIONS, plan_demo, write_demo_data
from tests.conftest import DEMO_NUM


def rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_lists_every_item_with_a_caption(demo_csv: Path):
    plan = plan_demo(DEMO_NUM, seed=0)
    table = rows(demo_csv)
    assert list(table[0]) == ["path", "text"]
    assert [(row["path"], row["text"]) for row in table] == [(item.path, item.text) for item in plan]
    assert all(row["text"].strip() for row in table)
    assert not any(Path(row["path"]).is_absolute() for row in table)


def test_the_mix_covers_orientations_videos_and_images():
    plan = [item for item in plan_demo(24, seed=0) if item.kind != "broken"]
    kinds = {item.kind for item in plan}
    assert kinds == {"video", "image"}
    assert {item.path.rsplit(".", 1)[1] for item in plan if item.kind == "image"} == {"png", "jpg"}
    shapes = {(item.width > item.height) - (item.width < item.height) for item in plan}
    assert shapes == {1, 0, -1}  # landscape, square, portrait
    assert len({item.fps for item in plan if item.kind == "video"}) >= 3
    # One crossing a clip, a little longer than a demo training window (16 frames at stride 2).
    lengths = {item.num_frames for item in plan if item.kind == "video"}
    assert len(lengths) >= 3 and lengths <= set(range(17, 21))


def test_clips_decode_with_decord_at_the_promised_size(demo_csv: Path):
    for item in plan_demo(DEMO_NUM, seed=0):
        if item.kind != "video":
            continue
        reader = decord.VideoReader(str(demo_csv.parent / item.path))
        assert len(reader) == item.num_frames, item.path
        assert reader[0].shape == (item.height, item.width, 3), item.path
        assert reader.get_avg_fps() == pytest.approx(item.fps), item.path


def test_images_open_at_the_promised_size(demo_csv: Path):
    for item in plan_demo(DEMO_NUM, seed=0):
        if item.kind == "image":
            with Image.open(demo_csv.parent / item.path) as image:
                assert image.size == (item.width, item.height)
                assert image.format == ("PNG" if item.path.endswith(".png") else "JPEG")


def shape_centre(frame: np.ndarray, color: str) -> np.ndarray:
    """Centre (x, y) of the pixels close to a named colour."""
    distance = np.abs(frame.astype(int) - np.array(COLORS[color])).sum(axis=2)
    ys, xs = np.nonzero(distance < 60)
    assert len(xs) > 20, f"no {color} shape found"
    return np.array([xs.mean(), ys.mean()])


def test_captions_say_what_the_clip_shows(demo_csv: Path):
    """The shape has the caption's colour and moves in the caption's direction."""
    for item in plan_demo(DEMO_NUM, seed=0):
        if item.kind != "video":
            continue
        reader = decord.VideoReader(str(demo_csv.parent / item.path))
        first = reader[0].asnumpy()
        last = reader[len(reader) - 1].asnumpy()
        corner = first[0, 0].astype(int)
        assert np.abs(corner - np.array(COLORS[item.background])).sum() < 60, item.path
        motion = shape_centre(last, item.color) - shape_centre(first, item.color)
        expected = np.array(DIRECTIONS[item.direction])
        assert motion @ expected > 0.3 * min(item.width, item.height), (item.path, item.text, motion)
        assert item.direction in item.text and item.color in item.text and item.shape in item.text


def test_broken_rows_are_really_broken(demo_csv: Path):
    folder = demo_csv.parent
    assert [row["path"] for row in rows(demo_csv)][-3:] == list(BROKEN)
    truncated, not_video, missing = (folder / name for name in BROKEN)
    assert truncated.stat().st_size > 0 and not missing.exists()
    assert not_video.read_text().startswith("this is not a video")
    for path in (truncated, not_video):
        with pytest.raises((RuntimeError, decord.DECORDError)):  # what decord raises for a file it cannot read
            reader = decord.VideoReader(str(path))
            reader.get_batch(list(range(len(reader)))).asnumpy()


def test_same_seed_same_bytes(tmp_path: Path, demo_csv: Path):
    write_demo_data(tmp_path, num=DEMO_NUM, seed=0, progress=False)
    for item in plan_demo(DEMO_NUM, seed=0):
        if item.kind != "broken" or item.path != BROKEN[2]:
            ours = hashlib.sha256((tmp_path / item.path).read_bytes()).hexdigest()
            theirs = hashlib.sha256((demo_csv.parent / item.path).read_bytes()).hexdigest()
            assert ours == theirs, item.path
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files left behind"


def test_other_seed_other_data():
    assert [item.text for item in plan_demo(8, seed=1)] != [item.text for item in plan_demo(8, seed=0)]


def test_num_must_be_positive(tmp_path: Path):
    with pytest.raises(ValueError, match="--num must be at least 1"):
        write_demo_data(tmp_path, num=0)
