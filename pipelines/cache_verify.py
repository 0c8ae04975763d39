"""`sora cache verify DIR`: check a finished cache from its manifest down to every tensor.

What is checked, in order, each a line of the report:

    manifest        present, of this format version, its row accounting adds up
    shards          every shard the manifest lists exists with its size and sha256, and no
                    shard file is there that it does not list
    samples         every row of every intact shard decodes to its recorded shapes, finite,
                    in the bucket of its folder; rows per bucket as the manifest counts them
    probe, rejects  readable, as many rows as the manifest counts
    temp files      half-written files of a failed run: listed, not a fault (readers never see
                    them; the next `sora preprocess` with this folder removes them)

A problem names the file (and the row's id). `verify` never changes the cache.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from tqdm import tqdm

from pipelines import cache


@dataclass
class Check:
    name: str
    detail: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth saying, not a fault of the cache

    def line(self) -> str:
        if not self.problems:
            return "\n".join([f"  {self.name:<15} ok    {self.detail}"] + [f"      {n}" for n in self.notes])
        shown = self.problems[:10] + ([f"... and {len(self.problems) - 10} more"] if len(self.problems) > 10 else [])
        return "\n".join([f"  {self.name:<15} FAIL  {self.detail}"] + [f"      {p}" for p in shown])


@dataclass
class Verification:
    location: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return not any(check.problems for check in self.checks)

    def format(self) -> str:
        verdict = "the cache is intact"
        if not self.ok:
            verdict = "PROBLEMS FOUND: rebuild with `sora preprocess` into a new --cache-dir"
        return "\n".join([f"cache verify: {self.location}", *(c.line() for c in self.checks), verdict]) + "\n"


def verify(location: str, progress: bool = True) -> Verification:
    """Check the cache at `location`; raises CacheError only when it is not a finished cache at all."""
    found = cache.Cache(location)  # no manifest, another format version: not a cache to verify
    manifest, store = found.manifest, found.store
    checks = [_manifest(manifest)]
    intact, shards = _shards(store, manifest, progress)
    checks += [shards, _samples(manifest, intact, progress), _tables(store, manifest), _temp_files(store)]
    return Verification(store.location, checks)


def _manifest(manifest: dict) -> Check:
    check = Check("manifest")
    kept = sum(manifest["buckets"].values())
    check.detail = (
        f"format {manifest['format_version']}, {len(manifest['shards'])} shards, "
        f"{kept} rows kept in {len(manifest['buckets'])} buckets"
    )
    if manifest["rows_in"] != manifest["kept"] + manifest["rejected"] + manifest["dropped"] or kept != manifest["kept"]:
        check.problems.append("rows in != kept + rejected + dropped, or the buckets' counts do not add up to kept")
    return check


def _shards(store: cache.Store, manifest: dict, progress: bool) -> tuple[dict[str, bytes], Check]:
    """(bytes of every shard that matches its record, the check)."""
    check, intact, read = Check("shards"), {}, 0
    listed = manifest["shards"]
    for name in store.files(f"{manifest['version']}/{cache.BUCKETS_DIR}", "part-*.arrow"):
        if name not in listed:
            check.problems.append(f"{name}: a shard file the manifest does not list")
    for name, record in tqdm(sorted(listed.items()), desc="shards", unit="shard", disable=not progress):
        if not store.exists(name):
            check.problems.append(f"{name}: missing")
            continue
        data = store.read_bytes(name)
        read += len(data)
        if len(data) != record["bytes"]:
            check.problems.append(f"{name}: {len(data)} bytes, the manifest says {record['bytes']}")
        elif hashlib.sha256(data).hexdigest() != record["sha256"]:
            check.problems.append(f"{name}: its bytes changed (sha256 differs from the manifest's)")
        else:
            intact[name] = data
    check.detail = f"{len(intact)} of {len(listed)} match their size and sha256 ({read / 2**20:.1f} MiB read)"
    return intact, check


def _samples(manifest: dict, intact: dict[str, bytes], progress: bool) -> Check:
    check, rows, counts = Check("samples"), 0, Counter()
    for name, data in tqdm(sorted(intact.items()), desc="samples", unit="shard", disable=not progress):
        bucket = name.split("/")[-2]
        table = cache.table_from_bytes(data)
        recorded = manifest["shards"][name]["rows"]
        if table.num_rows != recorded:
            check.problems.append(f"{name}: {table.num_rows} rows, the manifest says {recorded}")
        counts[bucket] += table.num_rows
        for row in table.to_pylist():
            rows += 1
            where = f"{name} row {row[cache.ID]}"
            try:
                sample = cache.sample_from_row(row, bucket)
            except (RuntimeError, ValueError) as error:  # bytes that do not fill the recorded shape
                check.problems.append(f"{where}: tensors do not decode to their recorded shapes ({error})")
                continue
            for label, tensor in (("latent mean", sample.latent_mean), ("latent logvar", sample.latent_logvar),
                                  ("text embedding", sample.text_embedding)):  # fmt: skip
                if not bool(torch.isfinite(tensor.float()).all()):
                    check.problems.append(f"{where}: {label} holds NaN or Inf")
            resolution, frames = row[cache.RESOLUTION], row[cache.NUM_FRAMES]
            if not bucket.startswith(f"{resolution}-{frames}f-"):
                check.problems.append(f"{where}: its columns say {resolution}, T={frames}, not bucket {bucket}")
    for bucket, count in manifest["buckets"].items():
        if intact and counts[bucket] != count and len(intact) == len(manifest["shards"]):
            check.problems.append(f"bucket {bucket}: {counts[bucket]} rows, the manifest says {count}")
    check.detail = f"{rows} rows decode to their recorded shapes, finite"
    return check


def _tables(store: cache.Store, manifest: dict) -> Check:
    check = Check("probe, rejects")
    try:
        version = manifest["version"]
        probe, rejects = store.read_table(f"{version}/{cache.PROBE}"), store.read_table(f"{version}/{cache.REJECTS}")
    except (OSError, pa.ArrowInvalid) as error:
        check.problems.append(f"unreadable: {error}")
        return check
    if probe.num_rows != manifest["rows_in"]:
        check.problems.append(f"{cache.PROBE}: {probe.num_rows} rows, the manifest counts {manifest['rows_in']} in")
    if rejects.num_rows != manifest["rejected"] + manifest["dropped"]:
        check.problems.append(
            f"{cache.REJECTS}: {rejects.num_rows} rows, the manifest counts "
            f"{manifest['rejected']} rejected + {manifest['dropped']} dropped"
        )
    check.detail = f"{probe.num_rows} rows in, {rejects.num_rows} not kept"
    return check


def _temp_files(store: cache.Store) -> Check:
    check = Check("temp files")
    check.notes = [f"{name}: left by a failed run" for name in store.files("", cache.TEMP_PATTERN)]
    check.detail = "none"
    if check.notes:
        check.detail = f"{len(check.notes)}, removed by the next `sora preprocess` with this folder"
    return check
