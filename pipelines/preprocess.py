"""`sora preprocess`: a Ray Data pipeline from a CSV to a cache of VAE latents and T5 embeddings.

    read table -> validate rows -> probe (Ray Data; files an earlier build probed are not)
               -> assign buckets -> plan shards -> encoding keys
               -> T5 over the distinct captions no earlier build has (actors), beside:
                  decode + resize/crop (Ray Data) -> VAE encode (actors), for the latents no earlier build has
               -> write shards (atomic) -> rejects.arrow -> manifest.json (last: the switch)

Every row ends in a shard or in rejects.arrow with its stage and reason; no row error
stops the job. Work is cut into shards fixed before any encoding (per bucket, rows sorted
by id, `rows_per_shard` each), and each shard file appears atomically when done, so a rerun
after an interruption skips finished shards and ends with the very cache an uninterrupted
run writes.

A cache holds one version per (table, config) (`pipelines/cache.py`). Running again with a
changed table or config builds the new version beside the current one, taking every encoding
whose key is unchanged from it (and from `--reuse` caches, `pipelines/reuse.py`), and encoding
the rest; encodings do not depend on which rows share a model call, so the result is byte for
byte what a clean build writes. Readers keep the current version until the manifest switches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from tqdm import tqdm

from bucketing.assign import Drop, assign_buckets, bucket_of_code, sample_keys
from pipelines import cache
from pipelines.cache import (
    BUCKET,
    BUCKETING,
    DECODE,
    ENCODE,
    PROBE_STAGE,
    REJECT_COLUMNS,
    REJECT_STAGE,
    SHARD,
    SRC_FPS,
    SRC_HEIGHT,
    SRC_NUM_FRAMES,
    SRC_WIDTH,
    VALIDATE,
)
from pipelines.cluster import connect
from pipelines.config import ConfigError, TrainConfig
from pipelines.dataset import (
    BATCH_ROWS,
    METADATA_COLUMNS,
    iter_table,
    map_table,
    normalise,
    read_metadata,
    reads_on_ray,
    resolve_paths,
    row_problems,
    sample_id,
    table_columns,
)
from pipelines.media import DecodeError, frame_indices, read_frames, resize_crop
from pipelines.models import load_text_encoder, load_vae
from pipelines.probe import ProbeError, probe
from pipelines.reuse import (
    LATENT_COLUMNS,
    PROBED,
    SOURCE,
    TEXT_COLUMNS,
    TEXT_PART_SCHEMA,
    TEXTS_DIR,
    Encodings,
    latent_key,
    source_identity,
    text_key,
)
from pipelines.spill import Spill, new_stream, open_stream, partition_count
from sora_model.loading import torch_dtype

SCRATCH_DIR = "scratch"  # <cache>/.work/<id>/scratch: the run's spill files
READ_DIR = "read"  # <cache>/.work/<id>/read: the rows Ray Data tasks read, a file per batch, until the plan takes them
READ_MARK = "command"  # in READ_DIR, written by the command: a task that cannot see it writes elsewhere
ROW_HASH_BYTES = 16  # the input digest is taken over a digest of each row of this size
FILE = "file"  # a working column: the path resolved for this machine; never written
SOURCE_SIZE = [SRC_NUM_FRAMES, SRC_HEIGHT, SRC_WIDTH]  # what bucketing needs of each row


class Rejects:
    """The reject columns of a batch as plain lists; None = the row is fine so far.

    Batches come back from Ray with these columns in whatever types their blocks had
    (all-null, strings, NA); writing them back as object columns of str or None, in every
    stage, keeps one representation end to end.
    """

    def __init__(self, batch: pd.DataFrame) -> None:
        self.columns = [[v if isinstance(v, str) and v else None for v in batch[c].tolist()] for c in REJECT_COLUMNS]

    def failed(self, row: int) -> bool:
        return self.columns[0][row] is not None

    def set(self, row: int, stage: str, reason: str, detail: str = "") -> None:
        for column, value in zip(self.columns, (stage, reason, detail[:500]), strict=True):
            column[row] = value

    def into(self, batch: pd.DataFrame, **columns) -> pd.DataFrame:
        values = {
            name: pd.Series(column, index=batch.index, dtype=object)
            for name, column in zip(REJECT_COLUMNS, self.columns, strict=True)
        }
        return batch.assign(**values, **columns)


# --------------------------------------------------------------------------- stages (Ray Data)


def probe_batch(batch: pd.DataFrame) -> pd.DataFrame:
    """Probe stage: frame count, displayed size, fps per row; failures become rejects."""
    count = len(batch)
    frames, heights, widths, fps = [0] * count, [0] * count, [0] * count, [0.0] * count
    rejects = Rejects(batch)
    for row, file in enumerate(batch[FILE].tolist()):
        try:
            found = probe(file)
        except ProbeError as error:
            rejects.set(row, PROBE_STAGE, error.reason, error.detail)
            continue
        except Exception as error:  # one bad file must not drop the block
            rejects.set(row, PROBE_STAGE, "probe failed", repr(error))
            continue
        frames[row], heights[row], widths[row], fps[row] = found.num_frames, found.height, found.width, found.fps
    columns = {SRC_NUM_FRAMES: frames, SRC_HEIGHT: heights, SRC_WIDTH: widths, SRC_FPS: fps}
    return rejects.into(batch, **columns)


class DecodeFrames:
    """Decode stage: the frames a bucket needs, resized and centre-cropped, as uint8 bytes.
    Run as Ray tasks (`decode_frames`): they reuse the cluster's warm worker processes, where
    actors would each start a process, which is most of a small incremental build's time."""

    def __init__(self, frame_interval: int, frames_factor: float) -> None:
        self.frame_interval = frame_interval
        self.frames_factor = frames_factor
        torch.set_num_threads(1)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        frames, shapes = [], []
        rejects = Rejects(batch)
        for index, row in enumerate(batch.itertuples(index=False)):
            frames.append(b"")
            shapes.append([])
            try:
                indices = frame_indices(row.src_num_frames, row.num_frames, self.frame_interval, self.frames_factor)
                decoded = read_frames(row.file, indices)  # (F, H, W, 3) as displayed
                if decoded.shape[1:3] != (row.src_height, row.src_width):
                    # The table's metadata placed this row in its bucket; a file that disagrees would
                    # be cropped to the wrong shape without a word.
                    raise DecodeError(
                        f"the file is {decoded.shape[2]}x{decoded.shape[1]} but the table says "
                        f"{row.src_width}x{row.src_height}"
                    )
                video = resize_crop(decoded, row.height, row.width)  # (3, F, H, W)
                pixels = ((video + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
                frames[index], shapes[index] = pixels.numpy().tobytes(), list(pixels.shape)
            except (DecodeError, ValueError, RuntimeError, OSError) as error:
                rejects.set(index, DECODE, "cannot decode", str(error))
        return rejects.into(batch, frames=frames, frames_shape=shapes)


def decode_frames(batch: pd.DataFrame, frame_interval: int, frames_factor: float) -> pd.DataFrame:
    """The decode stage as a function, for Ray Data tasks."""
    return DecodeFrames(frame_interval, frames_factor)(batch)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


NON_FINITE = "non-finite"  # an encoder's output with NaN or Inf: rejected, never cached
VAE_CHUNK = 16  # frames per VAE call in preprocessing when vae.micro_batch_size is not set


def _node_id() -> str:
    """The Ray node this stage runs on (the summary says where the VAE ran)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class VaeEncode:
    """VAE stage: posterior mean and log-variance per sample, loaded once per actor. The frames of
    all the batch's rows of one size are encoded together, in calls of a fixed number of frames."""

    def __init__(self, config: TrainConfig) -> None:
        torch.set_num_threads(max(1, int(config.preprocess.vae.num_cpus)))
        self.device = _device()
        compute = torch_dtype(config.dtype) if self.device.type == "cuda" else torch.float32
        self.vae = load_vae(config.vae, compute).to(self.device)
        self.store = torch_dtype(config.dtype)
        self.node = _node_id()
        # Frames per VAE call, always this many (the last call of a batch padded): see encode_many.
        self.chunk = config.vae.micro_batch_size or VAE_CHUNK
        if self.device.type == "cuda":  # one algorithm per shape, chosen the same way every run
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        count = len(batch)
        means, logvars, shapes, dtypes = [b""] * count, [b""] * count, [[]] * count, [""] * count
        rejects = Rejects(batch)
        started = time.perf_counter()
        videos = {}
        for i in range(count):
            if rejects.failed(i):
                continue
            row = batch.iloc[i]
            try:
                pixels = torch.frombuffer(bytearray(row["frames"]), dtype=torch.uint8)
                videos[i] = pixels.reshape(list(row["frames_shape"]))  # (3, F, H, W) uint8, on the host
            except Exception as error:  # one bad row must not drop the block
                rejects.set(i, ENCODE, "VAE failed", repr(error))
        rows = list(videos)
        try:  # the frames of every row of one size, in calls of `chunk` frames
            encoded = dict(zip(rows, self.vae.encode_many([videos[i] for i in rows], self.chunk), strict=True))
        except Exception:  # then one row at a time, to reject only the rows that fail
            encoded = {}
            for i in rows:
                try:
                    encoded[i] = self.vae.encode_many([videos[i]], self.chunk)[0]
                except Exception as error:  # one bad row must not drop the block
                    rejects.set(i, ENCODE, "VAE failed", repr(error))
        for i, (mean, logvar) in list(encoded.items()):
            mean, logvar = mean.to(self.store), logvar.to(self.store)
            if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
                rejects.set(i, ENCODE, NON_FINITE, "the VAE's latents hold NaN or Inf")
                continue
            means[i], shapes[i], dtypes[i] = cache.tensor_to_bytes(mean)
            logvars[i] = cache.tensor_to_bytes(logvar)[0]
        columns = {
            cache.LATENT_MEAN: means,
            cache.LATENT_LOGVAR: logvars,
            cache.LATENT_SHAPE: shapes,
            cache.LATENT_DTYPE: dtypes,
        }
        frames = sum(videos[i].shape[1] for i in encoded)
        span = [(started, time.perf_counter(), frames)] * count  # for the run's summary: time and frames
        return rejects.into(batch.drop(columns=["frames", "frames_shape"]), vae_span=span, vae_node=[self.node] * count,
                            **columns)  # fmt: skip


class TextEncode:
    """T5 stage: caption embeddings, real tokens only, loaded once per actor. Each caption is
    encoded in a call of exactly `batch_size` captions (the last one padded), so its bytes do not
    depend on which captions share its call: a clean and an incremental build agree."""

    def __init__(self, config: TrainConfig) -> None:
        torch.set_num_threads(max(1, int(config.preprocess.text.num_cpus)))
        self.device = _device()
        self.encoder = load_text_encoder(config.text_encoder)
        self.encoder.model.to(self.device)
        self.store = torch_dtype(config.dtype)
        self.call = config.preprocess.text.batch_size or 16

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        count = len(batch)
        embeddings, shapes, dtypes, tokens = [b""] * count, [[]] * count, [""] * count, [0] * count
        reasons, details = [None] * count, [None] * count
        captions = batch[cache.TEXT].tolist()
        started = time.perf_counter()
        for first in range(0, count, self.call):
            rows = list(range(first, min(first + self.call, count)))
            padded = [captions[i] for i in rows] + [""] * (self.call - len(rows))
            try:
                states, mask = self.encoder.encode(padded)  # (call, L, D), (call, L)
            except Exception as error:  # one bad call rejects its captions
                for i in rows:
                    reasons[i], details[i] = "T5 failed", repr(error)[:500]
                continue
            for slot, i in enumerate(rows):
                real = int(mask[slot].sum())
                state = states[slot, :real].to(self.store)  # (real tokens, D)
                if not torch.isfinite(state).all():
                    reasons[i], details[i] = NON_FINITE, "the T5 states hold NaN or Inf"
                    continue
                embeddings[i], shapes[i], dtypes[i] = cache.tensor_to_bytes(state)
                tokens[i] = real
        columns = {
            cache.TEXT_EMB: embeddings,
            cache.TEXT_SHAPE: shapes,
            cache.TEXT_DTYPE: dtypes,
            cache.NUM_TOKENS: tokens,
            "reason": pd.Series(reasons, index=batch.index, dtype=object),  # str or None, as in Rejects
            "detail": pd.Series(details, index=batch.index, dtype=object),
        }
        return batch.assign(text_span=[(started, time.perf_counter())] * count, **columns)


def _gpus_for(stage_gpus: float | None, cluster_gpus: float) -> float:
    if stage_gpus is not None:
        return stage_gpus
    return 1.0 if cluster_gpus > 0 else 0.0


def encode_pipeline(rows, config: TrainConfig, cluster_gpus: float):
    """Decode and VAE stages, composed: their resources in one place."""
    from ray.data import TaskPoolStrategy

    res = config.preprocess
    decoded = rows.map_batches(
        decode_frames,
        fn_kwargs={"frame_interval": config.frame_interval, "frames_factor": config.cache_frames_factor},
        batch_format="pandas",
        batch_size=res.decode.batch_size,
        compute=TaskPoolStrategy(size=res.decode.concurrency),
        num_cpus=res.decode.num_cpus,
        num_gpus=0,
    )
    return _model_stage(decoded, VaeEncode, res.vae, config, cluster_gpus)


def text_pipeline(captions, config: TrainConfig, cluster_gpus: float):
    """The T5 stage over distinct captions."""
    return _model_stage(captions, TextEncode, config.preprocess.text, config, cluster_gpus)


def _model_stage(rows, model: type, res, config: TrainConfig, cluster_gpus: float):
    """A model stage: actors of `model(config)`, each loading the model once, on a GPU when there are GPUs."""
    from ray.data import ActorPoolStrategy

    return rows.map_batches(
        model,
        fn_constructor_kwargs={"config": config},
        batch_format="pandas",
        batch_size=res.batch_size,
        compute=ActorPoolStrategy(size=res.concurrency),
        num_cpus=res.num_cpus,
        num_gpus=_gpus_for(res.num_gpus, cluster_gpus),
    )


# --------------------------------------------------------------------------- the job


@dataclass
class Summary:
    rows_in: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # bucket -> rows
    dropped: dict[str, int] = field(default_factory=dict)  # bucketing reason -> rows
    rejected: dict[str, int] = field(default_factory=dict)  # "stage: reason" -> rows
    up_to_date: bool = False
    # This run's encoding: wall time from the first encoded batch to the last, and time in the models.
    encoded_rows: int = 0
    encode_wall_seconds: float = 0.0
    vae_window_seconds: float = 0.0  # the VAE's first call to its last
    vae_seconds: float = 0.0
    text_seconds: float = 0.0
    # What this run took from earlier builds instead of computing it.
    reuse: Reuse | None = None

    def format(self) -> str:
        lines = [
            f"rows in: {self.rows_in}   kept: {sum(self.kept.values())}   "
            f"dropped by bucketing: {sum(self.dropped.values())}   rejected: {sum(self.rejected.values())}"
        ]
        lines += [f"  kept      {count:>7}  {name}" for name, count in sorted(self.kept.items())]
        lines += [f"  dropped   {count:>7}  {reason}" for reason, count in sorted(self.dropped.items())]
        lines += [f"  rejected  {count:>7}  {reason}" for reason, count in sorted(self.rejected.items())]
        if self.reuse is not None:
            lines += self.reuse.format()
        return "\n".join(lines) + "\n"


@dataclass
class Reuse:
    """Per stage, rows computed by this run and rows taken from earlier builds."""

    probed: int = 0
    probe_reused: int = 0
    vae_encoded: int = 0
    vae_reused: int = 0
    text_encoded: int = 0  # distinct captions
    text_reused: int = 0  # rows whose caption embedding an earlier build (or an identical caption) gave
    bytes_reused: int = 0
    seconds_saved: float | None = None  # estimated from the models' time per row (this run's or the last build's)

    def format(self) -> list[str]:
        saved = "unknown" if self.seconds_saved is None else f"about {self.seconds_saved:.1f} s of model time"
        return [
            f"  this run: probe {self.probed} probed, {self.probe_reused} reused;  "
            f"VAE {self.vae_encoded} rows encoded, {self.vae_reused} reused;  "
            f"T5 {self.text_encoded} captions encoded, {self.text_reused} rows reused",
            f"  reused {self.bytes_reused / 2**20:.1f} MiB of encodings, saving {saved}",
        ]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def preprocess(
    config: TrainConfig, cache_dir: str | Path, address: str | None = None, reuse: Sequence[str] = (),
    on_ray: bool | None = None,
) -> Summary:  # fmt: skip
    """Build (or resume building) the cache version of `config.data_path` and `config` in
    `cache_dir`, taking every encoding whose key is unchanged from the folder's current version
    and from the finished caches `reuse` names; switch to it when it is complete.

    The table is read and validated in Ray Data tasks when it is large or `address` names a
    cluster (`reads_on_ray`; `on_ray` decides instead when given), else streamed in this process:
    the cache is the same either way."""
    if config.data_path is None:
        raise ConfigError("no input table: give DATA.csv (or set data_path in the config)")
    store = cache.Store(cache_dir)
    table_path = Path(config.data_path)
    columns = table_columns(table_path)  # fails here, before any work, on a missing file or column
    if on_ray is None:
        on_ray = reads_on_ray(table_path, address)
    if on_ray:
        _connect_and_count_gpus(address)
    digest, rows_in = _table_digest(table_path, columns, config.root, on_ray)
    parts = cache.fingerprint(config, digest)
    version = cache.version_name(parts)
    current = cache.Cache(store.location) if store.exists(cache.MANIFEST) else None  # refuses older formats
    if current is None and not store.files(cache.WORK_DIR, cache.FINGERPRINT) and not store.is_empty():
        raise ConfigError(f"{store.location} exists and is not a cache; give an empty or new --cache-dir")
    _remove_temp_files(store)
    if current is not None and current.version == version:
        _remove_other_versions(store, keep={version})
        _log(f"{store.location} is up to date with this config and input; nothing to do")
        return _summary_from_manifest(current.manifest, up_to_date=True)
    sources = [cache.Cache(location) for location in reuse]  # each a finished cache, or a clear error
    _remove_other_versions(store, keep={version, current.version if current else ""})
    work = f"{cache.WORK_DIR}/{version}"
    store.write_json(f"{work}/{cache.FINGERPRINT}", parts)
    encodings = Encodings()
    for found in [current, *sources]:
        if found is not None:
            encodings.add_cache(found)
    if encodings.latents:
        _log(f"reusing encodings of {len(encodings.latents)} latents and {len(encodings.texts)} captions "
             "from earlier builds")  # fmt: skip

    stats = Reuse()
    with _scratch(store, work) as scratch:
        if not store.exists(f"{version}/{cache.PROBE}"):
            with contextlib.closing(_read_table(store, version, table_path, config, on_ray)) as rows:
                _plan(store, version, rows, rows_in, config, address, encodings, parts, stats, scratch)

        def shards() -> Iterator[tuple[str, pd.DataFrame]]:
            return _planned_shards(store, version, scratch)

        timing = _encode(shards, store, version, config, address, encodings, stats, scratch)
    _estimate_savings(store, stats, timing)
    summary = _finish(store, version, parts)
    for name, value in timing.items():
        setattr(summary, name, value)
    summary.reuse = stats
    return summary


@contextlib.contextmanager
def _scratch(store: cache.Store, work: str) -> Iterator[Path]:
    """A folder on local disk for the run's spill files, deleted when the run ends. In the cache's
    work folder when the cache is a local folder (its disk has room for the cache, and a killed
    run's leftovers are deleted by the next run, not left in the system's temporary folder, which
    may be memory); a temporary folder when the cache is at a URI."""
    if not isinstance(store.fs, pafs.LocalFileSystem):
        with tempfile.TemporaryDirectory(prefix="sora-preprocess-") as folder:
            yield Path(folder)
        return
    folder = Path(store.path(f"{work}/{SCRATCH_DIR}"))
    shutil.rmtree(folder, ignore_errors=True)  # a killed run's
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _shard_path(version: str, shard: str) -> str:
    return f"{version}/{cache.BUCKETS_DIR}/{shard}.arrow"


def _remove_temp_files(store: cache.Store) -> None:
    """Half-written files of a run that failed (a full disk, a kill): never part of a cache."""
    for relative in store.files("", cache.TEMP_PATTERN):
        store.delete_file(relative)
        _log(f"removed {store.path(relative)}, left by a failed run")


def _remove_other_versions(store: cache.Store, keep: set[str]) -> None:
    """Versions other than `keep`: a finished one the manifest no longer names (a switch that
    stopped before its clean-up), or an unfinished build of another table or config."""
    for relative in store.folders():
        if relative.startswith(cache.VERSION_PREFIX) and relative not in keep:
            store.delete_dir(relative)
            _log(f"removed {store.path(relative)}: a version this cache no longer uses")
    for relative in store.folders(cache.WORK_DIR):
        if relative not in keep:
            store.delete_dir(f"{cache.WORK_DIR}/{relative}")


def _table_digest(table_path: Path, columns: Sequence[str], root: str | None, on_ray: bool) -> tuple[str, int]:
    """`_input_digest` of the table, its rows digested in this process or in Ray Data tasks (`on_ray`)."""
    columns = _digest_columns(columns)
    if not on_ray:
        return _input_digest((_row_hashes(frame, columns) for frame in iter_table(table_path)), columns, root)
    with contextlib.closing(map_table(table_path, _hash_batch, {"columns": columns})) as records:
        return _input_digest((record["hashes"] for record in records), columns, root)


def _digest_columns(columns: Sequence[str]) -> list[str]:
    """The columns the input digest covers: path, caption and the metadata columns the table has
    (`columns`: the columns it has of those)."""
    return ["path", "text", *(column for column in METADATA_COLUMNS if column in columns)]


def _row_hashes(frame: pd.DataFrame, columns: list[str]) -> bytes:
    """A digest of each row of a batch (`ROW_HASH_BYTES` each, in order) over `columns`. Stored
    numbers are written as floats: a batch of integers with a null comes as floats, one without
    as integers, and the digest must not depend on batches."""
    table = frame[columns].apply(lambda c: c.astype("float64") if c.dtype.kind in "iub" else c)
    values = table.astype(object).where(table.notna(), "").astype(str)
    return b"".join(
        hashlib.blake2b("\0".join(row).encode(), digest_size=ROW_HASH_BYTES).digest()
        for row in values.itertuples(index=False, name=None)
    )


def _hash_batch(batch: pa.Table, columns: list[str]) -> dict[str, list]:
    """In a Ray Data task: a raw batch's row digests."""
    return {"hashes": [_row_hashes(normalise(batch), columns)]}


def _input_digest(row_hashes: Iterable[bytes], columns: list[str], root: str | None) -> tuple[str, int]:
    """What of the input decides the cache's bytes: every row's path, caption and metadata columns
    (a corrected num_frames re-buckets its row), and `root`, which relative paths resolve against;
    and the table's rows. `row_hashes`: `_row_hashes` of the table's batches in order, however
    the table was cut into batches."""
    digest = hashlib.sha256(f"root={root}\ncolumns={','.join(columns)}\n".encode())
    rows = 0
    for hashes in row_hashes:
        digest.update(hashes)
        rows += len(hashes) // ROW_HASH_BYTES
    return digest.hexdigest()[:16], rows


def _connect_and_count_gpus(address: str | None) -> float:
    """Join the cluster (or start a local one); returns its GPU count."""
    import ray

    # Locally, logical CPUs only gate scheduling: give every stage a slot on a small machine.
    connect(address, local_cpus=max(8, os.cpu_count() or 1))
    return float(ray.cluster_resources().get("GPU", 0))


PROBE_RESULTS = [*SOURCE_SIZE, SRC_FPS, *REJECT_COLUMNS]
_TEXT = pa.large_string()
# The first columns of the plan, as the table's rows are read (a scratch file of the run).
READ_SCHEMA = pa.schema(
    [(cache.PATH, _TEXT), (cache.TEXT, _TEXT), (cache.ROW, pa.int64()), (FILE, _TEXT), (SOURCE, _TEXT),
     (cache.ID, _TEXT), *[(column, _TEXT) for column in REJECT_COLUMNS],
     *[(column, pa.int64()) for column in SOURCE_SIZE], (SRC_FPS, pa.float64())]
)  # fmt: skip
# probe.arrow: every input row with its probe metadata, bucket or drop reason, shard and keys.
PROBE_SCHEMA = pa.schema(
    [*[field for field in READ_SCHEMA if field.name != FILE], (PROBED, pa.bool_()), (BUCKET, pa.string()),
     (cache.RESOLUTION, pa.string()), (cache.ASPECT, pa.string()), (SHARD, pa.string()),
     (cache.NUM_FRAMES, pa.int64()), (cache.HEIGHT, pa.int64()), (cache.WIDTH, pa.int64()),
     (cache.LATENT_KEY, _TEXT), (cache.TEXT_KEY, _TEXT)]
)  # fmt: skip
ID_SCHEMA = pa.schema([(cache.ID, _TEXT), (cache.ROW, pa.int64())])
KEPT_SCHEMA = pa.schema([(cache.ID, _TEXT), (cache.ROW, pa.int64()), (BUCKET, pa.string())])
NUMBER_SCHEMA = pa.schema([(cache.ROW, pa.int64()), ("number", pa.int64())])
CAPTION_SCHEMA = pa.schema([(cache.TEXT_KEY, _TEXT), (cache.TEXT, _TEXT)])


def _to_frame(table: pa.Table) -> pd.DataFrame:
    """An Arrow table as the job's frames hold it: text as Python str or None (object columns)."""
    return pd.DataFrame(
        {
            name: pd.Series(column.to_pylist(), dtype=object)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            else column.to_pandas()
            for name, column in zip(table.column_names, table.columns, strict=True)
        }
    )


def _to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False).replace_schema_metadata(None)


def _earlier_probes(encodings: Encodings) -> pd.DataFrame:
    """Probe results of files earlier builds probed, by the file's identity (first build wins)."""
    frames = [probe.to_pandas() for probe in encodings.probes]
    found = [f[f[PROBED] & ~f[SOURCE].str.endswith("|missing")] for f in frames if PROBED in f.columns]
    if not found:
        return pd.DataFrame(columns=[SOURCE, *PROBE_RESULTS]).set_index(SOURCE)
    earlier = pd.concat(found)
    earlier = earlier[earlier[REJECT_STAGE].isna() | (earlier[REJECT_STAGE] == PROBE_STAGE)]
    return earlier.drop_duplicates(SOURCE).set_index(SOURCE)[PROBE_RESULTS]


def _plan(store: cache.Store, version: str, read_rows: Iterator[pd.DataFrame], rows_in: int, config: TrainConfig,
          address: str | None, encodings: Encodings, parts: dict[str, str], stats: Reuse,
          scratch: Path) -> None:  # fmt: skip
    """Write probe.arrow: every input row, in the input's order, with its probe metadata, bucket or
    drop reason, shard and encoding keys.

    The table is never held whole: it is read a batch at a time, and each batch is validated,
    probed where it lacks metadata, bucketed and keyed on its own. The two steps that need the
    whole table, which rows repeat an earlier one and the shard plan (per bucket, rows in id
    order), work on ids spilled to local disk (`pipelines/spill.py`). Memory: a few batches and
    a spill file, however many rows the table has. `read_rows`: the table's rows as
    `_read_table` reads them; `rows_in`: the table's rows, as the digest read them."""
    read, planned = scratch / "read.arrow", scratch / "planned.arrow"
    ids = Spill(scratch, "ids", ID_SCHEMA, cache.ID, partition_count(rows_in))
    rows = 0
    with new_stream(read, READ_SCHEMA) as sink, _progress("read", rows_in) as bar:
        for frame in read_rows:
            sink.write_table(_to_arrow(frame, READ_SCHEMA))
            ids.add(frame)
            rows += len(frame)
            bar.update(len(frame))
    if rows != rows_in:
        raise ConfigError(f"{config.data_path} changed while it was read ({rows_in} rows, then {rows}); run again")
    repeated = [np.empty(0, np.int64)]  # rows of a path and caption an earlier row has
    for part in ids.sorted([cache.ID, cache.ROW]):
        repeated.append(part.column(cache.ROW).to_numpy()[part.to_pandas()[cache.ID].duplicated().to_numpy()])
    repeated = np.sort(np.concatenate(repeated))

    earlier = _earlier_probes(encodings)
    kept = Spill(scratch, "kept", KEPT_SCHEMA, cache.ID, partition_count(rows))
    with open_stream(read) as source, new_stream(planned, PROBE_SCHEMA) as sink, _progress("plan", rows) as bar:
        for table in source:
            frame = _to_frame(pa.Table.from_batches([table]))
            repeats = np.isin(frame[cache.ROW].to_numpy(), repeated)
            _reject(frame, repeats, VALIDATE, "duplicate row (same path and caption)")
            _probe(frame, earlier, config, address, stats)
            _limit_pixels(frame, config.preprocess.max_pixels_per_frame)
            _assign(frame, config)
            _keys(frame, config, parts)
            sink.write_table(_to_arrow(frame, PROBE_SCHEMA))
            kept.add(frame[frame[BUCKET].notna()])
            bar.update(len(frame))
    read.unlink()

    numbers = _number_shards(kept, rows, config.preprocess.rows_per_shard, scratch)

    def with_shards() -> Iterator[pa.Table]:
        with open_stream(planned) as source:
            for table in source:
                table = pa.Table.from_batches([table])
                number = numbers(table.column(cache.ROW).to_numpy())
                bucket = table.column(BUCKET).to_pylist()
                shard = [None if n < 0 else f"{b}/part-{n:05d}" for b, n in zip(bucket, number.tolist(), strict=True)]
                yield table.set_column(table.schema.get_field_index(SHARD), SHARD, pa.array(shard, pa.string()))

    store.write_batches(f"{version}/{cache.PROBE}", PROBE_SCHEMA, with_shards())
    planned.unlink()


def _progress(what: str, rows: int):
    """A progress bar on stderr for tables of more than a batch (a small table's plan takes no time)."""
    return tqdm(total=rows, desc=what, unit="row", unit_scale=True, file=sys.stderr, disable=rows <= BATCH_ROWS)


def _read_table(store: cache.Store, version: str, table_path: Path, config: TrainConfig,
                on_ray: bool) -> Iterator[pd.DataFrame]:  # fmt: skip
    """The input's rows as the plan's first columns (`_read_rows`), in order, numbered from 0:
    read and validated in this process, or (`on_ray`) in Ray Data tasks where the cluster reads
    the table. Each task writes its batch's rows to a file of the cache's work folder and returns
    the file's name: the rows pass through neither Ray's object store nor, more than a batch at a
    time, this process, however far ahead of it the tasks run. So that a worker on another node
    can write there, that folder is where the cache is (shared storage or a URI): a task that
    does not find the folder this process made says so."""
    first = 0
    if not on_ray:
        for batch in iter_table(table_path):
            frame = _read_rows(batch, first, table_path, config)
            first += len(frame)
            yield frame
        return
    folder = f"{cache.WORK_DIR}/{version}/{READ_DIR}"
    store.delete_dir(folder)  # a killed run's
    store.write_bytes(f"{folder}/{READ_MARK}", b"")
    task_path = table_path.absolute()  # workers resolve relative file paths against it, and against root
    task_config = dataclasses.replace(config, root=str(Path(config.root).absolute())) if config.root else config
    location = store.location if "://" in store.location else store.root
    kwargs = {"location": location, "folder": folder, "table_path": task_path, "config": task_config}
    try:
        with contextlib.closing(map_table(table_path, _read_batch, kwargs)) as records:
            for record in records:
                try:
                    frame = _to_frame(store.read_table(record["part"]))
                except FileNotFoundError:
                    raise ConfigError(
                        f"a Ray task wrote {store.path(record['part'])} on a machine where this one cannot "
                        "read it: on a cluster the cache must be on shared storage (the same path on every "
                        "node) or at a URI; delete that folder on the other nodes"
                    ) from None
                store.delete_file(record["part"])
                frame[cache.ROW] += first
                first += len(frame)
                yield frame
    finally:
        store.delete_dir(folder)


def _read_batch(batch: pa.Table, location: str, folder: str, table_path: Path, config: TrainConfig) -> dict[str, list]:
    """In a Ray Data task: `_read_rows` of a raw batch (numbered from 0), written to a new file in
    the cache's `folder`; returns its name. The folder must be the one the command made, not one
    of this machine's own."""
    store = cache.Store(location)
    if not store.exists(f"{folder}/{READ_MARK}"):
        raise ConfigError(
            f"the cache {location} is not shared with the machine that runs the command (this task "
            f"runs on {socket.gethostname()}): on a cluster the cache must be on shared storage, at the same "
            "path on every node, or at a URI"
        )
    part = f"{folder}/{uuid.uuid4().hex}.arrow"
    frame = _read_rows(normalise(batch), 0, table_path, config)
    try:
        store.write_table(part, _to_arrow(frame, READ_SCHEMA))
    except OSError as error:  # a full disk, no permission
        raise ConfigError(f"cannot write {store.path(part)}: {error}") from None
    return {"part": [part]}


def _read_rows(batch: pd.DataFrame, first: int, table_path: Path, config: TrainConfig) -> pd.DataFrame:
    """A batch of the input table (rows `first`...) as the plan's first columns, with the rows no
    file can make usable rejected and the sizes the table gives (NaN where it gives none)."""
    frame = pd.DataFrame(
        {
            cache.PATH: pd.Series(batch["path"].astype(str).tolist(), dtype=object),
            cache.TEXT: pd.Series(batch["text"].fillna("").astype(str).tolist(), dtype=object),
        }
    )
    frame[cache.ROW] = np.arange(first, first + len(frame))  # the input row, for messages and for merging results back
    frame[FILE] = [str(p) for p in resolve_paths(frame[cache.PATH], table_path, config.root)]
    frame[SOURCE] = [source_identity(file) for file in frame[FILE]]
    frame[cache.ID] = [sample_id(p, t) for p, t in zip(frame[cache.PATH], frame[cache.TEXT], strict=True)]
    for column in REJECT_COLUMNS:
        frame[column] = pd.Series(None, index=frame.index, dtype=object)
    for mask, reason in row_problems(frame[cache.PATH], frame[cache.TEXT]):
        _reject(frame, mask.to_numpy(dtype=bool), VALIDATE, reason)
    metadata, _ = read_metadata(batch)
    for target, source in zip([*SOURCE_SIZE, SRC_FPS], METADATA_COLUMNS, strict=True):
        frame[target] = metadata[source].astype("float64").to_numpy()
    return frame


def _reject(frame: pd.DataFrame, mask: np.ndarray, stage: str, reason: str) -> None:
    """Reject the rows of `mask` that nothing rejected before (the first reason stands)."""
    fresh = mask & frame[REJECT_STAGE].isna().to_numpy()
    if fresh.any():
        frame.loc[fresh, list(REJECT_COLUMNS)] = [stage, reason, ""]


def _probe(frame: pd.DataFrame, earlier: pd.DataFrame, config: TrainConfig, address: str | None,
           stats: Reuse) -> None:  # fmt: skip
    """Sizes and fps of the batch's usable rows the table gives none for: an earlier build's probe
    of the same file, else a probe in Ray Data; a file that is not there is rejected here."""
    known = frame[SOURCE_SIZE].notna().all(axis=1)
    frame[SRC_FPS] = frame[SRC_FPS].fillna(0.0)
    unknown = ~known & frame[REJECT_STAGE].isna()
    frame[PROBED] = unknown.to_numpy()
    again = unknown & frame[SOURCE].isin(earlier.index)
    if again.any():
        frame[PROBE_RESULTS] = frame[PROBE_RESULTS].astype(object)
        frame.loc[again, PROBE_RESULTS] = earlier.loc[frame.loc[again, SOURCE], PROBE_RESULTS].to_numpy()
    to_probe = frame[unknown & ~again].assign(**dict.fromkeys(SOURCE_SIZE, 0), **{SRC_FPS: 0.0})
    stats.probed += len(to_probe)
    stats.probe_reused += int(again.sum())
    missing = to_probe[SOURCE].str.endswith("|missing")  # rejected here, without starting Ray for them
    results = [probe_batch(to_probe[missing])] if missing.any() else []
    if (~missing).any():
        _connect_and_count_gpus(address)
        import ray

        res = config.preprocess.probe
        ready = to_probe[~missing]
        chunks = [ready.iloc[i : i + res.batch_size] for i in range(0, len(ready), res.batch_size)]
        results.append(ray.data.from_pandas(chunks).map_batches(
            probe_batch, batch_format="pandas", batch_size=res.batch_size,
            compute=ray.data.TaskPoolStrategy(size=res.concurrency), num_cpus=res.num_cpus,
        ).to_pandas())  # fmt: skip
    if results:
        probed = pd.concat(results)
        frame[PROBE_RESULTS] = frame[PROBE_RESULTS].astype(object)
        where = frame.index[np.searchsorted(frame[cache.ROW].to_numpy(), probed[cache.ROW].to_numpy())]
        frame.loc[where, PROBE_RESULTS] = probed[PROBE_RESULTS].to_numpy()
    for column in REJECT_COLUMNS:  # one representation: str or None
        frame[column] = pd.Series([v if isinstance(v, str) and v else None for v in frame[column]], dtype=object)
    frame[SOURCE_SIZE] = frame[SOURCE_SIZE].fillna(0).astype("int64")
    frame[SRC_FPS] = frame[SRC_FPS].astype("float64")


def _keys(frame: pd.DataFrame, config: TrainConfig, parts: dict[str, str]) -> None:
    """The keys of the encodings of every row that has a bucket (None elsewhere)."""
    latent, text = [None] * len(frame), [None] * len(frame)
    columns = [SOURCE, *SOURCE_SIZE, cache.NUM_FRAMES, cache.HEIGHT, cache.WIDTH, cache.TEXT, BUCKET]
    for index, row in enumerate(frame[columns].itertuples(index=False, name=None)):
        source, frames, height, width, bucket_frames, bucket_height, bucket_width, caption, bucket = row
        if bucket is None:
            continue
        found, target = (frames, height, width), (bucket_frames, bucket_height, bucket_width)
        latent[index] = latent_key(source, found, target, config, parts)
        text[index] = text_key(caption, parts)
    frame[cache.LATENT_KEY] = pd.Series(latent, index=frame.index, dtype=object)
    frame[cache.TEXT_KEY] = pd.Series(text, index=frame.index, dtype=object)


def _limit_pixels(frame: pd.DataFrame, limit: int) -> None:
    """Rows whose frames are larger than `limit` pixels are rejected before anything decodes them
    (a few MB of video can hold 8000x8000 frames: gigabytes once decoded)."""
    pixels = frame[SRC_HEIGHT].to_numpy(dtype=np.int64) * frame[SRC_WIDTH].to_numpy(dtype=np.int64)
    large = (pixels > limit) & frame[REJECT_STAGE].isna().to_numpy()
    for row in np.flatnonzero(large):
        size = f"{frame[SRC_HEIGHT].iat[row]}x{frame[SRC_WIDTH].iat[row]}"
        detail = f"{size} = {pixels[row]} pixels per frame; the limit is {limit} (preprocess.max_pixels_per_frame)"
        frame.loc[frame.index[row], list(REJECT_COLUMNS)] = [VALIDATE, "too large", detail]  # not reused: limits change


def _assign(frame: pd.DataFrame, config: TrainConfig) -> None:
    """Bucket every usable row of a batch (a row's bucket depends on that row alone); rows no
    bucket takes are rejected at the bucketing stage with the reason. Whole columns at a time."""
    count = len(frame)
    ok = np.flatnonzero(frame[REJECT_STAGE].isna().to_numpy())
    assignments = assign_buckets(
        config.buckets,
        frame[SRC_NUM_FRAMES].to_numpy()[ok],
        frame[SRC_HEIGHT].to_numpy()[ok],
        frame[SRC_WIDTH].to_numpy()[ok],
        sample_keys(frame[cache.ID].iloc[ok]),
        config.seed,
    )
    kept = assignments.reason == Drop.KEPT
    codes, which = np.unique(assignments.codes()[kept], return_inverse=True)  # each distinct bucket once
    buckets = [bucket_of_code(config.buckets, int(code)) for code in codes]
    rows = ok[kept]
    fields = {
        BUCKET: ("name", None),
        cache.RESOLUTION: ("resolution", None),
        cache.ASPECT: ("aspect", None),
        SHARD: (None, None),  # numbered once every row is bucketed (`_number_shards`)
        cache.NUM_FRAMES: ("num_frames", 0),
        cache.HEIGHT: ("height", 0),
        cache.WIDTH: ("width", 0),
    }
    for column, (attribute, missing) in fields.items():
        values = np.full(count, missing, dtype=object if missing is None else np.int64)
        if attribute is not None:
            values[rows] = np.array([getattr(bucket, attribute) for bucket in buckets], dtype=values.dtype)[which]
        frame[column] = pd.Series(values, index=frame.index, dtype=values.dtype)  # object: None stays None
    dropped = ok[~kept]
    if len(dropped):
        reasons = np.array([Drop(value).description for value in range(len(Drop))], dtype=object)
        frame.loc[frame.index[dropped], list(REJECT_COLUMNS)] = np.column_stack(
            [np.full(len(dropped), BUCKETING, dtype=object), reasons[assignments.reason[~kept]],
             np.full(len(dropped), "", dtype=object)]
        )  # fmt: skip


def _number_shards(kept: Spill, rows: int, rows_per_shard: int, scratch: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The shard plan: per bucket, rows in id order, `rows_per_shard` to a shard. `kept`: id, row
    and bucket of every bucketed row, read back in id order a spill file at a time. Returns the
    look-up of rows' shard numbers in their bucket (-1: no shard), asked in increasing row order;
    the numbers wait on disk, by row range."""
    count = partition_count(rows)
    span = max(1, -(-rows // count))  # rows per file of numbers
    numbers = Spill(
        scratch, "numbers", NUMBER_SCHEMA, cache.ROW, count, where=lambda f: f[cache.ROW].to_numpy() // span
    )
    seen: dict[str, int] = {}  # rows of each bucket numbered so far
    for part in kept.sorted([cache.ID]):
        part = part.to_pandas()
        before = part[BUCKET].map(seen).fillna(0).to_numpy(dtype=np.int64)
        position = before + part.groupby(BUCKET, sort=False).cumcount().to_numpy()
        numbers.add(pd.DataFrame({cache.ROW: part[cache.ROW], "number": position // rows_per_shard}))
        for bucket, found in part[BUCKET].value_counts().items():
            seen[bucket] = seen.get(bucket, 0) + int(found)
    loaded = {"file": -1, "values": np.empty(0, np.int64)}

    def lookup(asked: np.ndarray) -> np.ndarray:
        out = np.full(len(asked), -1, dtype=np.int64)
        for index in np.unique(asked // span):
            if index != loaded["file"]:  # the next range of rows: its file read once, then deleted
                values = np.full(span, -1, dtype=np.int64)
                table = numbers.read(int(index))
                if table is not None:
                    values[table.column(cache.ROW).to_numpy() - index * span] = table.column("number").to_numpy()
                loaded.update(file=index, values=values)
            inside = asked // span == index
            out[inside] = loaded["values"][asked[inside] - index * span]
        return out

    return lookup


def _probe_frames(store: cache.Store, version: str) -> Iterator[pd.DataFrame]:
    """probe.arrow a batch at a time."""
    for batch in store.iter_batches(f"{version}/{cache.PROBE}"):
        yield _to_frame(pa.Table.from_batches([batch]))


def _planned_shards(store: cache.Store, version: str, scratch: Path) -> Iterator[tuple[str, pd.DataFrame]]:
    """Every shard of the plan with its rows in id order, a shard at a time, from probe.arrow.
    Memory: a spill file and one unfinished shard per bucket."""
    rows = store.count_rows(f"{version}/{cache.PROBE}")
    spill = Spill(scratch, "shards", PROBE_SCHEMA, cache.ID, partition_count(rows))
    for frame in _probe_frames(store, version):
        spill.add(frame[frame[SHARD].notna()])
    filling: dict[str, tuple[str, list[pd.DataFrame]]] = {}  # bucket -> its shard being gathered, and its rows
    for part in spill.sorted([cache.ID]):
        part = _to_frame(part)
        for (bucket, shard), group in part.groupby([BUCKET, SHARD], sort=False):
            if bucket in filling and filling[bucket][0] != shard:  # rows come in id order: that shard is whole
                yield filling[bucket][0], pd.concat(filling.pop(bucket)[1], ignore_index=True)
            filling.setdefault(bucket, (shard, []))[1].append(group)
    for shard, groups in filling.values():
        yield shard, pd.concat(groups, ignore_index=True)


TEXT_PART_ROWS = 256  # captions per file of the work folder's caption embeddings


def _encode(shards: Callable[[], Iterator[tuple[str, pd.DataFrame]]], store: cache.Store, version: str,
            config: TrainConfig, address: str | None, encodings: Encodings, stats: Reuse,
            scratch: Path) -> dict[str, float]:  # fmt: skip
    """Encode what no earlier build has (distinct captions in a thread beside the VAE pipeline)
    and write the pending shards, each as soon as all its rows are there.

    `shards()` reads the plan a shard at a time; it is read twice: first to count what needs a
    model (the captions to encode are spilled to disk, to be made distinct), then to hand the
    pending shards to Ray, whose object store holds them while they wait, not this process."""
    work = f"{cache.WORK_DIR}/{version}"
    for part in store.files(f"{work}/{TEXTS_DIR}", "part-*.arrow"):  # a resumed build's captions
        encodings.add_text_part(store, part)
    finished = {
        path.removeprefix(f"{version}/{cache.BUCKETS_DIR}/").removesuffix(".arrow")
        for path in store.files(f"{version}/{cache.BUCKETS_DIR}", "part-*.arrow")
    }
    captions = Spill(scratch, "captions", CAPTION_SCHEMA, cache.TEXT_KEY,
                     partition_count(store.count_rows(f"{version}/{cache.PROBE}")))  # fmt: skip
    expected, pending_rows = _pending(shards, finished, encodings, captions)
    to_decode = sum(expected.values())
    stats.vae_encoded, stats.vae_reused = to_decode, pending_rows - to_decode
    stats.text_reused = pending_rows
    timing = {"encoded_rows": to_decode, "encode_wall_seconds": 0.0, "vae_window_seconds": 0.0,
              "vae_seconds": 0.0, "text_seconds": 0.0}  # fmt: skip
    if not captions.rows and not to_decode:  # every encoding from earlier builds: no model, no Ray
        for shard, rows in shards():
            if shard not in finished:
                _write_shard(store, version, shard, _complete(rows, None, encodings, stats), config.frame_interval)
        return timing

    cluster_gpus = _connect_and_count_gpus(address)
    import ray

    _check_resources(config, ray.cluster_resources())
    started = time.perf_counter()
    parts = _caption_parts(captions, store, work)
    stats.text_encoded = sum(count for _, _, count in parts)
    stats.text_reused = pending_rows - stats.text_encoded
    # T5 runs beside the VAE (their actors together fit the cluster: _check_resources); a shard
    # is written once the captions are done, which is long before the VAE is.
    captioning = _Background(_encode_captions, parts, store, work, config, cluster_gpus, encodings)
    if parts:
        captioning.start()
    held: dict[str, Any] = {}  # pending shard -> its rows, in Ray's object store
    to_vae = {}  # one block per shard: blocks stream through the stages and shards complete in turn
    for shard, rows in shards():
        if shard in finished:
            continue
        held[shard] = ray.put(rows)
        if shard in expected:
            decode = rows[[key not in encodings.latents for key in rows[cache.LATENT_KEY]]]
            decode = decode.assign(**{FILE: [str(p) for p in resolve_paths(decode[cache.PATH], Path(config.data_path),
                                                                            config.root)]})  # fmt: skip
            to_vae[shard] = ray.put(decode)

    def write(shard: str, encoded: pd.DataFrame | None) -> None:
        timing["text_seconds"] = captioning.result(default=0.0)
        rows = ray.get(held.pop(shard))
        _write_shard(store, version, shard, _complete(rows, encoded, encodings, stats), config.frame_interval)

    spans, nodes = _encode_latents([to_vae[shard] for shard in sorted(to_vae)], expected, config, cluster_gpus, write)
    for shard in list(held):  # shards whose latents are all reused
        write(shard, None)
    timing["text_seconds"] = captioning.result(default=0.0)
    timing["encode_wall_seconds"] = time.perf_counter() - started
    timing["vae_seconds"] = sum(span[1] - span[0] for span in spans)
    # Steady state: from the VAE's first call to its last, how much of the time it was computing.
    timing["vae_window_seconds"] = max(span[1] for span in spans) - min(span[0] for span in spans) if spans else 0.0
    frames = sum(span[2] for span in spans)
    rate = f" ({frames / timing['vae_seconds']:.1f} frames/s)" if timing["vae_seconds"] > 0 else ""
    _log(f"encoded {to_decode} rows in {timing['encode_wall_seconds']:.1f} s; model time: VAE "
         f"{timing['vae_seconds']:.1f} s{rate}, T5 {timing['text_seconds']:.1f} s")  # fmt: skip
    if nodes:
        placed = ", ".join(f"{node[:12]} {count}" for node, count in sorted(nodes.items()))
        _log(f"VAE rows per node ({len(nodes)} node(s)): {placed}")
    return timing


def _pending(shards: Callable[[], Iterator[tuple[str, pd.DataFrame]]], finished: set[str], encodings: Encodings,
             captions: Spill) -> tuple[dict[str, int], int]:  # fmt: skip
    """A first pass over the plan: the rows each pending shard sends through the VAE (shards with
    none left out) and the pending rows; the captions no earlier build encoded go to `captions`."""
    expected: dict[str, int] = {}
    planned, planned_rows, done, pending_rows = 0, 0, 0, 0
    for shard, rows in shards():
        planned, planned_rows = planned + 1, planned_rows + len(rows)
        if shard in finished:
            done += 1
            continue
        pending_rows += len(rows)
        decode = sum(key not in encodings.latents for key in rows[cache.LATENT_KEY])
        if decode:
            expected[shard] = decode
        captions.add(rows[[key not in encodings.texts for key in rows[cache.TEXT_KEY]]])
    _log(f"{planned_rows} rows to encode in {planned} shards; {done} shards already done")
    return expected, pending_rows


def _encode_latents(to_vae: list, expected: dict[str, int], config: TrainConfig, cluster_gpus: float,
                    write: Callable[[str, pd.DataFrame], None]) -> tuple[set[tuple], Counter[str]]:  # fmt: skip
    """The VAE pipeline over `to_vae` (a block of rows per shard, in Ray's object store, a bucket's
    shards together); each
    shard is handed to `write` as soon as its `expected` rows are encoded. Returns the (start,
    end, frames) of each VAE call and the rows encoded per Ray node."""
    import ray

    spans: set[tuple] = set()
    nodes: Counter[str] = Counter()
    if not to_vae:
        return spans, nodes
    buffers: dict[str, list[pd.DataFrame]] = defaultdict(list)
    counts: Counter[str] = Counter()
    rows = encode_pipeline(ray.data.from_pandas_refs(to_vae), config, cluster_gpus)
    for arrived in rows.iter_batches(batch_format="pandas", batch_size=None):
        # Rebuilt column by column: blocks of mixed column types must not reach groupby.
        batch = Rejects(arrived).into(pd.DataFrame({c: arrived[c].tolist() for c in arrived.columns}))
        spans.update(map(tuple, batch["vae_span"]))
        nodes.update(batch["vae_node"])
        for shard, part in batch.groupby(SHARD):
            buffers[shard].append(part)
            counts[shard] += len(part)
            if counts[shard] == expected[shard]:
                write(shard, pd.concat(buffers.pop(shard)))
    return spans, nodes


def _caption_parts(captions: Spill, store: cache.Store, work: str) -> list[tuple[str, Any, int]]:
    """The distinct captions to encode, in key order, cut into parts of TEXT_PART_ROWS (numbered
    after the parts a resumed build has): (part name, its rows in Ray's object store, rows)."""
    import ray

    first = len(store.files(f"{work}/{TEXTS_DIR}", "part-*.arrow"))
    parts: list[tuple[str, Any, int]] = []

    def cut(rows: pd.DataFrame) -> None:
        name = f"part-{first + len(parts):05d}"
        parts.append((name, ray.put(rows.assign(part=name).reset_index(drop=True)), len(rows)))

    waiting = pd.DataFrame(columns=list(CAPTION_SCHEMA.names))
    for table in captions.sorted([cache.TEXT_KEY]):  # a caption and its copies share a spill file
        waiting = pd.concat([waiting, _to_frame(table).drop_duplicates(cache.TEXT_KEY)], ignore_index=True)
        while len(waiting) >= TEXT_PART_ROWS:
            cut(waiting.iloc[:TEXT_PART_ROWS])
            waiting = waiting.iloc[TEXT_PART_ROWS:]
    if len(waiting):
        cut(waiting)
    return parts


class _Background(threading.Thread):
    """A call run in a thread; `result` waits for it and raises what it raised."""

    def __init__(self, function, *args) -> None:
        super().__init__(daemon=True)
        self.function, self.args = function, args
        self.value, self.error = None, None

    def run(self) -> None:
        try:
            self.value = self.function(*self.args)
        except BaseException as error:  # handed to the caller of result()
            self.error = error

    def result(self, default=None):
        if self.ident is None:  # never started
            return default
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def _encode_captions(parts: list[tuple[str, Any, int]], store: cache.Store, work: str, config: TrainConfig,
                     cluster_gpus: float, encodings: Encodings) -> float:  # fmt: skip
    """T5 over distinct captions (`_caption_parts`), written to the work folder in parts (each
    atomic, so a killed run keeps what it finished); returns the model's time."""
    import ray

    expected = {name: count for name, _, count in parts}
    dataset = ray.data.from_pandas_refs([rows for _, rows, _ in parts])
    buffers: dict[str, list[pd.DataFrame]] = defaultdict(list)
    spans: set[tuple] = set()
    for arrived in text_pipeline(dataset, config, cluster_gpus).iter_batches(batch_format="pandas", batch_size=None):
        batch = pd.DataFrame({c: arrived[c].tolist() for c in arrived.columns})
        spans.update(map(tuple, batch["text_span"]))
        for part, rows in batch.groupby("part"):
            buffers[part].append(rows)
            if sum(len(b) for b in buffers[part]) == expected[part]:
                done = pd.concat(buffers.pop(part)).sort_values(cache.TEXT_KEY)
                relative = f"{work}/{TEXTS_DIR}/{part}.arrow"
                store.write_table(relative, pa.Table.from_pandas(
                    done[list(TEXT_PART_SCHEMA.names)], schema=TEXT_PART_SCHEMA, preserve_index=False))  # fmt: skip
                encodings.add_text_part(store, relative)
    return sum(span[1] - span[0] for span in spans)


def _complete(rows: pd.DataFrame, encoded: pd.DataFrame | None, encodings: Encodings, stats: Reuse) -> pd.DataFrame:
    """A shard's rows with their encodings: latents from this run's VAE (`encoded`, with its
    rejects) or an earlier build, captions from this run's T5 or an earlier build."""
    out = rows.copy()
    values: dict[str, list] = {c: [] for c in (*LATENT_COLUMNS, *TEXT_COLUMNS, *REJECT_COLUMNS)}
    fresh = {} if encoded is None else {row[cache.ROW]: row for row in encoded.to_dict("records")}
    for row in rows.to_dict("records"):
        source = fresh.get(row[cache.ROW])
        if source is None:
            source = {**row, **encodings.latent(row[cache.LATENT_KEY])}
            stats.bytes_reused += len(source[cache.LATENT_MEAN]) + len(source[cache.LATENT_LOGVAR])
        reject = [source[c] if isinstance(source[c], str) and source[c] else None for c in REJECT_COLUMNS]  # NaN: None
        text = dict.fromkeys(TEXT_COLUMNS, None) | {cache.TEXT_EMB: b"", cache.TEXT_SHAPE: [], cache.NUM_TOKENS: 0}
        if reject[0] is None:
            text = encodings.text(row[cache.TEXT_KEY])
            if isinstance(encodings.texts[row[cache.TEXT_KEY]][0], cache.Cache):  # from an earlier build
                stats.bytes_reused += len(text[cache.TEXT_EMB])
            if text["reason"]:
                reject = [ENCODE, text["reason"], text["detail"] or ""]
        for column in LATENT_COLUMNS:
            values[column].append(source[column])
        for column in TEXT_COLUMNS:
            values[column].append(text[column])
        for column, value in zip(REJECT_COLUMNS, reject, strict=True):
            values[column].append(value)
    for column, column_values in values.items():
        out[column] = pd.Series(column_values, index=out.index, dtype=object)
    return out


def _check_resources(config: TrainConfig, cluster: dict[str, float]) -> None:
    """The model actors hold their CPUs for the whole run: without room for one decode task as
    well, the pipeline would wait forever. Say so before starting."""
    res = config.preprocess
    needed = res.vae.concurrency * res.vae.num_cpus + res.text.concurrency * res.text.num_cpus + res.decode.num_cpus
    available = cluster.get("CPU", 0.0)
    if needed > available:
        raise ConfigError(
            f"the Ray cluster has {available:g} CPUs but the preprocess stages need {needed:g} "
            "(vae and text actors plus one decode task); lower `num_cpus` or `concurrency` in the "
            "config's preprocess = dict(...) section"
        )


def _write_shard(store: cache.Store, version: str, shard: str, rows: pd.DataFrame, frame_interval: int) -> None:
    """Rejects of the shard first (in the work folder), then its checksum, then the shard
    itself: each atomic, the shard last (a shard that exists is done)."""
    work = f"{cache.WORK_DIR}/{version}"
    rows = rows.sort_values(cache.ID)
    store.write_table(f"{work}/rejects/{shard.replace('/', '__')}.arrow", cache.rejects_table(rows))
    kept = rows[rows[REJECT_STAGE].isna()]
    kept = kept.assign(**{cache.FPS: kept[SRC_FPS] / frame_interval})
    table = pa.Table.from_pandas(
        kept[list(cache.SAMPLE_SCHEMA.names)], schema=cache.SAMPLE_SCHEMA, preserve_index=False
    )
    data = cache.table_bytes(table)
    store.write_json(_checksum_file(work, shard), cache.shard_record(data, table.num_rows))
    store.write_bytes(_shard_path(version, shard), data)


def _finish(store: cache.Store, version: str, parts: dict[str, str]) -> Summary:
    """rejects.arrow from probe.arrow and the shards' rejects, then the manifest, last: the
    switch to this version. Then the previous version and the work folder go."""
    work = f"{cache.WORK_DIR}/{version}"
    # Rows that failed decoding or encoding (few), merged into probe.arrow's rejects by row range.
    late = [store.read_table(path).replace_schema_metadata(None) for path in store.files(f"{work}/rejects", "*.arrow")]
    late = pa.concat_tables(late or [cache.REJECT_SCHEMA.empty_table()]).sort_by(cache.ROW)
    late_rows = late.column(cache.ROW).to_numpy()
    reasons: Counter[tuple[str, str]] = Counter()
    rows_in = 0

    def rejects() -> Iterator[pa.Table]:  # in the input's order, a batch of probe.arrow at a time
        nonlocal rows_in
        for frame in _probe_frames(store, version):
            first, rows_in = rows_in, rows_in + len(frame)
            start, end = np.searchsorted(late_rows, [first, rows_in])
            early = cache.rejects_table(frame).replace_schema_metadata(None)  # rows that never reached a shard
            table = pa.concat_tables([early, late.slice(start, end - start)]).sort_by(cache.ROW)
            stages, why = table.column(cache.STAGE).to_pylist(), table.column(cache.REASON).to_pylist()
            reasons.update(zip(stages, why, strict=True))
            yield table

    store.write_batches(f"{version}/{cache.REJECTS}", cache.REJECT_SCHEMA, rejects())

    kept: Counter[str] = Counter()
    shards = {}
    for shard in store.files(f"{version}/{cache.BUCKETS_DIR}", "part-*.arrow"):
        name = shard.removeprefix(f"{version}/{cache.BUCKETS_DIR}/").removesuffix(".arrow")  # <bucket>/part-NNNNN
        shards[shard] = store.read_json(_checksum_file(work, name))  # written just before the shard
        kept[shard.split("/")[-2]] += shards[shard]["rows"]
    dropped = Counter({why: count for (stage, why), count in reasons.items() if stage == BUCKETING})
    rejected = Counter({f"{stage}: {why}": count for (stage, why), count in reasons.items() if stage != BUCKETING})
    manifest = {
        "format_version": cache.FORMAT_VERSION,
        "version": version,
        "fingerprint": parts,
        "buckets": {name: count for name, count in sorted(kept.items()) if count},
        "rows_in": rows_in,
        "kept": sum(kept.values()),
        "rejected": sum(rejected.values()),
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dict(sorted(dropped.items())),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "shards": shards,
    }
    if manifest["rows_in"] != manifest["kept"] + manifest["rejected"] + manifest["dropped"]:
        raise RuntimeError(f"row accounting is off: {manifest}")  # a bug, never a user error
    store.write_json(cache.MANIFEST, manifest)  # the switch
    _remove_other_versions(store, keep={version})
    store.delete_dir(cache.WORK_DIR)
    return _summary_from_manifest(manifest)


def _estimate_savings(store: cache.Store, stats: Reuse, timing: dict[str, float]) -> None:
    """Model time per row from this run where it encoded, else from the last build's record
    (build.json); this run's rates are recorded for the next one."""
    rates = store.read_json(cache.BUILD_LOG) if store.exists(cache.BUILD_LOG) else {}
    if stats.vae_encoded and timing.get("vae_seconds"):
        rates["vae_seconds_per_row"] = timing["vae_seconds"] / stats.vae_encoded
    if stats.text_encoded and timing.get("text_seconds"):
        rates["text_seconds_per_caption"] = timing["text_seconds"] / stats.text_encoded
    if rates:
        store.write_json(cache.BUILD_LOG, rates)
    vae, text = rates.get("vae_seconds_per_row"), rates.get("text_seconds_per_caption")
    if (stats.vae_reused and vae is None) or (stats.text_reused and text is None):
        return
    stats.seconds_saved = stats.vae_reused * (vae or 0.0) + stats.text_reused * (text or 0.0)


def _checksum_file(work: str, shard: str) -> str:
    """Where the checksum of shard `<bucket>/part-NNNNN` waits for the manifest."""
    return f"{work}/{cache.CHECKSUMS_DIR}/{shard.replace('/', '__')}.json"


def _summary_from_manifest(manifest: dict[str, Any], up_to_date: bool = False) -> Summary:
    return Summary(
        rows_in=manifest["rows_in"],
        kept=dict(manifest["buckets"]),
        dropped=dict(manifest["dropped_by_reason"]),
        rejected=dict(manifest["rejected_by_reason"]),
        up_to_date=up_to_date,
    )
