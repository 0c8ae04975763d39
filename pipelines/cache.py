"""The pre-encoded cache: layout, Arrow schema, atomic writes, and a small reader API.

```
<cache>/manifest.json                          written last; the cache is valid only with it
<cache>/buckets/<res>-<T>f-<ar>/part-*.arrow   Arrow IPC shards, one folder per bucket
<cache>/rejects.arrow                          every input row not kept: path, text, stage, reason, detail
<cache>/probe.arrow                            every input row: probe metadata, bucket or drop reason
```

One row per kept sample. Latents are stored as the VAE posterior's mean and log-variance
(already multiplied by the VAE scaling factor), for more latent frames than the bucket's
T when the source has them, so training can draw Open-Sora's random temporal window and
a fresh posterior sample every step. Text embeddings hold the real tokens only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROBE = "probe.arrow"
REJECTS = "rejects.arrow"
BUCKETS_DIR = "buckets"
WORK_DIR = ".work"  # resumable state of an unfinished run; removed when the manifest is written

# Column names (one place).
ID = "id"
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
STAGE = "stage"
REASON = "reason"
DETAIL = "detail"

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
    ]
)
REJECT_SCHEMA = pa.schema(
    [(ID, pa.string()), (PATH, pa.string()), (TEXT, pa.string()), (STAGE, pa.string()), (REASON, pa.string()),
     (DETAIL, pa.string())]
)  # fmt: skip

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_to_bytes(tensor: torch.Tensor) -> tuple[bytes, list[int], str]:
    """A tensor as (raw bytes, shape, dtype name), bf16 included (numpy has no bf16)."""
    tensor = tensor.detach().contiguous().cpu()
    dtype = str(tensor.dtype).removeprefix("torch.")
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return raw.numpy().tobytes(), list(tensor.shape), dtype


def bytes_to_tensor(data: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    """Inverse of `tensor_to_bytes` (a copy, writable)."""
    torch_dtype = TORCH_DTYPES[dtype]
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write an Arrow IPC file under a temporary name and rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def write_json_atomic(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_table(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()


class CacheError(ValueError):
    """A folder that is not a complete cache, or one written for another config."""


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

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise CacheError(
                f"{self.root} is not a finished cache (no {MANIFEST}); run `sora preprocess` to create or finish it"
            )
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{manifest}: format version {self.manifest.get('format_version')}, expected {FORMAT_VERSION}"
            )

    def buckets(self) -> list[str]:
        """Bucket names (`<res>-<T>f-<ar>`) with at least one sample."""
        return sorted(self.manifest["buckets"])

    def shards(self, bucket: str) -> list[Path]:
        return sorted((self.root / BUCKETS_DIR / bucket).glob("part-*.arrow"))

    def table(self, bucket: str) -> pa.Table:
        """All rows of one bucket as one Arrow table."""
        return pa.concat_tables([read_table(path) for path in self.shards(bucket)])

    def probe_table(self) -> pa.Table:
        return read_table(self.root / PROBE)

    def rejects(self) -> pa.Table:
        return read_table(self.root / REJECTS)

    def iter_samples(self, bucket: str) -> Iterator[CachedSample]:
        for shard in self.shards(bucket):
            for row in read_table(shard).to_pylist():
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
