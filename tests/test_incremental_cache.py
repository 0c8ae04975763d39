"""`sora preprocess` again after the table or the config changed: only what changed is encoded,
the result is byte for byte a clean build's, and the current version stays readable until the
new one is complete."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from pipelines.cache import Cache
from tests.conftest import DEMO_NUM, SORA, assert_same_cache, run_sora, write_config

GOOD = DEMO_NUM  # the demo table: 12 good rows, then 3 broken ones


def stats(output: str) -> dict[str, int]:
    """The summary's reuse line as numbers."""
    found = re.search(
        r"probe (\d+) probed, (\d+) reused;  VAE (\d+) rows encoded, (\d+) reused;  "
        r"T5 (\d+) captions encoded, (\d+) rows reused",
        output,
    )
    assert found, output[-3000:]
    names = ("probed", "probe_reused", "vae_encoded", "vae_reused", "text_encoded", "text_reused")
    return dict(zip(names, map(int, found.groups()), strict=True))


def preprocess(table: Path, config: Path, cache: Path, *extra: str) -> dict[str, int]:
    result = run_sora("preprocess", str(table), "--config", str(config), "--cache-dir", str(cache), *extra)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return stats(result.stdout)


def table_beside(demo_csv: Path, name: str, frame: pd.DataFrame) -> Path:
    """A variant of the demo table next to its files (relative paths resolve against its folder)."""
    path = demo_csv.parent / f"{name}.csv"
    frame.to_csv(path, index=False)
    return path


def copy_of(cache: Path, folder: Path) -> Path:
    return Path(shutil.copytree(cache, folder / "cache"))


@pytest.mark.slow
def test_growing_a_table_encodes_only_the_new_rows_and_equals_a_clean_build(clean_cache, demo_csv, tmp_path):
    clean, config = clean_cache
    full = pd.read_csv(demo_csv)
    first = table_beside(demo_csv, "first-9", full.iloc[:9])  # 8 clips and 1 image
    cache = tmp_path / "cache"
    assert preprocess(first, config, cache)["vae_encoded"] == 9
    grown = preprocess(demo_csv, config, cache)  # + 3 images and the 3 broken rows
    assert grown["vae_encoded"] == GOOD - 9 and grown["vae_reused"] == 9
    assert grown["text_encoded"] == GOOD - 9 and grown["text_reused"] == 9
    assert grown["probe_reused"] == 9
    assert_same_cache(cache, clean)


@pytest.mark.slow
def test_a_caption_edit_costs_no_vae_call(clean_cache, demo_csv, tmp_path):
    clean, config = clean_cache
    edited = pd.read_csv(demo_csv)
    edited.loc[0, "text"] = edited.loc[3, "text"] = "a square glides on a yellow background"  # new, twice: once
    edited.loc[1, "text"] = edited.loc[2, "text"]  # an earlier build has this caption
    table = table_beside(demo_csv, "edited", edited)
    cache = copy_of(clean, tmp_path)
    result = preprocess(table, config, cache)
    assert result["vae_encoded"] == 0 and result["vae_reused"] == GOOD
    assert result["text_encoded"] == 1 and result["text_reused"] == GOOD - 1
    assert result["probed"] == 1  # the missing file, looked for again
    old, new = Cache(clean), Cache(cache)
    old_rows = {row["path"]: row for bucket in old.buckets() for row in old.table(bucket).to_pylist()}
    texts = {row["path"]: row["text_emb"] for bucket in new.buckets() for row in new.table(bucket).to_pylist()}
    for bucket in new.buckets():
        for row in new.table(bucket).to_pylist():
            before = old_rows[row["path"]]
            assert row["latent_mean"] == before["latent_mean"] and row["latent_key"] == before["latent_key"]
            if row["path"] == "clip_001.mp4":
                assert row["text_emb"] == old_rows["clip_002.mp4"]["text_emb"]
            elif row["path"] == "clip_003.mp4":
                assert row["text_emb"] == texts["clip_000.mp4"] and row["text_emb"] != before["text_emb"]
            elif row["path"] != "clip_000.mp4":
                assert row["text_emb"] == before["text_emb"]
    assert [p.name for p in cache.iterdir() if p.name.startswith("v-")] == [new.version]  # the old version gone


@pytest.mark.slow
def test_a_corrected_frame_count_rebuckets_its_row_and_a_bucket_change_only_the_rows_it_moves(
    clean_cache, demo_csv, debug_models, tmp_path
):
    clean, config = clean_cache
    probe = Cache(clean).probe_table().to_pandas().iloc[:GOOD]
    table = probe[["path", "text"]].assign(
        num_frames=probe["src_num_frames"], height=probe["src_height"], width=probe["src_width"], fps=24
    )
    clip = int(probe.index[probe["path"] == "clip_003.mp4"][0])
    assert table.loc[clip, "num_frames"] >= 16
    wrong = table.assign(num_frames=table["num_frames"].where(table.index != clip, 9))  # 9 frames: T=8 at most
    cache = tmp_path / "cache"
    first = preprocess(table_beside(demo_csv, "wrong-count", wrong), config, cache)
    assert first["probed"] == 0  # the table's metadata is used as given
    bucket_of = lambda: Cache(cache).probe_table().to_pandas().set_index("path")["bucket"]  # noqa: E731
    assert "-8f-" in bucket_of()["clip_003.mp4"]

    fixed = preprocess(table_beside(demo_csv, "fixed-count", table), config, cache)
    assert fixed["vae_encoded"] == 1 and fixed["vae_reused"] == GOOD - 1 and fixed["text_encoded"] == 0
    assert "-16f-" in bucket_of()["clip_003.mp4"]

    # No 16-frame bucket at 144p: the clips move to T=8 and are encoded again; the images are not.
    no_16 = write_config(tmp_path, debug_models, **{"8: (1.0, 2), 16: (1.0, 2)}": "8: (1.0, 2)}"})
    images = int(table["path"].str.startswith("image_").sum())
    moved = preprocess(table_beside(demo_csv, "fixed-count", table), no_16, cache)
    assert moved["vae_encoded"] == GOOD - images and moved["vae_reused"] == images and moved["text_encoded"] == 0
    assert "-8f-" in bucket_of()["clip_003.mp4"]


@pytest.mark.slow
def test_reuse_fills_a_new_folder_from_another_cache_without_encoding(clean_cache, demo_csv, tmp_path):
    clean, config = clean_cache
    cache = tmp_path / "cache"
    result = preprocess(demo_csv, config, cache, "--reuse", str(clean))
    assert result["vae_encoded"] == 0 and result["text_encoded"] == 0 and result["vae_reused"] == GOOD
    assert_same_cache(cache, clean)
    refused = run_sora("preprocess", str(demo_csv), "--config", str(config), "--cache-dir", str(tmp_path / "other"),
                       "--reuse", str(tmp_path / "nowhere"))  # fmt: skip
    assert refused.returncode == 2 and "nowhere is not a finished cache" in refused.stderr


@pytest.mark.slow
def test_a_killed_incremental_build_leaves_the_old_version_readable_and_resumes_to_a_clean_build(
    clean_cache, demo_csv, debug_models, tmp_path
):
    clean, _ = clean_cache
    other = write_config(tmp_path, debug_models, **{"frame_interval = 1": "frame_interval = 2"})
    cache = copy_of(clean, tmp_path)
    old_version = json.loads((cache / "manifest.json").read_text())["version"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [SORA, "preprocess", str(demo_csv), "--config", str(other), "--cache-dir", str(cache)]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip

    def new_shards() -> list[Path]:
        return [p for p in cache.glob("v-*/buckets/*/part-*.arrow") if not p.is_relative_to(cache / old_version)]

    deadline = time.monotonic() + 300
    while not new_shards() and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before any shard was written"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # kill -9 mid-build
    process.wait()
    # Mid-build: the manifest still names the old version, and all of it reads and verifies.
    assert json.loads((cache / "manifest.json").read_text())["version"] == old_version
    verified = run_sora("cache", "verify", str(cache))
    assert verified.returncode == 0, verified.stdout[-2000:]
    assert sum(Cache(cache).table(b).num_rows for b in Cache(cache).buckets()) == GOOD
    resumed = run_sora("preprocess", str(demo_csv), "--config", str(other), "--cache-dir", str(cache))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fresh = tmp_path / "fresh"
    preprocess(demo_csv, other, fresh)
    assert_same_cache(cache, fresh)
