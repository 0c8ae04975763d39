"""The demo judge: the demo's own files pass against their own captions, and only those."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipelines.config import ConfigError
from pipelines.demo_data import COLORS, DIRECTIONS, SHAPES, DemoItem, plan_demo, render_frames
from pipelines.demo_eval import (
    FILL,
    NONE,
    Caption,
    CaptionError,
    Judgement,
    accuracy,
    demo_eval,
    direction_of,
    judge_table,
    measure,
    parse_caption,
    read_video,
)
from tests.conftest import DEMO_NUM, run_sora

GOOD = [item for item in plan_demo(DEMO_NUM, seed=0) if item.kind != "broken"]
NUM_VIDEOS = sum(item.kind == "video" for item in GOOD)
OPPOSITE = {name: next(o for o, v in DIRECTIONS.items() if v == (-dx, -dy)) for name, (dx, dy) in DIRECTIONS.items()}


def write_table(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "text"])
        writer.writerows(rows)
    return path


def attributes(item: DemoItem) -> tuple[str, str, str, str]:
    """What a demo item shows, as `measure` names it."""
    return item.background, item.color, item.shape, item.direction or NONE


def measured(frames: np.ndarray) -> tuple[str | None, ...]:
    found = measure(frames)
    return found.background, found.color, found.shape, found.direction


@pytest.fixture(scope="module")
def judged(demo_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Judgement]:
    """The session's demo files (absolute paths) judged against their own captions."""
    table = tmp_path_factory.mktemp("eval") / "own.csv"
    return judge_table(write_table(table, [(str(demo_csv.parent / item.path), item.text) for item in GOOD]))


def test_every_demo_caption_parses_to_what_it_says():
    for seed in range(3):
        for item in plan_demo(40, seed=seed):
            if item.kind != "broken":
                assert parse_caption(item.text) == Caption(
                    item.color, item.shape, item.background, item.direction or None
                )
    said = parse_caption("  An Orange TRIANGLE moves up  on a black background.")
    assert said == Caption("orange", "triangle", "black", "up")
    assert set(FILL) == set(SHAPES)  # a new demo shape needs its fill ratio


@pytest.mark.parametrize(
    "text",
    [
        "a red dog moves left on a blue background",  # not a demo shape
        "a red circle moves left",  # no background
        "a pink circle on a blue background",  # not a palette colour
        "a red circle moves sideways on a blue background",
        "a truncated clip that cannot be decoded",  # demo_data's broken rows
    ],
)
def test_a_foreign_caption_is_an_error_naming_it_and_the_grammar(text: str):
    with pytest.raises(CaptionError) as raised:
        parse_caption(text)
    message = str(raised.value)
    assert message.startswith(f"not a demo caption: {text!r}; expected 'a COLOUR SHAPE [moves DIRECTION]")
    assert all(word in message for word in [*COLORS, *SHAPES, *DIRECTIONS])
    assert isinstance(raised.value, ConfigError)  # a user error: one line from the CLI


def test_the_demo_files_score_100_percent_against_their_own_captions(judged: list[Judgement]):
    assert [judgement.error for judgement in judged] == [None] * len(GOOD)
    assert accuracy(judged) == {
        "background": (len(GOOD), len(GOOD)),
        "color": (len(GOOD), len(GOOD)),
        "shape": (len(GOOD), len(GOOD)),
        "direction": (NUM_VIDEOS, NUM_VIDEOS),  # images' captions say no direction
    }
    assert NUM_VIDEOS == 8 and len(GOOD) == 12


def test_rendered_demo_frames_of_every_colour_judge_right():
    """Without a codec in between: every palette colour, as shape and as background."""
    items = [item for item in plan_demo(30, seed=2) if item.kind != "broken"]  # seed 2 uses every colour both ways
    assert {item.color for item in items} == {item.background for item in items} == set(COLORS)
    for item in items:
        assert measured(np.stack(list(render_frames(item)))) == attributes(item), item


def swap_colours(caption: Caption) -> Caption:
    return dataclasses.replace(caption, color=caption.background, background=caption.color)


def reverse(caption: Caption) -> Caption:
    return dataclasses.replace(caption, direction=caption.direction and OPPOSITE[caption.direction])


def next_shape(caption: Caption) -> Caption:
    return dataclasses.replace(caption, shape=SHAPES[(SHAPES.index(caption.shape) + 1) % len(SHAPES)])


@pytest.mark.parametrize(
    ("wrong", "expected"),
    [
        (swap_colours, {"background": 0, "color": 0, "shape": len(GOOD), "direction": NUM_VIDEOS}),
        (reverse, {"background": len(GOOD), "color": len(GOOD), "shape": len(GOOD), "direction": 0}),
        (next_shape, {"background": len(GOOD), "color": len(GOOD), "shape": 0, "direction": NUM_VIDEOS}),
    ],
)
def test_wrong_captions_score_exactly_what_they_get_wrong(judged: list[Judgement], wrong, expected: dict[str, int]):
    rejudged = [dataclasses.replace(judgement, caption=wrong(judgement.caption)) for judgement in judged]
    totals = {"background": len(GOOD), "color": len(GOOD), "shape": len(GOOD), "direction": NUM_VIDEOS}
    assert accuracy(rejudged) == {name: (expected[name], totals[name]) for name in totals}


def test_time_reversed_clips_move_the_opposite_way(demo_csv: Path):
    for item in GOOD:
        if item.kind == "video":
            frames = read_video(demo_csv.parent / item.path)
            assert measure(frames[::-1]).direction == OPPOSITE[item.direction], item.path


@pytest.mark.parametrize("blur", [0, 1.5])
def test_noisy_blurry_files_still_judge_right(demo_csv: Path, blur: float):
    """Gaussian noise (sigma 20 of 255), then a blur or none, as a half-trained model might draw."""
    rng = np.random.default_rng(0)
    for item in GOOD:
        frames = read_video(demo_csv.parent / item.path)
        noisy = np.clip(frames + rng.normal(0, 20, frames.shape), 0, 255).astype(np.uint8)
        noisy = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(blur))) for f in noisy])
        assert measured(noisy) == attributes(item), (item.path, blur)


def test_a_uniform_grey_video_has_no_shape_and_fails_its_caption():
    found = measure(np.full((8, 64, 96, 3), 128, dtype=np.uint8))
    assert (found.color, found.shape, found.direction, found.motion) == (None, None, NONE, (0.0, 0.0))
    assert found.background == "purple"  # the palette colour nearest to (128, 128, 128)
    caption = parse_caption("a red circle moves left on a blue background")
    assert Judgement("grey.mp4", "", caption, None, found).checks == dict.fromkeys(
        ["background", "color", "shape", "direction"], False
    )


def test_direction_is_the_larger_axis_over_a_threshold():
    assert direction_of(0.01, -0.02) == NONE
    assert direction_of(0.3, -0.1) == "right"
    assert direction_of(-0.1, 0.3) == "down"
    assert direction_of(0.0, -0.06) == "up"


def test_unreadable_rows_are_listed_and_counted_wrong(demo_csv: Path, tmp_path: Path):
    caption = "a red circle moves left on a blue background"
    rows = [(str(demo_csv.parent / name), caption) for name in ("broken_truncated.mp4", "broken_not_a_video.mp4")]
    rows += [("nowhere.mp4", caption), (str(demo_csv.parent / GOOD[0].path), GOOD[0].text)]
    judged = judge_table(write_table(tmp_path / "t.csv", rows))
    assert [judgement.error is not None for judgement in judged] == [True, True, True, False]
    assert judged[2].error == "cannot read: file not found"
    assert accuracy(judged) == {"background": (1, 4), "color": (1, 4), "shape": (1, 4), "direction": (1, 4)}


def test_missing_or_empty_tables_and_foreign_captions_are_user_errors(tmp_path: Path):
    table = tmp_path / "samples.csv"
    with pytest.raises(ConfigError) as raised:
        demo_eval(tmp_path, None, None, as_json=False)
    assert str(raised.value) == (
        f"prompt table not found: {table}; `sora sample` writes it, or name a path,text CSV with --prompts"
    )
    write_table(table, [])
    with pytest.raises(ConfigError) as raised:
        demo_eval(tmp_path, None, None, as_json=False)
    assert str(raised.value) == f"{table}: no rows to judge"
    write_table(table, [("a.mp4", "a red circle moves left on a blue background"), ("b.mp4", "x")])
    with pytest.raises(CaptionError) as raised:
        demo_eval(tmp_path, None, None, as_json=False)
    assert str(raised.value).startswith(f"{table} row 2: not a demo caption: 'x'; expected")


def swap_colours_text(item: DemoItem) -> str:
    return f"a {item.background} {item.shape} moves {item.direction} on a {item.color} background"


def samples_folder(folder: Path, demo_dir: Path, rows: list[tuple[str, str]]) -> Path:
    """A folder as `sora sample` leaves it: mp4s and samples.csv with paths relative to it."""
    folder.mkdir()
    for name, _ in rows:
        if (demo_dir / name).exists():
            shutil.copy(demo_dir / name, folder / name)
    write_table(folder / "samples.csv", rows)
    return folder


def test_the_command_prints_accuracy_wrong_samples_and_writes_the_sheet(demo_csv: Path, tmp_path: Path):
    clips = [item for item in GOOD if item.kind == "video"][:3]
    rows = [(item.path, item.text) for item in clips[:2]]
    rows += [(clips[2].path, swap_colours_text(clips[2])), ("missing.mp4", clips[0].text)]
    folder = samples_folder(tmp_path / "samples", demo_csv.parent, rows)

    result = run_sora("demo-eval", str(folder))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        f"judged 4 samples of {folder / 'samples.csv'} (1 unreadable)",
        "  background colour     2/4     50.0 %",
        "  shape colour          2/4     50.0 %",
        "  shape                 3/4     75.0 %",
        "  direction             3/4     75.0 %",
        "wrong: 2 of 4",
    ]
    assert lines[6].startswith(f"  {clips[2].path}  ") and "background colour" in lines[6]
    assert lines[7] == f"  missing.mp4  {clips[0].text!r}: cannot read: file not found"
    assert lines[8] == f"contact sheet: {folder / 'contact_sheet.png'}"
    with Image.open(folder / "contact_sheet.png") as sheet:
        four_rows = sheet.size

    small = write_table(tmp_path / "two.csv", [(str(folder / path), text) for path, text in rows[:2]])
    result = run_sora("demo-eval", str(folder), "--prompts", str(small), "--sheet", str(tmp_path / "two.png"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["accuracy"]["direction"] == {"correct": 2, "total": 2, "percent": 100.0}
    assert report["rows"][0]["measured"]["direction"] == clips[0].direction
    assert report["rows"][0]["correct"] == {"background": True, "color": True, "shape": True, "direction": True}
    assert report["contact_sheet"] == str(tmp_path / "two.png")
    with Image.open(tmp_path / "two.png") as sheet:
        assert sheet.format == "PNG" and sheet.size[1] < four_rows[1]  # taller with more rows


def test_the_command_refuses_a_missing_folder_in_one_line(tmp_path: Path):
    result = run_sora("demo-eval", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'nowhere'} is not a folder; give the folder `sora sample` wrote (its --save-dir)"
    )
