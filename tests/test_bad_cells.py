"""Bad cells and bad literals: a table's nulls, non-finite, absurd or negative metadata, frames too
large to decode, and config values too large to compute never crash a command; they are named."""

from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.config_file import read_config_file
from pipelines.dataset import read_metadata, read_table
from tests.conftest import ROOT, run_sora

ROWS = [
    {"path": "a.mp4", "text": "fine", "num_frames": 30, "height": 240, "width": 426, "fps": 24},
    {"path": None, "text": "no path", "num_frames": 30, "height": 240, "width": 426, "fps": 24},
    {"path": "c.mp4", "text": None, "num_frames": 30, "height": 240, "width": 426, "fps": 24},
    {"path": "d.mp4", "text": "huge count", "num_frames": 1e30, "height": 240, "width": 426, "fps": -5},
    {"path": "e.mp4", "text": "infinite", "num_frames": float("inf"), "height": 240, "width": 426, "fps": float("nan")},
    {"path": "f.mp4", "text": "no metadata", "num_frames": None, "height": None, "width": None, "fps": None},
    {"path": "g.mp4", "text": "negative", "num_frames": -8, "height": 0, "width": 426, "fps": 0},
    {"path": "h.mp4", "text": "8000 squared", "num_frames": 9, "height": 8000, "width": 8000, "fps": 24},
]


@pytest.fixture
def bad_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    return path


def test_null_paths_and_captions_read_as_empty_text(bad_parquet):
    table = read_table(bad_parquet)
    assert table["path"].tolist()[:3] == ["a.mp4", "", "c.mp4"] and table["text"].tolist()[2] == ""


def test_unusable_metadata_is_missing_so_the_row_is_probed(bad_parquet):
    metadata, has_size = read_metadata(read_table(bad_parquet))
    assert has_size.tolist() == [True, True, True, False, False, False, False, True]
    assert metadata["fps"].tolist()[:3] == [24.0, 24.0, 24.0]
    assert all(np.isnan(value) for value in metadata["fps"].tolist()[3:7])  # -5, nan, None, 0: not a rate


def test_bucket_report_names_every_bad_row_and_reports_the_rest(bad_parquet):
    result = run_sora("bucket-report", str(bad_parquet), "--config", str(ROOT / "configs/demo/train.py"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "rows in: 8   kept: 1   dropped: 7" in out
    for reason in ("empty path", "empty caption", "could not be probed: file not found",
                   "too large: over 33177600 pixels per frame"):  # fmt: skip
        assert reason in out, out


def test_preprocess_rejects_bad_rows_by_name_and_keeps_the_good_one(bad_parquet, tmp_path, debug_models):
    """The table's sizes are trusted where usable, so the 8000x8000 row is refused unread."""
    from pipelines.demo_data import write_demo_data
    from tests.conftest import write_config

    csv = write_demo_data(tmp_path / "data", num=1, seed=3, progress=False)
    good = pd.read_csv(csv).iloc[0]
    table = pd.DataFrame(ROWS)
    table.loc[0, ["path", "text"]] = [str(tmp_path / "data" / good["path"]), good["text"]]
    table.loc[0, ["num_frames", "height", "width", "fps"]] = [None, None, None, None]  # probed
    table.to_parquet(bad_parquet)
    config = write_config(tmp_path, debug_models)
    result = run_sora("preprocess", str(bad_parquet), "--config", str(config), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "kept: 1" in result.stdout, result.stdout
    from pipelines.cache import Cache

    rejects = Cache(tmp_path / "cache").rejects().to_pandas()
    reasons = dict(zip(rejects["row"], rejects["reason"], strict=True))
    assert reasons[1] == "empty path" and reasons[2] == "empty caption" and reasons[7] == "too large"
    assert "8000x8000 = 64000000 pixels per frame" in rejects.set_index("row").loc[7, "detail"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs = 9**9**9\n", "`9 ** 9 ** 9` is too large for a config value: about"),
        ("lr = 10**2000\n", "`10 ** 2000` is too large for a config value: about 6.64e+03 bits"),
        ("prompt = [1] * 10**10\n", "`[1] * 10 ** 10` is too large for a config value: 10000000000 items"),
        ("prompt = 'ab' * 10**9\n", "2000000000 items; the limit is 1000000"),
        ("x = 2**4000\nepochs = x * x\n", "`x * x` is too large for a config value: about 8002 bits"),
    ],
    ids=["tower", "power", "list", "string", "product"],
)
def test_oversized_literals_are_refused_at_once_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "big.py"
    path.write_text("seed = 1\n" + text)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        read_config_file(path)
    assert time.monotonic() - start < 1.0
    line = 3 if text.count("\n") == 2 else 2
    assert str(caught.value).startswith(f"{path}:{line}: ")


def test_config_values_of_reasonable_size_still_work(tmp_path):
    path = tmp_path / "ok.py"
    path.write_text("num_frames = 2**4\nimage_size = (144, 256)\nprompt = ['a'] * 3\nlr = 2e-5 * 4\n")
    values = read_config_file(path)
    assert values["num_frames"] == 16 and values["prompt"] == ["a", "a", "a"]
    assert load_config(ROOT / "configs/demo/train.py", "train").preprocess.max_pixels_per_frame == 7680 * 4320
