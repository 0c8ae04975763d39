"""Buckets: tables, bucket_config checks, the seed's walkthrough, and properties (pure Python + numpy)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketing.aspect import BUDGETS, RESOLUTIONS, VIDEO_RATIOS, closest_aspect, closest_aspect_index
from bucketing.assign import Bucket, Drop, assign_bucket, assign_buckets, keep_draw, sample_key, sample_keys
from bucketing.config import BucketConfigError, fixed_bucket_config, parse_bucket_config
from bucketing.report import build_report
from pipelines.config import read_config_file

# The seed documents' opening example, as shipped in configs/ (one copy of the table).
SEED_MIXED = read_config_file(Path(__file__).resolve().parent.parent / "configs/opensora-v1-1/train/mixed.py")[
    "bucket_config"
]
SEED_WALKTHROUGH = {"480p": {16: (1.0, 8)}, "720p": {16: (0.5, 4)}, "1080p": {16: (0.2, 2)}, "4k": {16: (0.1, 1)}}


def assign_many(config: dict, frames: int, height: int, width: int, count: int = 20000, frame_interval: int = 1):
    buckets = parse_bucket_config(config, frame_interval)
    keys = sample_keys(f"sample-{i}" for i in range(count))
    n = len(keys)
    return assign_buckets(buckets, np.full(n, frames), np.full(n, height), np.full(n, width), keys, seed=42)


def shares(assignments) -> dict[str, float]:
    names = [entry.resolution.name for entry in assignments.config.resolutions]
    found: dict[str, float] = {}
    for index in assignments.resolution:
        name = names[index] if index >= 0 else "dropped"
        found[name] = found.get(name, 0) + 1 / len(assignments)
    return found


# --------------------------------------------------------------------------- tables


def test_every_resolution_has_its_budget_and_table():
    assert list(RESOLUTIONS) == list(BUDGETS)
    for name, resolution in RESOLUTIONS.items():
        expected_keys = 40 if name in ("256", "512", "1024") else 17
        assert len(resolution.table) == expected_keys, name
        for height, width in resolution.table.values():
            assert height % 16 == 0 and width % 16 == 0


def test_video_tables_are_closest_multiples_of_16_to_opensora_sizes():
    assert list(RESOLUTIONS["240p"].table) == [f"{ratio:.2f}" for ratio in VIDEO_RATIOS]
    assert list(RESOLUTIONS["240p"].table)[:3] == ["0.38", "0.43", "0.48"]
    for name in ("144p", "240p", "360p", "480p", "720p", "1080p", "4k"):
        budget = BUDGETS[name]
        for ratio, (height, width) in zip(VIDEO_RATIOS, RESOLUTIONS[name].table.values(), strict=True):
            exact_h = math.sqrt(budget * ratio)
            assert abs(height - exact_h) <= 8 and abs(width - exact_h / ratio) <= 8
    assert RESOLUTIONS["720p"].table["0.56"] == (720, 1280)
    assert RESOLUTIONS["1080p"].table["0.56"] == (1088, 1920)  # 1080 is not a multiple of 16


def test_pixart_tables_scale_the_1024_table():
    assert RESOLUTIONS["1024"].table["1.0"] == (1024, 1024)
    assert RESOLUTIONS["1024"].table["0.25"] == (512, 2048)
    assert RESOLUTIONS["512"].table["0.25"] == (256, 1024)
    assert RESOLUTIONS["256"].table["4.0"] == (512, 128)
    assert list(RESOLUTIONS["256"].table) == list(RESOLUTIONS["1024"].table)


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_closest_aspect_is_the_nearest_key(height: int, width: int):
    table = RESOLUTIONS["240p"].table
    key = closest_aspect(height, width, table)
    assert all(abs(float(key) - height / width) <= abs(float(other) - height / width) for other in table)
    vector = closest_aspect_index(np.array([height]), np.array([width]), list(table))
    assert list(table)[vector[0]] == key


# --------------------------------------------------------------------------- bucket_config checks


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"260p": {16: (1.0, 2)}}, r"unknown resolution '260p'; valid names: 144p, 256, 240p"),
        ({"240p": {16: (-0.1, 2)}}, r"bucket_config\['240p'\]\[16\]: keep_prob must be a number >= 0 \(1 or more"),
        ({"240p": {16: ("1", 2)}}, r"keep_prob must be a number >= 0"),
        ({"240p": {16: (1.0, (4, 2))}}, r"\[16\]: batch-size search range \(4, 2\) has min 4 > max 2"),
        ({"240p": {16: (1.0, (2, 4, 1, 1))}}, r"search range is \(max,\), \(min, max\) or \(min, max, step\)"),
        ({"240p": {16: (1.0, (0, 4))}}, r"of positive integers, got \(0, 4\)"),
        ({"240p": {0: (1.0, 2)}}, r"bucket_config\['240p'\]\[0\]: num_frames must be a positive integer"),
        ({"240p": {16: (1.0, 0)}}, r"batch_size must be a positive integer or None, got 0"),
        ({"240p": {16: (0.5, None)}}, r"batch_size is None but keep_prob is 0.5; use \(0.0, None\)"),
        ({"240p": {16: 1.0}}, r"expected \(keep_prob, batch_size\)"),
        ({"240p": {}}, r"bucket_config\['240p'\]: expected a non-empty dict"),
        ({}, r"bucket_config must be a non-empty dict"),
    ],
)
def test_bad_bucket_config_names_the_entry(config: dict, pattern: str):
    with pytest.raises(BucketConfigError, match=pattern):
        parse_bucket_config(config)


def test_resolutions_are_tried_largest_first():
    parsed = parse_bucket_config(SEED_MIXED)
    assert [entry.resolution.name for entry in parsed] == ["1080p", "1024", "720p", "480p", "512", "240p", "256"]
    assert [bucket.num_frames for bucket in parsed.resolutions[-2].frames] == [128, 64, 32, 16]


# --------------------------------------------------------------------------- the seed's walkthrough


def test_2k_video_falls_through_1080p_720p_480p_with_the_stated_probabilities():
    """A 2K video, more than 16 frames: 1080p with 20%, else 720p with 50%, else 480p."""
    result = shares(assign_many(SEED_WALKTHROUGH, frames=40, height=1440, width=2560))
    assert "4k" not in result  # 2K is below 0.8 x the 4K budget
    assert result["1080p"] == pytest.approx(0.2, abs=0.015)
    assert result["720p"] == pytest.approx(0.8 * 0.5, abs=0.015)
    assert result["480p"] == pytest.approx(0.8 * 0.5, abs=0.015)
    assert "dropped" not in result


def test_excluded_480p_long_videos_go_to_240p():
    """(0.0, None) at 480p T=32 forces 480p videos with more than 32 frames into 240p."""
    config = {
        "240p": {16: (1.0, 16), 32: (1.0, 8), 64: (1.0, 4), 128: (1.0, 2)},
        "480p": {16: (1.0, 4), 32: (0.0, None)},
        "720p": {16: (0.5, 2)},
    }
    long = assign_many(config, frames=40, height=480, width=854, count=500)
    assert {long.bucket(i).resolution for i in range(len(long))} == {"240p"}
    assert {long.bucket(i).num_frames for i in range(len(long))} == {32}
    short = assign_many(config, frames=20, height=480, width=854, count=500)
    assert {(short.bucket(i).resolution, short.bucket(i).num_frames) for i in range(len(short))} == {("480p", 16)}


def test_without_the_exclusion_480p_videos_all_go_to_480p_16():
    config = {"240p": {16: (1.0, 16), 32: (1.0, 8)}, "480p": {16: (1.0, 4)}, "720p": {16: (0.5, 2)}}
    result = assign_many(config, frames=100, height=480, width=854, count=300)
    assert {(result.bucket(i).resolution, result.bucket(i).num_frames) for i in range(300)} == {("480p", 16)}


def test_image_only_config_keeps_images_and_drops_videos():
    config = {"256": {1: (1.0, 256)}, "512": {1: (1.0, 80)}, "480p": {1: (1.0, 52)}, "1024": {1: (1.0, 20)}}
    image = assign_bucket(parse_bucket_config(config), 1, 1080, 1920, sample_key("img"), 0)
    assert isinstance(image, Bucket) and (image.resolution, image.num_frames) == ("1024", 1)
    assert image.batch_size == 20
    video = assign_bucket(parse_bucket_config(config), 64, 1080, 1920, sample_key("vid"), 0)
    assert video is Drop.TOO_SHORT


def test_video_only_config_drops_images():
    config = {"240p": {16: (1.0, 16), 32: (1.0, 8)}, "480p": {16: (1.0, 4)}}
    assert assign_bucket(parse_bucket_config(config), 1, 480, 854, sample_key("img"), 0) is Drop.NO_IMAGE_BUCKET


def test_keep_prob_scales_image_buckets():
    result = shares(assign_many({"256": {1: (1.0, 256)}, "1080p": {1: (0.2, 8)}}, frames=1, height=1080, width=1920))
    assert result["1080p"] == pytest.approx(0.2, abs=0.015)
    assert result["256"] == pytest.approx(0.8, abs=0.015)


def test_drop_reasons():
    config = parse_bucket_config({"240p": {16: (0.0, None)}, "480p": {16: (0.5, 4)}})
    assert assign_bucket(config, 40, 100, 100, 1, 0) is Drop.TOO_SMALL
    assert assign_bucket(config, 10, 240, 426, 1, 0) is Drop.TOO_SHORT
    assert assign_bucket(config, 40, 240, 426, 1, 0) is Drop.EXCLUDED
    assert assign_bucket(config, 0, 240, 426, 1, 0) is Drop.INVALID
    dropped = assign_many({"480p": {16: (0.5, 4)}}, frames=40, height=480, width=854, count=2000)
    assert set(dropped.reason[dropped.resolution < 0].tolist()) == {Drop.NOT_KEPT}


def test_fixed_size_config_is_one_bucket():
    config = fixed_bucket_config((256, 256), 16, 8, frame_interval=3)
    small = assign_bucket(config, 49, 90, 160, 1, 0)  # any size is resized and cropped
    assert small == Bucket("256x256", 16, "1.00", 256, 256, 8)
    assert assign_bucket(config, 48, 720, 1280, 1, 0) is Drop.TOO_SHORT  # needs > 16 x 3 frames
    assert assign_bucket(config, 1, 720, 1280, 1, 0) is Drop.NO_IMAGE_BUCKET


# --------------------------------------------------------------------------- properties

# Frame counts around T x frame_interval boundaries, sizes around the 0.8 x budget thresholds.
_EDGE_FRAMES = sorted({t * k + d for t in (1, 8, 16, 32, 64, 96, 128) for k in (1, 2, 3, 4) for d in (-1, 0, 1)})
frame_counts = st.one_of(st.integers(0, 300), st.sampled_from(_EDGE_FRAMES))
metadata = st.tuples(frame_counts, st.integers(0, 2500), st.integers(0, 4000), st.integers(0, 2**64 - 1))
CONFIGS = [SEED_MIXED, SEED_WALKTHROUGH, {"144p": {1: (0.5, 4), 8: (0.7, 2), 16: (1.0, 2)}, "240p": {8: (0.3, 2)}}]


def reference_assign(config, frames, height, width, key, seed):
    """Open-Sora's per-sample loop, written plainly, with our deterministic draw."""
    if frames < 1 or height < 1 or width < 1:
        return None
    for entry in config:
        if height * width < entry.resolution.min_pixels:
            continue
        by_t = {bucket.num_frames: bucket for bucket in entry.frames}
        if frames == 1:
            if 1 not in by_t:
                continue
            chosen = by_t[1]
        else:
            chosen = next(
                (b for b in entry.frames if b.num_frames != 1 and frames > b.num_frames * config.frame_interval), None
            )
            if chosen is None:
                continue
        draw = keep_draw(seed, np.array([key], np.uint64), entry.resolution.name, chosen.num_frames)[0]
        if chosen.keep_prob >= 1 or draw < chosen.keep_prob:
            return entry.resolution.name, chosen.num_frames
    return None


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(range(len(CONFIGS))),
    st.lists(metadata, min_size=1, max_size=60),
    st.integers(0, 2**31),
    st.integers(1, 4),
)
def test_vectorised_assignment_equals_the_per_sample_rules(config_index, rows, seed, frame_interval):
    config = parse_bucket_config(CONFIGS[config_index], frame_interval)
    frames, heights, widths, keys = (
        np.array(column, dtype=np.uint64 if i == 3 else np.int64) for i, column in enumerate(zip(*rows, strict=True))
    )
    result = assign_buckets(config, frames, heights, widths, keys, seed)
    for i, (f, h, w, k) in enumerate(rows):
        expected = reference_assign(config, f, h, w, k, seed)
        got = result.bucket(i)
        if expected is None:
            assert isinstance(got, Drop) and got is not Drop.KEPT
        else:
            assert isinstance(got, Bucket) and (got.resolution, got.num_frames) == expected
            # Every kept sample fits its bucket: enough pixels, enough frames, the nearest aspect.
            resolution = RESOLUTIONS[got.resolution]
            assert h * w >= resolution.min_pixels
            assert f == 1 if got.num_frames == 1 else f > got.num_frames * frame_interval
            assert got.aspect == closest_aspect(h, w, resolution.table)
            assert (got.height, got.width) == resolution.table[got.aspect]


@settings(max_examples=30, deadline=None)
@given(st.lists(metadata, min_size=1, max_size=40), st.integers(0, 2**31))
def test_assignment_is_deterministic_and_order_free(rows, seed):
    config = parse_bucket_config(SEED_MIXED, 2)
    columns = [np.array(c, dtype=np.uint64 if i == 3 else np.int64) for i, c in enumerate(zip(*rows, strict=True))]
    first = assign_buckets(config, *columns, seed)
    order = np.arange(len(rows))[::-1]
    reversed_ = assign_buckets(config, *(c[order] for c in columns), seed)
    for i in range(len(rows)):
        assert first.bucket(i) == reversed_.bucket(order.tolist().index(i))
        single = assign_bucket(config, *(int(c[i]) for c in columns), seed)
        assert single == first.bucket(i)


def test_draw_depends_on_seed_key_resolution_and_frames_only():
    keys = np.arange(1000, dtype=np.uint64)
    base = keep_draw(1, keys, "240p", 16)
    assert np.array_equal(base, keep_draw(1, keys.copy(), "240p", 16))
    for other in (keep_draw(2, keys, "240p", 16), keep_draw(1, keys, "480p", 16), keep_draw(1, keys, "240p", 32)):
        assert not np.array_equal(base, other)
    assert base.min() >= 0.0 and base.max() < 1.0
    assert abs(base.mean() - 0.5) < 0.05
    # The key is blake2b of the id: the same in every process, unlike Python's salted hash().
    assert sample_key("clip.mp4") == int.from_bytes(hashlib.blake2b(b"clip.mp4", digest_size=8).digest(), "little")


def test_search_ranges_and_keep_prob_over_one_in_assignment_and_report():
    """keep_prob >= 1 keeps every sample (Open-Sora draws `rng.random() < keep_prob`); a batch-size search
    range has no batches to count yet and the report says training needs an integer."""
    from bucketing.report import format_report, report_to_dict

    config = parse_bucket_config({"240p": {16: (20, (2, 8)), 1: (1.5, 4)}})
    frames = np.array([20] * 6 + [1] * 5)
    heights, widths = np.full(11, 240), np.full(11, 426)
    names = [f"row{i}" for i in range(11)]
    report = build_report(assign_buckets(config, frames, heights, widths, sample_keys(names), 0), names)
    assert report.kept == 11
    searched = next(r for r in report.buckets if r.bucket.num_frames == 16)
    assert (searched.samples, searched.full_batches, searched.leftover) == (6, None, None)
    assert str(searched.bucket.batch_search) == "[2,8)"  # Open-Sora's max is excluded
    line = next(line for line in format_report(report).splitlines() if line.startswith("240p-16f"))
    assert line.split()[3:6] == ["[2,8)", "-", "-"]
    assert any("search range" in warning and "240p-16f" in warning for warning in report.warnings)
    as_dict = next(b for b in report_to_dict(report)["buckets"] if b["num_frames"] == 16)
    assert as_dict["batch_search"] == {"low": 2, "high": 8, "step": 2} and as_dict["batch_size"] is None


def test_report_accounts_for_every_row():
    config = parse_bucket_config({"240p": {16: (1.0, 4)}, "480p": {16: (0.5, 2), 32: (0.0, None)}})
    frames = np.array([40, 40, 40, 10, 1, 20, 20, 20, 20, 20])
    heights = np.array([480, 480, 480, 480, 480, 240, 240, 240, 240, 240])
    widths = np.array([854, 854, 854, 854, 854, 426, 426, 426, 426, 426])
    names = [f"row{i}" for i in range(10)]
    assignments = assign_buckets(config, frames, heights, widths, sample_keys(names), 0)
    report = build_report(assignments, names, rejected={"could not be probed: file not found": ["gone.mp4"]})
    assert report.rows_in == 11
    assert report.kept + sum(drop.count for drop in report.drops) == report.rows_in
    row = next(r for r in report.buckets if r.bucket.resolution == "240p" and r.bucket.num_frames == 16)
    assert row.full_batches == row.samples // 4 and row.leftover == row.samples % 4
    assert sum(r.compute_share for r in report.buckets) == pytest.approx(1.0)
    assert any("gone.mp4" in drop.examples for drop in report.drops)
