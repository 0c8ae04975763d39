"""The pre-encoded cache: layout, Arrow schema, atomic writes, and a small reader API.

```
<cache>/manifest.json                               the current version, written last: the cache is valid
                                                    only with it, and replacing it is the switch from one
                                                    version to the next. It names the version folder and
                                                    holds the sha256, size and rows of every shard; a reader
                                                    checks a shard's bytes once per process (`Cache`)
<cache>/v-<id>/buckets/<res>-<T>f-<ar>/part-*.arrow  Arrow IPC shards, one folder per bucket
<cache>/v-<id>/rejects.arrow                        every input row not kept: path, text, stage, reason, detail
<cache>/v-<id>/probe.arrow                          every input row: probe metadata, bucket or drop reason
<cache>/.work/<id>/                                 a version being built (resumable); gone when it is done
<cache>/build.json                                  the last build's timings (what reuse saves is estimated from them)
```

A version's id is a digest of everything that decides its bytes (`fingerprint`: the config's
encoding settings and the input table), so a clean build and an incremental build of the same
table and config write the same folder, byte for byte.

One row per kept sample. Latents are stored as the VAE posterior's mean and log-variance
(already multiplied by the VAE scaling factor), for more latent frames than the bucket's
T when the source has them, so training can draw Open-Sora's random temporal window and
a fresh posterior sample every step. Text embeddings hold the real tokens only. Each row
carries the keys of its two encodings (`latent_key`, `text_key`: what decides their bytes),
by which a later build reuses them (`pipelines/preprocess.py`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import torch

from pipelines.config import ConfigError, TrainConfig
from sora_model.loading import DTYPES

# 2: rejects and probe tables carry the input row; 3: shard checksums in the manifest;
# 4: versions in folders named by their fingerprint, encoding keys in every row
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
BUILD_LOG = "build.json"
VERSION_PREFIX = "v-"
# Inside a version folder:
PROBE = "probe.arrow"
REJECTS = "rejects.arrow"
BUCKETS_DIR = "buckets"
WORK_DIR = ".work"  # <cache>/.work/<id>/: resumable state of a version being built
FINGERPRINT = "fingerprint.json"  # in the work folder: what the build was started with
CHECKSUMS_DIR = "checksums"  # in the work folder: a shard's checksum, written just before the shard
TEMP_PATTERN = ".*.tmp"  # files being written (Store._write); left behind only by a failed run

# Column names (one place).
ID = "id"
ROW = "row"  # the row of the input table (0-based, header excluded)
PATH = "path"
TEXT = "text"
RESOLUTION = "resolution"
NUM_FRAMES = "num_frames"  # the bucket's T
ASPECT = "aspect"
HEIGHT = "height"
WIDTH = "width"
SRC_NUM_FRAMES = "src_num_frames"
SRC_HEIGHT = "src_height"
SRC_WIDTH = "src_width"
SRC_FPS = "src_fps"
FPS = "fps"  # effective: src_fps / frame_interval
LATENT_MEAN = "latent_mean"
LATENT_LOGVAR = "latent_logvar"
LATENT_SHAPE = "latent_shape"  # (C, F, h, w) with F >= T stored latent frames
LATENT_DTYPE = "latent_dtype"
TEXT_EMB = "text_emb"
TEXT_SHAPE = "text_shape"  # (L, D), L real tokens
TEXT_DTYPE = "text_dtype"
NUM_TOKENS = "num_tokens"
LATENT_KEY = "latent_key"  # a digest of what decides the latent's bytes (preprocess.latent_key)
TEXT_KEY = "text_key"  # a digest of what decides the caption embedding's bytes (preprocess.text_key)
STAGE = "stage"
REASON = "reason"
DETAIL = "detail"
# probe.arrow only: the bucket a row was assigned to (None when dropped or rejected) and its shard.
BUCKET = "bucket"
SHARD = "shard"

SAMPLE_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (PATH, pa.string()),
        (TEXT, pa.string()),
        (RESOLUTION, pa.string()),
        (NUM_FRAMES, pa.int32()),
        (ASPECT, pa.string()),
        (HEIGHT, pa.int32()),
        (WIDTH, pa.int32()),
        (SRC_NUM_FRAMES, pa.int32()),
        (SRC_HEIGHT, pa.int32()),
        (SRC_WIDTH, pa.int32()),
        (SRC_FPS, pa.float32()),
        (FPS, pa.float32()),
        (LATENT_MEAN, pa.large_binary()),
        (LATENT_LOGVAR, pa.large_binary()),
        (LATENT_SHAPE, pa.list_(pa.int32())),
        (LATENT_DTYPE, pa.string()),
        (TEXT_EMB, pa.large_binary()),
        (TEXT_SHAPE, pa.list_(pa.int32())),
        (TEXT_DTYPE, pa.string()),
        (NUM_TOKENS, pa.int32()),
        (LATENT_KEY, pa.string()),
        (TEXT_KEY, pa.string()),
    ]
)
REJECT_SCHEMA = pa.schema(
    [(ID, pa.string()), (ROW, pa.int64()), (PATH, pa.string()), (TEXT, pa.string()),
     (STAGE, pa.string()), (REASON, pa.string()), (DETAIL, pa.string())]
)  # fmt: skip

# While preprocessing, a row that fails gets these columns set (stage, reason, detail);
# they become the stage, reason and detail columns of rejects.arrow. probe.arrow keeps them.
REJECT_STAGE = "reject_stage"
REJECT_COLUMNS = (REJECT_STAGE, "reject_reason", "reject_detail")
# The stages named in rejects.arrow, in pipeline order.
VALIDATE, PROBE_STAGE, BUCKETING, DECODE, ENCODE = "validate", "probe", "bucket", "decode", "encode"

# Tensors are stored under torch's dtype names ("bfloat16"); the config's names ("bf16") map to them.
_STORED_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPES.values()}


def tensor_to_bytes(tensor: torch.Tensor) -> tuple[bytes, list[int], str]:
    """A tensor as (raw bytes, shape, dtype name), bf16 included (numpy has no bf16)."""
    tensor = tensor.detach().contiguous().cpu()
    dtype = str(tensor.dtype).removeprefix("torch.")
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return raw.numpy().tobytes(), list(tensor.shape), dtype


def bytes_to_tensor(data: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    """Inverse of `tensor_to_bytes` (a copy, writable)."""
    torch_dtype = _STORED_DTYPES[dtype]
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)


class Store:
    """Where a cache lives: a local folder, or a URI that pyarrow's filesystems understand
    (`s3://bucket/prefix`, `gs://...`, `hdfs://...`, `file:///...`). Paths are relative to it.

    Every file is written under a temporary name (a leading dot) and then moved into place,
    so readers never see a partial file; on object stores the move is a copy, and the object
    appears whole.
    """

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        if "://" in self.location:
            self.fs, self.root = pafs.FileSystem.from_uri(self.location)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(location).absolute())

    def path(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}" if relative else self.root

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def is_empty(self) -> bool:
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return True
        return not self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))

    def _write(self, relative: str, write) -> None:
        final = self.path(relative)
        folder, name = final.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{name}.{os.getpid()}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as sink:
                write(sink)
            self.fs.move(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk, an interrupt: leave no partial file
                self.fs.delete_file(tmp)
            raise

    def write_table(self, relative: str, table: pa.Table) -> None:
        self.write_bytes(relative, table_bytes(table))

    def write_bytes(self, relative: str, data: bytes) -> None:
        self._write(relative, lambda sink: sink.write(data))

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as source:
            return source.read()

    def read_table(self, relative: str) -> pa.Table:
        with self.fs.open_input_file(self.path(relative)) as source:
            return ipc.open_file(source).read_all()

    def iter_batches(self, relative: str) -> Iterator[pa.RecordBatch]:
        """An Arrow IPC file a record batch at a time (a table larger than memory)."""
        with self.fs.open_input_file(self.path(relative)) as source:
            reader = ipc.open_file(source)
            for index in range(reader.num_record_batches):
                yield reader.get_batch(index)

    def count_rows(self, relative: str) -> int:
        """Rows of an Arrow IPC file."""
        with self.fs.open_input_file(self.path(relative)) as source:
            return ipc.open_file(source).count_rows()

    def write_batches(self, relative: str, schema: pa.Schema, tables: Iterator[pa.Table]) -> None:
        """An Arrow IPC file written as `tables` come (memory: one of them), atomically like every file."""

        def write(sink) -> None:
            with ipc.new_file(sink, schema) as writer:
                for table in tables:
                    writer.write_table(table)

        self._write(relative, write)

    def write_json(self, relative: str, data: dict) -> None:
        self._write(relative, lambda sink: sink.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode()))

    def read_json(self, relative: str) -> dict:
        with self.fs.open_input_stream(self.path(relative)) as source:
            return json.loads(source.read().decode())

    def files(self, relative_dir: str, pattern: str = "*") -> list[str]:
        """Relative paths of the files below a folder whose names match `pattern`, sorted."""
        selector = pafs.FileSelector(self.path(relative_dir), recursive=True, allow_not_found=True)
        prefix = self.root.rstrip("/") + "/"
        return sorted(
            info.path.removeprefix(prefix)
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and fnmatch.fnmatch(info.base_name, pattern)
        )

    def folders(self, relative_dir: str = "") -> list[str]:
        """Names of the folders directly inside a folder, sorted."""
        selector = pafs.FileSelector(self.path(relative_dir), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)

    def delete_dir(self, relative: str) -> None:
        if self.fs.get_file_info(self.path(relative)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(relative))

    def delete_file(self, relative: str) -> None:
        self.fs.delete_file(self.path(relative))


def table_bytes(table: pa.Table) -> bytes:
    """An Arrow IPC file of `table`, in memory (so its checksum is known before it is written).

    The same rows give the same bytes however they were gathered: pandas' schema metadata (how
    the frame was built) is dropped, and strings are copied into buffers of their own (a string
    column read from another Arrow file is a view whose buffers the file would carry whole).
    """
    table = table.replace_schema_metadata(None)
    for index, column in enumerate(table.schema):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            table = table.set_column(index, column, pa.array(table.column(index).to_pylist(), type=column.type))
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_bytes(data: bytes) -> pa.Table:
    """Inverse of `table_bytes`."""
    return ipc.open_file(pa.BufferReader(data)).read_all()


def shard_record(data: bytes, rows: int) -> dict[str, Any]:
    """What the manifest keeps of a shard: its sha256, size in bytes and rows."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": rows}


class CacheError(ConfigError):
    """A folder that is not a complete cache, or one written for another config."""


class CorruptShardError(CacheError):
    """A shard whose bytes are not those the manifest recorded."""


_VERIFIED: set[tuple[str, str, str]] = set()  # (cache, shard, sha256) checked in this process


@dataclass(frozen=True)
class CachedSample:
    """One cached row as tensors."""

    id: str
    path: str
    text: str
    bucket: str
    latent_mean: torch.Tensor  # (C, F, h, w)
    latent_logvar: torch.Tensor  # (C, F, h, w)
    text_embedding: torch.Tensor  # (L, D), real tokens only
    fps: float


class Cache:
    """A finished cache: its manifest, its buckets, and rows as tensors."""

    def __init__(self, location: str | Path) -> None:
        self.store = Store(location)
        if not self.store.exists(MANIFEST):
            raise CacheError(
                f"{location} is not a finished cache (no {MANIFEST}); run `sora preprocess` to create or finish it"
            )
        self.manifest: dict[str, Any] = self.store.read_json(MANIFEST)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            found = self.manifest.get("format_version")
            raise CacheError(
                f"{location}/{MANIFEST}: format version {found}, expected {FORMAT_VERSION}; preprocess into a new "
                "--cache-dir (an older format is not read, and not overwritten)"
            )
        self.version: str = self.manifest["version"]  # the folder of the current version

    def buckets(self) -> list[str]:
        """Bucket names (`<res>-<T>f-<ar>`) with at least one sample."""
        return sorted(self.manifest["buckets"])

    def shards(self, bucket: str) -> list[str]:
        """Shard files of a bucket, relative to the cache, as the manifest lists them."""
        return sorted(shard for shard in self.manifest["shards"] if shard.split("/")[-2] == bucket)

    def read_shard(self, shard: str) -> pa.Table:
        """One shard, its bytes checked against the manifest the first time this process reads it."""
        expected = self.manifest["shards"][shard]["sha256"]
        key = (self.store.location, shard, expected)
        if key in _VERIFIED:
            return self.store.read_table(shard)
        data = self.store.read_bytes(shard)
        found = hashlib.sha256(data).hexdigest()
        if found != expected:
            raise CorruptShardError(
                f"{self.store.path(shard)}: corrupt shard (sha256 {found[:16]}..., the manifest says "
                f"{expected[:16]}...); `sora cache verify {self.store.location}` checks the whole cache, and "
                "`sora preprocess` into a fresh --cache-dir rebuilds it"
            )
        _VERIFIED.add(key)
        return table_from_bytes(data)

    def table(self, bucket: str) -> pa.Table:
        """All rows of one bucket as one Arrow table."""
        return pa.concat_tables([self.read_shard(shard) for shard in self.shards(bucket)])

    def probe_table(self) -> pa.Table:
        return self.store.read_table(f"{self.version}/{PROBE}")

    def rejects(self) -> pa.Table:
        return self.store.read_table(f"{self.version}/{REJECTS}")

    def text_dim(self) -> int:
        """Channels of the cached caption embeddings (the text encoder's width)."""
        first = self.table(self.buckets()[0]).slice(0, 1).to_pylist()[0]
        return int(first[TEXT_SHAPE][1])

    def iter_samples(self, bucket: str) -> Iterator[CachedSample]:
        for shard in self.shards(bucket):
            for row in self.read_shard(shard).to_pylist():
                yield sample_from_row(row, bucket)


def sample_from_row(row: dict[str, Any], bucket: str) -> CachedSample:
    return CachedSample(
        id=row[ID],
        path=row[PATH],
        text=row[TEXT],
        bucket=bucket,
        latent_mean=bytes_to_tensor(row[LATENT_MEAN], row[LATENT_SHAPE], row[LATENT_DTYPE]),
        latent_logvar=bytes_to_tensor(row[LATENT_LOGVAR], row[LATENT_SHAPE], row[LATENT_DTYPE]),
        text_embedding=bytes_to_tensor(row[TEXT_EMB], row[TEXT_SHAPE], row[TEXT_DTYPE]),
        fps=float(row[FPS]),
    )


# --------------------------------------------------------------------------- rejects


def rejects_table(rows: pd.DataFrame) -> pa.Table:
    """The rows of a preprocessing frame that carry a reject, as rejects.arrow's schema."""
    failed = rows[rows[REJECT_STAGE].notna()]
    renamed = failed.rename(columns=dict(zip(REJECT_COLUMNS, (STAGE, REASON, DETAIL), strict=True)))
    return pa.Table.from_pandas(
        renamed[list(REJECT_SCHEMA.names)].fillna({DETAIL: ""}), schema=REJECT_SCHEMA, preserve_index=False
    )


# --------------------------------------------------------------------------- fingerprint


def _model_identity(name: str, revision: str | None) -> str:
    """A hub model by name and revision; a local folder by its config and weight files' names and sizes."""
    folder = Path(name)
    if not folder.is_dir():
        return f"{name}@{revision or 'main'}"
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            digest.update(f"{file.relative_to(folder)}:{file.stat().st_size}\n".encode())
            if file.suffix == ".json":
                digest.update(file.read_bytes())
    return f"local:{digest.hexdigest()[:16]}"


def fingerprint(config: TrainConfig, input_digest: str | None = None) -> dict[str, str]:
    """Everything that changes the bytes of a cache, by name (so a mismatch can say what differs)."""
    # Batch sizes only matter to training: changing them keeps the cache valid.
    if config.bucket_config is not None:
        buckets: Any = {
            res: {t: keep for t, (keep, _) in frames.items()} for res, frames in config.bucket_config.items()
        }
    else:
        buckets = (config.image_size, config.num_frames)
    parts = {
        "format_version": str(FORMAT_VERSION),
        "vae": _model_identity(config.vae.from_pretrained, config.vae.revision) + f"/{config.vae.subfolder}",
        "text_encoder": _model_identity(config.text_encoder.from_pretrained, config.text_encoder.revision),
        "dtype": config.dtype,
        "model_max_length": str(config.text_encoder.model_max_length),
        "frame_interval": str(config.frame_interval),
        "buckets": json.dumps(buckets, sort_keys=True, default=str),
        "cache_frames_factor": str(config.cache_frames_factor),
        "latents": "posterior mean and logvar, scaled",
        "seed": str(config.seed),  # keep_prob draws depend on it
    }
    limit = config.preprocess.max_pixels_per_frame  # rejects rows: part of the bytes when not the default
    if limit != type(config.preprocess)().max_pixels_per_frame:
        parts["max_pixels_per_frame"] = str(limit)
    if input_digest is not None:
        parts["input"] = input_digest
    return parts


def _differences(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def check_cache_matches(store: Store, config: TrainConfig) -> None:
    """Refuse a finished cache written under other settings than `config` (input aside)."""
    found = store.read_json(MANIFEST)["fingerprint"]
    differences = [d for d in _differences(found, fingerprint(config)) if not d.startswith("input")]
    if differences:
        raise ConfigError(f"{store.location} was made with other settings than this config: {'; '.join(differences)}")


def version_name(parts: dict[str, str]) -> str:
    """The folder of the version a fingerprint describes: the same for a clean and an incremental build."""
    return VERSION_PREFIX + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
