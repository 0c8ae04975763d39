"""`pipelines/spill.py`: rows set aside on disk come back whole, in key order, a file at a time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.spill import MAX_PARTITIONS, PARTITION_ROWS, Spill, partition_count, partition_of

SCHEMA = pa.schema([("id", pa.string()), ("row", pa.int64())])


def _keys(count: int, seed: int = 0) -> list[str]:
    return [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(count)]


def test_partition_count_is_one_file_per_partition_rows_up_to_the_maximum():
    assert partition_count(0) == partition_count(1) == partition_count(PARTITION_ROWS) == 1
    assert partition_count(PARTITION_ROWS + 1) == 2
    assert partition_count(10**12) == MAX_PARTITIONS


def test_partitions_keep_the_order_of_the_keys():
    keys = pd.Series([*sorted(_keys(2000)), "00000000", "ffffffff"])
    files = partition_of(keys, 7)
    assert files.min() == 0 and files.max() == 6
    order = np.argsort(keys.to_numpy(), kind="stable")
    assert (np.diff(files[order]) >= 0).all()  # files in turn hold keys in turn


@pytest.mark.parametrize("count", [1, 3, 16])
def test_sorted_gives_every_row_once_in_key_order(tmp_path, count):
    keys = _keys(500)
    spill = Spill(tmp_path, "ids", SCHEMA, "id", count)
    for start in range(0, 500, 37):  # added a batch at a time, repeats included
        frame = pd.DataFrame({"id": keys[start : start + 37], "row": range(start, min(start + 37, 500))})
        spill.add(frame)
        spill.add(frame.iloc[:2])
    read = pa.concat_tables(spill.sorted(["id", "row"])).to_pylist()
    assert [(r["id"], r["row"]) for r in read] == sorted(
        [(k, i) for i, k in enumerate(keys)] + [(keys[s + j], s + j) for s in range(0, 500, 37) for j in range(2)]
    )
    assert not list(tmp_path.iterdir())  # each file is deleted once read


def test_a_spill_of_the_same_name_replaces_leftovers(tmp_path):
    Spill(tmp_path, "ids", SCHEMA, "id", 2).add(pd.DataFrame({"id": _keys(10), "row": range(10)}))
    spill = Spill(tmp_path, "ids", SCHEMA, "id", 2)  # a run killed before reading its spill, then again
    spill.add(pd.DataFrame({"id": _keys(3, seed=1), "row": range(3)}))
    assert sorted(pa.concat_tables(spill.sorted(["id"])).column("id").to_pylist()) == sorted(_keys(3, seed=1))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_files_are_read_into_memory_not_mapped(tmp_path):
    """A mapped file's pages stay in the process's resident memory for as long as a table read
    from it lives: read through a mapping, planning a 10M-row table peaked at 8 GB, not 0.7."""
    spill = Spill(tmp_path, "ids", SCHEMA, "id", 1)
    spill.add(pd.DataFrame({"id": _keys(1000), "row": range(1000)}))
    table = spill.read(0)
    assert table.num_rows == 1000
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path) not in maps, "a spill file is still mapped into the process"
