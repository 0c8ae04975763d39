"""A cache that proves its integrity: shard checksums in the manifest, checked by readers;
`sora cache verify`; no half-written file survives a failed write or the next run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines import cache
from tests.conftest import run_sora


@pytest.fixture
def copy(clean_cache, tmp_path) -> Path:
    """A copy of the session's cache, free to damage."""
    return Path(shutil.copytree(clean_cache[0], tmp_path / "cache"))


def first_shard(folder: Path) -> str:
    return sorted(json.loads((folder / cache.MANIFEST).read_text())["shards"])[0]


def test_manifest_holds_each_shards_checksum_size_and_rows(clean_cache):
    import hashlib

    folder = clean_cache[0]
    manifest = json.loads((folder / cache.MANIFEST).read_text())
    version = folder / manifest["version"]
    files = sorted(p.relative_to(folder).as_posix() for p in (version / cache.BUCKETS_DIR).rglob("part-*.arrow"))
    assert sorted(manifest["shards"]) == files
    for name, record in manifest["shards"].items():
        data = (folder / name).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["bytes"] == len(data)
        assert record["rows"] == cache.table_from_bytes(data).num_rows
    assert sum(r["rows"] for r in manifest["shards"].values()) == manifest["kept"]


def test_verify_passes_an_intact_cache(clean_cache):
    result = run_sora("cache", "verify", str(clean_cache[0]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the cache is intact" in result.stdout
    for name in ("manifest", "shards", "samples", "probe, rejects", "temp files"):
        assert f"  {name}" in result.stdout


def test_flipped_bytes_are_found_by_readers_verify_and_training(copy, clean_cache, tmp_path):
    shard = first_shard(copy)
    data = bytearray((copy / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte inside the tensors: Arrow still reads the file
    (copy / shard).write_bytes(bytes(data))
    bucket = shard.split("/")[-2]
    with pytest.raises(cache.CorruptShardError, match=f"{shard}: corrupt shard"):
        cache.Cache(copy).table(bucket)
    result = run_sora("cache", "verify", str(copy))
    assert result.returncode == 1
    assert f"{shard}: its bytes changed" in result.stdout and "PROBLEMS FOUND" in result.stdout
    args = ["train", str(clean_cache[1]), "--data-path", str(copy), "--outputs", str(tmp_path / "out")]
    trained = run_sora(*args)
    assert trained.returncode != 0
    assert f"{shard}: corrupt shard" in trained.stdout + trained.stderr


def test_verify_finds_non_finite_tensors_missing_and_unlisted_shards(copy):
    manifest = json.loads((copy / cache.MANIFEST).read_text())
    shard = first_shard(copy)
    table = cache.table_from_bytes((copy / shard).read_bytes())
    rows = table.to_pylist()
    latent = cache.bytes_to_tensor(rows[0][cache.LATENT_MEAN], rows[0][cache.LATENT_SHAPE], rows[0][cache.LATENT_DTYPE])
    latent.view(-1)[3] = float("nan")
    rows[0][cache.LATENT_MEAN] = cache.tensor_to_bytes(latent)[0]
    data = cache.table_bytes(pa.Table.from_pylist(rows, schema=table.schema))
    (copy / shard).write_bytes(data)
    manifest["shards"][shard] = cache.shard_record(data, len(rows))  # checksums agree: only the values are bad
    second = sorted(manifest["shards"])[1]
    (copy / second).rename(copy / second.replace("part-", "part-9"))  # missing, and a file not listed
    (copy / cache.MANIFEST).write_text(json.dumps(manifest))
    result = run_sora("cache", "verify", str(copy))
    assert result.returncode == 1, result.stdout
    assert f"{shard} row {rows[0][cache.ID]}: latent mean holds NaN or Inf" in result.stdout
    assert f"{second}: missing" in result.stdout
    assert f"{second.replace('part-', 'part-9')}: a shard file the manifest does not list" in result.stdout


def test_a_folder_that_is_not_a_cache_is_a_usage_error(tmp_path):
    result = run_sora("cache", "verify", str(tmp_path))
    assert result.returncode == 2
    assert "is not a finished cache" in result.stderr


def test_temp_files_are_listed_by_verify_and_removed_by_the_next_run(copy, clean_cache, demo_csv):
    left = (copy / first_shard(copy)).parent / ".part-00000.arrow.999.tmp"
    left.write_bytes(b"half a shard")
    result = run_sora("cache", "verify", str(copy))
    assert result.returncode == 0  # not a fault: no reader ever opens it
    assert "temp files      ok    1, removed by the next `sora preprocess`" in result.stdout
    rerun = run_sora("preprocess", str(demo_csv), "--config", str(clean_cache[1]), "--cache-dir", str(copy))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "up to date" in rerun.stderr and "left by a failed run" in rerun.stderr
    assert not left.exists()


def test_a_failed_write_leaves_no_temp_file(tmp_path):
    store = cache.Store(tmp_path)

    def fails(sink) -> None:
        sink.write(b"the first half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store._write("buckets/b/part-00000.arrow", fails)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_the_input_fingerprint_covers_metadata_columns_and_root():
    """A corrected num_frames (or another root) must not leave the old cache "up to date"."""
    import pandas as pd

    from pipelines.preprocess import _digest_columns, _input_digest, _row_hashes

    table = pd.DataFrame({"path": ["a.mp4", "b.mp4"], "text": ["x", None], "num_frames": [10, 20], "fps": [24.0, None]})

    def digest_of(frames, root=None):
        columns = _digest_columns(list(frames[0].columns))
        return _input_digest([_row_hashes(frame, columns) for frame in frames], columns, root)

    def digest(frame, root=None):
        found, rows = digest_of([frame], root)
        assert rows == len(frame)
        return found

    base = digest(table)
    assert digest(table.copy()) == base
    assert digest_of([table.iloc[:1], table.iloc[1:]]) == (base, 2)  # however batched
    # A Parquet batch of integers with a null comes as floats, one without as integers: the same digest.
    gaps = table.assign(num_frames=[10, None])
    assert digest_of([gaps.iloc[:1].astype({"num_frames": "int64"}), gaps.iloc[1:]]) == (digest(gaps), 2)
    assert digest(table.iloc[::-1]) != base  # the order of rows counts
    assert digest(table.assign(num_frames=[10, 21])) != base
    assert digest(table.assign(fps=[24.0, 30.0])) != base
    assert digest(table, "/data") != base
    assert digest(table.drop(columns=["fps"])) != base
