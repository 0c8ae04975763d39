"""The input table (CSV or Parquet of path,text[,metadata]) and sample ids."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from pipelines.config import ConfigError

# A row whose file has one of these extensions is an image (Open-Sora tells images from videos the same way).
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}

REQUIRED_COLUMNS = ("path", "text")
SAMPLES_TABLE = "samples.csv"  # what `sora sample` writes beside its videos, in this table format
# Open-Sora's data tools write these; when present they spare probing the files.
SIZE_COLUMNS = ("num_frames", "height", "width")  # what bucketing needs of a row
METADATA_COLUMNS = (*SIZE_COLUMNS, "fps")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read the input table; a missing file or required column fails at once, naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"input table not found: {path}")
    try:
        table = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else _read_csv(path)
    except Exception as error:  # pandas and pyarrow raise many types for a malformed file
        raise ConfigError(f"cannot read {path}: {error}") from None
    table = table.reset_index(drop=True)  # a filtered table saved with its old row labels: rows are positions
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise ConfigError(
            f"{path}: missing required column {', '.join(repr(c) for c in missing)} "
            f"(found: {', '.join(map(str, table.columns))})"
        )
    for column in REQUIRED_COLUMNS:  # text, whatever a Parquet writer stored: a null is "" (rejected as empty)
        values = table[column]
        table[column] = values.astype(object).where(values.notna(), "").map(str)
    return table


def _read_csv(path: Path) -> pd.DataFrame:
    """pyarrow's fast reader; a file with bytes that are not UTF-8 is read again with those bytes
    replaced (U+FFFD), so the rows holding them can be rejected one by one, not the whole file."""
    options = {"dtype": {"path": str, "text": str}, "keep_default_na": False}
    try:
        return pd.read_csv(path, engine="pyarrow", **options)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        if "UTF8" not in str(error) and "utf-8" not in str(error):
            raise
        return pd.read_csv(path, engine="c", encoding_errors="replace", **options)


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


def resolve_paths(paths: pd.Series, table_path: str | Path, root: str | None) -> list[Path]:
    """Relative paths resolve against `root` when the config sets it, else the table's folder."""
    # Absolute, so workers on other machines (or in other folders) find the same files.
    base = (Path(root) if root else Path(table_path).parent).absolute()
    return [Path(p) if Path(p).is_absolute() else base / p for p in paths]


def sample_id(path: str, text: str) -> str:
    """A stable id of a sample: its path as written in the table and its caption."""
    return hashlib.blake2b(f"{path}\0{text}".encode(), digest_size=16).hexdigest()
