"""Rows too many to hold, set aside on local disk and read back in key order.

`sora preprocess` needs a few whole-table steps (which rows repeat an earlier one, the shard
plan: per bucket, rows in id order) on tables larger than the driver's memory. Its keys are
hex digests, so their leading digits spread rows evenly: rows go to one of `count` files by
those digits, and reading the files in order, each sorted on its own, reads every row in key
order while holding one file at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

PARTITION_ROWS = 131_072  # rows a file is sized for
MAX_PARTITIONS = 256  # files open for writing at once


def partition_count(rows: int) -> int:
    """Files for `rows` rows: one for a table that fits in memory anyway."""
    return min(MAX_PARTITIONS, max(1, -(-rows // PARTITION_ROWS)))


def partition_of(keys: pd.Series, count: int) -> np.ndarray:
    """Which file each hex key goes to: its first 8 digits scaled to `count` (order-preserving)."""
    leading = np.array([int(key[:8], 16) for key in keys], dtype=np.uint64)
    return ((leading * np.uint64(count)) >> np.uint64(32)).astype(np.int64)


@contextlib.contextmanager
def open_stream(path: Path) -> Iterator[ipc.RecordBatchStreamReader]:
    """An Arrow IPC stream file read batch by batch into memory freed after use, its file closed
    on leaving (`ipc.open_stream` given a path maps the file, and every page read stays in the
    process's resident memory while the reader lives; the file stays open until it is freed)."""
    with pa.OSFile(str(path)) as file:
        yield ipc.open_stream(file)


@contextlib.contextmanager
def new_stream(path: Path, schema: pa.Schema) -> Iterator[ipc.RecordBatchStreamWriter]:
    """An Arrow IPC stream file to write, finished and closed on leaving."""
    with pa.OSFile(str(path), "wb") as file, ipc.new_stream(file, schema) as writer:
        yield writer


class Spill:
    """Rows of `schema` keyed by the hex digest in column `key`, in `count` files under `folder`."""

    def __init__(self, folder: Path, name: str, schema: pa.Schema, key: str, count: int,
                 where: Callable[[pd.DataFrame], np.ndarray] | None = None) -> None:  # fmt: skip
        """`where`: which file each row of a frame goes to, if not by the leading digits of `key`."""
        self.files = [folder / f"{name}-{index:03d}.arrow" for index in range(count)]
        self.schema, self.key, self.count, self.rows = schema, key, count, 0
        self.where = where or (lambda frame: partition_of(frame[key], count))
        self._writers: dict[int, tuple[pa.NativeFile, ipc.RecordBatchStreamWriter]] = {}
        for file in self.files:  # a spill of the same name before, left unread
            file.unlink(missing_ok=True)

    def add(self, frame: pd.DataFrame) -> None:
        if not len(frame):
            return
        which = self.where(frame)
        table = pa.Table.from_pandas(frame[self.schema.names], schema=self.schema, preserve_index=False)
        for index in np.unique(which):
            if index not in self._writers:
                file = pa.OSFile(str(self.files[index]), "wb")
                self._writers[index] = (file, ipc.new_stream(file, self.schema))
            self._writers[index][1].write_table(table.filter(pa.array(which == index)))
        self.rows += len(frame)

    def sorted(self, by: list[str]) -> Iterator[pa.Table]:
        """Every row, a file at a time, in the order of `by` (which starts with the key); each
        file is deleted once read."""
        for index in range(self.count):
            table = self.read(index)
            if table is not None:
                yield table.sort_by([(column, "ascending") for column in by])

    def read(self, index: int) -> pa.Table | None:
        """The rows of file `index` as they were added (None: no row went there); the file is deleted."""
        self.close()
        if not self.files[index].exists():
            return None
        with open_stream(self.files[index]) as reader:
            table = reader.read_all()
        self.files[index].unlink()
        return table

    def close(self) -> None:
        for file, writer in self._writers.values():
            writer.close()
            file.close()
        self._writers.clear()
