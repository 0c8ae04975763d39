"""The input table (CSV or Parquet of path,text[,metadata]) and sample ids.

One reader for every command: `iter_table` streams the table in batches of rows (pyarrow's
CSV and Parquet readers), `table_source` gives the same read to Ray Data, and
`normalise` turns a batch into the one representation every stage works on, so a table
read whole on the driver and a table streamed through a cluster are read alike.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.config import ConfigError

# A row whose file has one of these extensions is an image (Open-Sora tells images from videos the same way).
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}

REQUIRED_COLUMNS = ("path", "text")
SAMPLES_TABLE = "samples.csv"  # what `sora sample` writes beside its videos, in this table format
# Open-Sora's data tools write these; when present they spare probing the files.
SIZE_COLUMNS = ("num_frames", "height", "width")  # what bucketing needs of a row
METADATA_COLUMNS = (*SIZE_COLUMNS, "fps")
BATCH_ROWS = 65_536  # rows a batch of `iter_table` holds (a few MB)
# Bytes of CSV text the reader parses at a time: as fast as larger blocks here, and with larger
# ones (8 MB) the reader's memory grew with the rows read (~30 MB per million).
CSV_BLOCK_BYTES = 1 << 20
IN_PROCESS_BYTES = 256 << 20  # a table up to this size is streamed in the command; larger ones through Ray Data


def is_parquet(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".parquet"


def table_columns(path: str | Path) -> list[str]:
    """The table's columns, from its header or schema only; the table must have path and text.

    Only the columns the project uses are read after this: path, text and the metadata
    columns present. Other columns (a data tool's scores, say) are never parsed, so a junk
    value there cannot stop a read."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"input table not found: {path}")
    try:
        if is_parquet(path):
            names = pq.read_schema(path).names
        else:  # pyarrow's own reading of the header: a BOM, blank lines, .csv.gz and the like as the rows are read
            options = csv_options([])
            reader = pacsv.open_csv(path, read_options=options["read_options"], parse_options=options["parse_options"])
            names = reader.schema.names
    except Exception as error:  # pyarrow raises many types for a malformed file
        raise ConfigError(f"cannot read {path}: {error}") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in names]
    if missing:
        raise ConfigError(
            f"{path}: missing required column {', '.join(repr(c) for c in missing)} "
            f"(found: {', '.join(map(str, names))})"
        )
    return [column for column in (*REQUIRED_COLUMNS, *METADATA_COLUMNS) if column in names]


def csv_options(columns: list[str]) -> dict:
    """pyarrow's CSV options for the columns we read: every cell as bytes (decoded by
    `normalise`, so bytes that are not UTF-8 reject their row, not the file, and a junk number
    makes its cell missing instead of failing the read); quoted newlines are allowed in captions;
    an empty cell is "" (rejected as empty), never null."""
    return {
        "read_options": pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
        "parse_options": pacsv.ParseOptions(newlines_in_values=True),
        "convert_options": pacsv.ConvertOptions(
            include_columns=columns, column_types=dict.fromkeys(columns, pa.binary()), strings_can_be_null=False
        ),
    }


def iter_table(path: str | Path, batch_rows: int = BATCH_ROWS) -> Iterator[pd.DataFrame]:
    """The table's rows in order, a normalised batch at a time (memory: one batch, not the table)."""
    path = Path(path)
    columns = table_columns(path)
    try:
        if is_parquet(path):
            batches = _parquet_batches(path, columns, batch_rows)
        else:
            batches = pacsv.open_csv(path, **csv_options(columns))
        for batch in batches:
            for start in range(0, batch.num_rows, batch_rows):
                yield normalise(pa.Table.from_batches([batch.slice(start, batch_rows)]))
    except (pa.ArrowException, OSError, ValueError) as error:  # a malformed file, a truncated footer
        raise ConfigError(f"cannot read {path}: {error}") from None


def _parquet_batches(path: Path, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A row group at a time, each through a reader of its own: one reader over the whole file
    keeps memory growing with the rows read (about 8 MB per million here)."""
    metadata = pq.read_metadata(path)  # the footer, read once
    for group in range(metadata.num_row_groups):
        reader = pq.ParquetFile(path, metadata=metadata)
        yield from reader.iter_batches(batch_size=batch_rows, columns=columns, row_groups=[group])


def table_source(path: str | Path):
    """The table as a Ray Data dataset of raw batches (read in the cluster, never on the driver);
    map `normalise` over its pyarrow batches."""
    import ray.data

    path = Path(path).absolute()
    columns = table_columns(path)
    if is_parquet(path):
        return ray.data.read_parquet(str(path), file_extensions=None).select_columns(columns)  # pushed into the read
    return ray.data.read_csv(str(path), file_extensions=None, **csv_options(columns))


def reads_on_ray(table_path: str | Path, address: str | None) -> bool:
    """Whether a command reads the table in Ray Data tasks (a large table, or a cluster named)
    rather than streaming it in its own process: Ray's start-up costs more than a small table's read."""
    return address is not None or Path(table_path).stat().st_size > IN_PROCESS_BYTES


def map_table(table_path: str | Path, function: Callable[..., dict[str, list]], fn_kwargs: dict,
              batch_rows: int = BATCH_ROWS, progress: bool = False) -> Iterator[dict]:  # fmt: skip
    """`function(raw batch, **fn_kwargs)` over the table's batches of `batch_rows` rows, run in
    Ray Data tasks where the cluster reads the table (Ray must be up). Its result is a small
    record per batch (`{"name": [value]}`: a tally, the name of a file it wrote), never the rows:
    the records come back in row order and the caller holds a few of them, whatever the table's
    size and however far ahead the tasks run. A file that cannot be read is a ConfigError naming
    it, with pyarrow's reason; a ConfigError a task raises reaches the caller as it was."""
    from ray.data import DataContext
    from ray.exceptions import RayError

    context = DataContext.get_current()
    before = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order = True  # records in row order: the same every run
    context.enable_progress_bars = progress
    try:
        records = table_source(table_path).map_batches(
            function, fn_kwargs=fn_kwargs, batch_format="pyarrow", batch_size=batch_rows
        )
        yield from records.iter_rows()
    except (pa.ArrowException, OSError, ValueError, RayError) as error:  # a task's error, its cause inside
        cause = _cause(error)
        said = _config_error(error)
    else:
        return
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = before
    if said:  # a task's own words (a file it could not write): the table is not to blame
        raise ConfigError(said) from None
    # Ray's CSV reader drops pyarrow's words (which row, what is wrong): reading the table here,
    # streaming, raises the ConfigError with them; when it reads, the fault was Ray's or a task's.
    for _ in iter_table(table_path):
        pass
    raise ConfigError(f"cannot read {table_path}: {cause}")


def _config_error(error: BaseException) -> str | None:
    """The message of a ConfigError a task raised, from the traceback Ray wraps around it (Ray
    Data passes on its text, not the exception)."""
    mark = f"{ConfigError.__module__}.{ConfigError.__qualname__}: "
    said = [line.strip()[len(mark) :] for line in str(error).splitlines() if line.strip().startswith(mark)]
    return said[-1] if said else None


def _cause(error: BaseException) -> str:
    """What went wrong in a task, from the traceback Ray wraps around it: its last
    `SomethingError: ...` line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]*(Error|Invalid|Exception)\b.*: ", line)]
    return (causes or lines or [type(error).__name__])[-1]


def normalise(batch: pa.Table) -> pd.DataFrame:
    """A raw batch as every stage sees it: path and text as str (a null is "", bytes that are
    not UTF-8 become U+FFFD so that their row can be rejected); metadata columns as they were
    stored (`read_metadata` parses them)."""
    columns = {}
    for name in batch.column_names:
        values = batch.column(name)
        if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            values = _decode(values)
        if name in REQUIRED_COLUMNS:
            values = pc.fill_null(values.cast(pa.string()) if not pa.types.is_string(values.type) else values, "")
        columns[name] = values.to_pandas()
    return pd.DataFrame(columns)


def _decode(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Bytes as UTF-8 text; a batch with invalid bytes is decoded value by value, replacing them."""
    try:
        return values.cast(pa.string())
    except pa.ArrowInvalid:
        decoded = [None if v is None else v.decode("utf-8", errors="replace") for v in values.to_pylist()]
        return pa.chunked_array([pa.array(decoded, type=pa.string())])


def read_table(path: str | Path) -> pd.DataFrame:
    """The whole table on this process (small tables: `sora demo-eval`, tests); a missing file or
    required column fails at once, naming it. Rows are numbered from 0 in file order."""
    frames = list(iter_table(path))
    if not frames:
        return pd.DataFrame({column: pd.Series(dtype=object) for column in table_columns(path)})
    return pd.concat(frames, ignore_index=True)


def read_metadata(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """The table's metadata columns as numbers, and which rows have a usable size.

    num_frames, height and width become integers, rounded (a tool that wrote 719.9999 meant
    720); blanks, junk, infinities, zero or negative and absurd values become missing, and such
    rows are probed. fps stays a float.
    Absent columns are all missing. `sora preprocess` and `sora bucket-report` both read
    the table through here, so they agree on every row's bucket.
    """
    columns = {}
    for name in METADATA_COLUMNS:
        raw = table[name] if name in table.columns else pd.Series(None, index=table.index, dtype=object)
        values = pd.to_numeric(raw, errors="coerce").astype("float64")
        values = values.where((values > 0) & (values < 2**31))  # infinities, absurd and negative values: missing
        columns[name] = values if name == "fps" else values.round().astype("Int64")
    metadata = pd.DataFrame(columns, index=table.index)
    return metadata, metadata[list(SIZE_COLUMNS)].notna().all(axis=1)


def row_problems(paths: pd.Series, texts: pd.Series) -> list[tuple[pd.Series, str]]:
    """Rows no file can make usable, with the reason (`sora preprocess` and `sora bucket-report`
    reject them alike): no path, no caption, caption bytes that were not UTF-8."""
    return [
        (paths.str.strip() == "", "empty path"),
        (texts.str.strip() == "", "empty caption"),
        (texts.str.contains("\ufffd", regex=False), "undecodable text (not UTF-8)"),
    ]


def resolve_paths(paths: pd.Series, table_path: str | Path, root: str | None) -> list[Path]:
    """Relative paths resolve against `root` when the config sets it, else the table's folder."""
    # Absolute, so workers on other machines (or in other folders) find the same files.
    base = (Path(root) if root else Path(table_path).parent).absolute()
    return [Path(p) if Path(p).is_absolute() else base / p for p in paths]


def sample_id(path: str, text: str) -> str:
    """A stable id of a sample: its path as written in the table and its caption."""
    return hashlib.blake2b(f"{path}\0{text}".encode(), digest_size=16).hexdigest()
