"""Input tables larger than memory: `sora bucket-report` streams a table a batch of rows at a
time (in its own process, or through Ray Data tasks), and the report is the one of the whole
table read at once, bad cells, probed rows and drop examples included."""

from __future__ import annotations

import pandas as pd
import pytest

import pipelines.bucket_report as bucket_report
from bucketing.report import report_to_dict
from pipelines.bucket_report import report_from_table, tally_rows
from pipelines.config import ConfigError, load_config
from pipelines.dataset import iter_table, read_table
from tests.conftest import ROOT
from tests.test_bad_cells import ROWS


@pytest.fixture(scope="module")
def config():
    return load_config(ROOT / "configs/debug/train.py", "train")


@pytest.fixture
def mixed_table(tmp_path, demo_csv) -> pd.DataFrame:
    """The demo's files (probed: no metadata), rows with metadata, and every bad cell."""
    demo = pd.read_csv(demo_csv)
    demo["path"] = [str(demo_csv.parent / path) for path in demo["path"]]
    sized = pd.DataFrame(
        {
            "path": [f"clip_{i}.mp4" for i in range(40)],  # need not exist: the sizes are given
            "text": [f"clip {i}" for i in range(40)],
            "num_frames": [1 if i % 4 == 0 else 20 + 7 * i for i in range(40)],
            "height": [144 + 12 * (i % 9) for i in range(40)],
            "width": [256 if i % 3 else 144 for i in range(40)],
            "fps": 24.0,
        }
    )
    return pd.concat([sized.iloc[:20], demo, pd.DataFrame(ROWS), sized.iloc[20:]], ignore_index=True)


def whole_report(table_path, config) -> dict:
    """The table read at once and bucketed in one go: what streaming must reproduce."""
    return report_to_dict(tally_rows(read_table(table_path), table_path.absolute(), config).report())


def test_a_streamed_report_is_the_report_of_the_whole_table(tmp_path, mixed_table, config, monkeypatch):
    table_path = tmp_path / "mixed.parquet"
    mixed_table.to_parquet(table_path)
    seen = []

    def spy(frame, *args):
        seen.append(len(frame))
        return tally_rows(frame, *args)

    monkeypatch.setattr(bucket_report, "tally_rows", spy)
    streamed = report_to_dict(report_from_table(table_path, config, progress=False, on_ray=False, batch_rows=7))
    assert max(seen) <= 7 and sum(seen) == len(mixed_table)  # never more than a batch at a time
    assert streamed == whole_report(table_path, config)
    assert streamed["rows_in"] == len(mixed_table) and streamed["kept"] > 20
    reasons = {drop["reason"] for drop in streamed["drops"]}
    assert {"empty path", "empty caption", "could not be probed: file not found"} <= reasons


def test_ray_data_tasks_give_the_same_report(tmp_path, mixed_table, config, monkeypatch):
    import ray
    from ray.data import DataContext

    monkeypatch.setattr("pipelines.dataset.CSV_BLOCK_BYTES", 256)  # many read blocks, so order matters
    table_path = tmp_path / "mixed.csv"
    mixed_table.to_csv(table_path, index=False)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text(table_path.read_text() + "late.mp4,a row with,one cell,too many,1,2,3,4\n")
    context = DataContext.get_current()
    before = context.execution_options.preserve_order
    try:
        on_ray = report_to_dict(report_from_table(table_path, config, progress=False, on_ray=True, batch_rows=5))
        with pytest.raises(ConfigError, match=f"cannot read {ragged}: .*Expected 6 columns, got 8"):
            report_from_table(ragged, config, progress=False, on_ray=True)  # found by a task, far into the file
        assert context.execution_options.preserve_order == before  # Ray Data's settings are left as they were
    finally:
        ray.shutdown()
    assert on_ray == whole_report(table_path, config)
    assert on_ray == report_to_dict(report_from_table(table_path, config, progress=False, on_ray=False))


def test_csv_cells_that_once_stopped_a_read(tmp_path, config, monkeypatch):
    """Bytes that are not UTF-8 reject their row; a quoted newline stays in its caption; junk in a
    metadata cell makes the row be probed; a column we do not use is never parsed, however its
    values change type after the first block the reader sees."""
    monkeypatch.setattr("pipelines.dataset.CSV_BLOCK_BYTES", 64)  # many blocks in a small file
    lines = [b"path,text,num_frames,height,width,score"]
    lines += [b"a%d.mp4,clip %d,40,144,256,%d" % (i, i, i) for i in range(20)]
    lines += [
        b"bad.mp4,caf\xe9 au lait,40,144,256,1",
        b'nl.mp4,"two\nlines",40,144,256,high',
        b"junk.mp4,x,abc,144,256,?",
    ]
    table_path = tmp_path / "quirks.csv"
    table_path.write_bytes(b"\n".join(lines) + b"\n")
    table = read_table(table_path)
    assert len(table) == 23 and table["text"].iat[21] == "two\nlines" and "score" not in table.columns
    report = report_to_dict(report_from_table(table_path, config, progress=False, on_ray=False, batch_rows=4))
    drops = {drop["reason"]: drop["examples"] for drop in report["drops"]}
    assert drops["undecodable text (not UTF-8)"] == ["bad.mp4"]
    assert drops["could not be probed: file not found"] == ["junk.mp4"]
    assert report["rows_in"] == 23 and report["kept"] == 21


@pytest.mark.parametrize("on_ray", [False, True])
def test_a_damaged_table_is_named_before_any_work(tmp_path, mixed_table, config, on_ray):
    table_path = tmp_path / "mixed.parquet"
    mixed_table.to_parquet(table_path)
    table_path.write_bytes(table_path.read_bytes()[:-100])  # the footer cut off
    with pytest.raises(ConfigError, match=f"cannot read {table_path}"):
        report_from_table(table_path, config, progress=False, on_ray=on_ray)  # before Ray starts
    with pytest.raises(ConfigError, match="input table not found"):
        report_from_table(tmp_path / "gone.csv", config, progress=False, on_ray=on_ray)


def test_a_table_without_rows_reads_as_no_rows(tmp_path):
    table_path = tmp_path / "empty.csv"
    table_path.write_text("path,text,num_frames\n")
    assert sum(len(frame) for frame in iter_table(table_path)) == 0
    assert read_table(table_path).columns.tolist() == ["path", "text", "num_frames"] and read_table(table_path).empty


def test_the_reader_reads_what_pandas_reads(tmp_path, mixed_table):
    """Against pandas' reading of the same files (what `read_table` was before it streamed): the
    same paths, captions and metadata, however the CSV is dressed (a BOM, a blank first line,
    gzip) or the Parquet typed."""
    from pipelines.dataset import read_metadata

    plain = tmp_path / "plain.csv"
    mixed_table.to_csv(plain, index=False)
    dressed = tmp_path / "dressed.csv"
    dressed.write_bytes(b"\xef\xbb\xbf\n" + plain.read_bytes())
    zipped = tmp_path / "zipped.csv.gz"
    mixed_table.to_csv(zipped, index=False)
    parquet = tmp_path / "typed.parquet"
    mixed_table.astype({"path": "category"}).to_parquet(parquet)
    expected = pd.read_csv(plain, dtype={"path": str, "text": str}, keep_default_na=False)
    for table_path in (plain, dressed, zipped, parquet):
        table = read_table(table_path)
        assert table["path"].tolist() == expected["path"].tolist(), table_path
        assert table["text"].tolist() == expected["text"].tolist(), table_path
        ours, theirs = read_metadata(table)[0], read_metadata(expected)[0]
        pd.testing.assert_frame_equal(ours, theirs, check_dtype=False)
