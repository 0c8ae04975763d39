"""Reusing encodings across builds of a cache: what decides an encoding's bytes (its key), and
where an earlier build left an encoding of that key.

Keys (sha256 digests, stored per row in probe.arrow and in the shards):

- latent: the source file's identity (its resolved path, size and modification time: a file
  edited in place gets a new key without being read; a file's content is not hashed, which
  would read every video on every run), what the probe found (frames, height, width), the
  decode geometry (the bucket's height, width and T, frame_interval, cache_frames_factor) and
  the VAE (identity, subfolder, frames per call), with the stored dtype.
- text: the caption, the T5 identity, model_max_length and the stored dtype.

An encoding is taken from a finished cache (the current version of the folder being built, or
`--reuse OTHER`) through its probe and rejects tables, which say in which shard a key's row is,
and read from that shard, whose bytes `Cache.read_shard` checks against its manifest; or from
the caption embeddings the build in progress has written to its work folder.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import cache
from pipelines.cache import (
    LATENT_DTYPE,
    LATENT_KEY,
    LATENT_LOGVAR,
    LATENT_MEAN,
    LATENT_SHAPE,
    NUM_TOKENS,
    TEXT_DTYPE,
    TEXT_EMB,
    TEXT_KEY,
    TEXT_SHAPE,
)
from pipelines.config import TrainConfig

LATENT_COLUMNS = (LATENT_MEAN, LATENT_LOGVAR, LATENT_SHAPE, LATENT_DTYPE)
TEXT_COLUMNS = (TEXT_EMB, TEXT_SHAPE, TEXT_DTYPE, NUM_TOKENS)
SOURCE = "source"  # probe.arrow: the file's identity (resolved path, size, mtime)
PROBED = "probed"  # probe.arrow: whether the metadata came from probing the file (not from the table)

# The caption embeddings a build encodes, before they are in shards: <work>/texts/part-*.arrow.
TEXTS_DIR = "texts"
TEXT_PART_SCHEMA = pa.schema(
    [(TEXT_KEY, pa.string()), (TEXT_EMB, pa.large_binary()), (TEXT_SHAPE, pa.list_(pa.int32())),
     (TEXT_DTYPE, pa.string()), (NUM_TOKENS, pa.int32()), ("reason", pa.string()), ("detail", pa.string())]
)  # fmt: skip


def source_identity(file: str | Path) -> str:
    """The file as it is now: its real path (links resolved), size and modification time ("missing" when
    it is not there)."""
    try:
        stat = os.stat(file)
    except OSError:
        return f"{os.path.realpath(file)}|missing"
    return f"{os.path.realpath(file)}|{stat.st_size}|{stat.st_mtime_ns}"


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:32]


def latent_key(source: str, found: tuple[int, int, int], bucket: tuple[int, int, int], config: TrainConfig,
               fingerprint: dict[str, str]) -> str:  # fmt: skip
    """found: (frames, height, width) of the file; bucket: (T, height, width) it is decoded to."""
    vae = (fingerprint["vae"], config.vae.micro_batch_size)
    return _digest("latent", source, found, bucket, config.frame_interval, config.cache_frames_factor, vae,
                   config.dtype)  # fmt: skip


def text_key(text: str, fingerprint: dict[str, str]) -> str:
    return _digest("text", text, fingerprint["text_encoder"], fingerprint["model_max_length"], fingerprint["dtype"])


class Encodings:
    """Encodings of finished caches and of the build in progress, found by key."""

    def __init__(self, tables_kept: int = 4) -> None:
        self.latents: dict[str, tuple[cache.Cache, str]] = {}  # key -> (cache, shard)
        self.texts: dict[str, tuple[Any, str]] = {}  # key -> (cache or store, shard or text part)
        self.probes: list[pa.Table] = []  # rows of the finished caches that were probed, for their results
        self._tables: OrderedDict[tuple[str, str], dict[str, dict[str, dict[str, Any]]]] = OrderedDict()
        self._kept = tables_kept

    def add_cache(self, found: cache.Cache) -> None:
        """Every kept row of a finished cache (format 4), by its latent and text keys, and the rows
        whose metadata it probed (for their probe results). Its files are read a batch at a time:
        what stays is the keys, not the cache's table."""
        failed = set()  # rows planned into a shard that failed decoding or encoding
        for batch in found.store.iter_batches(f"{found.version}/{cache.REJECTS}"):
            late = pc.is_in(batch.column(cache.STAGE), pa.array([cache.DECODE, cache.ENCODE]))
            failed.update(batch.filter(late).column(cache.ID).to_pylist())
        for batch in found.store.iter_batches(f"{found.version}/{cache.PROBE}"):
            if PROBED in batch.schema.names:
                self.probes.append(pa.Table.from_batches([batch.filter(batch.column(PROBED))]))
            columns = [batch.column(name).to_pylist() for name in (cache.ID, cache.SHARD, LATENT_KEY, TEXT_KEY)]
            for sample, shard, latent, text in zip(*columns, strict=True):
                if shard is None or sample in failed:
                    continue
                shard = f"{found.version}/{cache.BUCKETS_DIR}/{shard}.arrow"
                self.latents.setdefault(latent, (found, shard))
                self.texts.setdefault(text, (found, shard))

    def add_text_part(self, store: cache.Store, part: str) -> None:
        """Caption embeddings the build in progress encoded (failures included: they are not encoded again)."""
        for key in store.read_table(part).column(TEXT_KEY).to_pylist():
            self.texts[key] = (store, part)

    def _rows(self, where: Any, name: str, key_column: str) -> dict[str, dict[str, Any]]:
        """The rows of a shard or text part by key; each file is read once for both its keys, a
        few files kept in memory."""
        location = where.store.location if isinstance(where, cache.Cache) else where.location
        slot = (location, name)
        if slot not in self._tables:
            table = where.read_shard(name) if isinstance(where, cache.Cache) else where.read_table(name)
            rows = table.to_pylist()
            self._tables[slot] = {column: {row[column]: row for row in rows}
                                  for column in (LATENT_KEY, TEXT_KEY) if column in table.column_names}  # fmt: skip
            while len(self._tables) > self._kept:
                self._tables.popitem(last=False)
        self._tables.move_to_end(slot)
        return self._tables[slot][key_column]

    def latent(self, key: str) -> dict[str, Any]:
        """The latent columns of `key` (KeyError when no build has it)."""
        found, shard = self.latents[key]
        row = self._rows(found, shard, LATENT_KEY)[key]
        return {column: row[column] for column in LATENT_COLUMNS}

    def text(self, key: str) -> dict[str, Any]:
        """The caption columns of `key`; a caption T5 failed on has an empty embedding and a "reason"."""
        where, name = self.texts[key]
        row = self._rows(where, name, TEXT_KEY)[key]
        out = {column: row[column] for column in TEXT_COLUMNS}
        out["reason"], out["detail"] = row.get("reason"), row.get("detail")
        return out
