"""`sora preprocess` on the demo data with the debug models: the cache, bad rows, resume, fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from pipelines.cache import (
    BUCKETS_DIR,
    DETAIL,
    HEIGHT,
    ID,
    MANIFEST,
    NUM_TOKENS,
    PATH,
    REASON,
    ROW,
    SRC_HEIGHT,
    SRC_NUM_FRAMES,
    SRC_WIDTH,
    STAGE,
    WIDTH,
    WORK_DIR,
    Cache,
)
from pipelines.media import frame_indices
from pipelines.preprocess import DecodeFrames, probe_batch
from tests.conftest import DEMO_NUM, SORA, assert_same_cache, run_sora, write_config


def test_manifest_accounts_for_every_row(clean_cache):
    manifest = json.loads((clean_cache[0] / MANIFEST).read_text())
    assert manifest["rows_in"] == manifest["kept"] + manifest["rejected"] + manifest["dropped"] == DEMO_NUM + 3
    assert sum(manifest["buckets"].values()) == manifest["kept"] == DEMO_NUM
    assert not (clean_cache[0] / WORK_DIR).exists()
    assert Cache(clean_cache[0]).probe_table().num_rows == DEMO_NUM + 3


def test_broken_files_are_rejected_with_their_reason(clean_cache):
    rejects = Cache(clean_cache[0]).rejects().to_pandas().set_index(PATH)
    assert rejects.loc["broken_missing.mp4", REASON] == "file not found"
    assert rejects.loc["broken_truncated.mp4", REASON] == "not a readable video"
    assert rejects.loc["broken_not_a_video.mp4", REASON] == "not a readable video"
    assert set(rejects[STAGE]) == {"probe"}


def test_shards_decode_to_the_bucket_shapes(clean_cache, debug_models):
    from sora_model.text_encoder import T5Encoder

    tokenizer = T5Encoder.from_pretrained(str(debug_models["text_encoder"]), 32).tokenizer
    cache = Cache(clean_cache[0])
    seen = 0
    for bucket in cache.buckets():
        _resolution, frames, _ = bucket.split("-")
        t = int(frames.removesuffix("f"))
        for sample in cache.iter_samples(bucket):
            columns = cache.table(bucket).select([ID, HEIGHT, WIDTH, NUM_TOKENS]).to_pylist()
            row = next(row for row in columns if row[ID] == sample.id)
            height, width = row[HEIGHT], row[WIDTH]
            channels, stored, h, w = sample.latent_mean.shape
            assert (channels, h, w) == (4, height // 8, width // 8), bucket
            assert t <= stored <= 2 * t, (bucket, stored)  # up to cache_frames_factor x T
            assert sample.latent_logvar.shape == sample.latent_mean.shape
            assert np.isfinite(sample.latent_mean.numpy()).all()
            # Real tokens only: as many rows as the caption has tokens (with </s>).
            assert sample.text_embedding.shape == (len(tokenizer(sample.text).input_ids), 64)
            assert row[NUM_TOKENS] == sample.text_embedding.shape[0]
            seen += 1
    assert seen == DEMO_NUM


def test_rerun_of_a_finished_cache_does_nothing(clean_cache, demo_csv):
    cache, config = clean_cache
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}
    result = run_sora("preprocess", str(demo_csv), "--config", str(config), "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "up to date" in result.stderr
    assert before == {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}


def test_a_report_under_other_settings_is_refused_saying_what_differs(clean_cache, debug_models, tmp_path):
    cache, _ = clean_cache
    other = write_config(tmp_path, debug_models, **{"frame_interval = 1": "frame_interval = 2"})
    report = run_sora("bucket-report", str(cache), "--config", str(other))
    assert report.returncode == 2 and "frame_interval: '1' -> '2'" in report.stderr


def test_bucket_report_of_the_cache_matches_the_csv(clean_cache, demo_csv):
    cache, config = clean_cache
    from_cache = run_sora("bucket-report", str(cache), "--config", str(config), "--json")
    from_csv = run_sora("bucket-report", str(demo_csv), "--config", str(config), "--json")
    assert from_cache.returncode == 0 and from_csv.returncode == 0, from_cache.stderr + from_csv.stderr
    cached, planned = json.loads(from_cache.stdout), json.loads(from_csv.stdout)
    assert cached["buckets"] == planned["buckets"]
    assert cached["kept"] == planned["kept"] == DEMO_NUM


def test_killed_run_resumes_to_the_same_cache(clean_cache, demo_csv, tmp_path):
    clean, config = clean_cache
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [SORA, "preprocess", str(demo_csv), "--config", str(config), "--cache-dir", str(cache)]
    for _attempt in range(3):
        process = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while not list(cache.glob(f"v-*/{BUCKETS_DIR}/*/part-*.arrow")) and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before any shard was written"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)  # kill -9 the driver (and its local Ray)
        process.wait()
        if not (cache / MANIFEST).exists():
            break
        # Shards can arrive in one burst at the end of so small a run; then the kill came
        # after the last one and there is nothing to resume: start again.
        shutil.rmtree(cache)
    assert not (cache / MANIFEST).exists(), "killed too late to test a resume, three times"

    result = run_sora(*args[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shards already done" in result.stderr
    assert_same_cache(cache, clean)


def test_missing_column_fails_before_any_work(tmp_path, debug_models):
    table = tmp_path / "data.csv"
    table.write_text("file,text\na.mp4,x\n")
    result = run_sora("preprocess", str(table), "--config", str(write_config(tmp_path, debug_models)),
                      "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert result.returncode == 2
    assert "missing required column 'path'" in result.stderr
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- stages on hand-made batches


def test_probe_stage_turns_errors_into_rejects(demo_csv):
    folder = demo_csv.parent
    batch = pd.DataFrame(
        {
            "file": [str(folder / "clip_000.mp4"), str(folder / "nope.mp4"), str(folder / "broken_not_a_video.mp4")],
            "src_num_frames": 0,
            "src_height": 0,
            "src_width": 0,
            "src_fps": 0.0,
            "reject_stage": None,
            "reject_reason": None,
            "reject_detail": None,
        }
    )
    out = probe_batch(batch)
    assert out["src_num_frames"].iat[0] > 0 and out["reject_stage"].isna().iat[0]
    assert out["reject_reason"].tolist()[1:] == ["file not found", "not a readable video"]


def test_decode_stage_rejects_a_file_without_the_frames(demo_csv):
    folder = demo_csv.parent
    batch = pd.DataFrame(
        {
            "file": [str(folder / "clip_000.mp4"), str(folder / "broken_truncated.mp4")],
            "src_num_frames": [12, 24],
            "src_height": [144, 144],
            "src_width": [256, 256],
            "num_frames": [8, 8],
            "height": [144, 144],
            "width": [256, 256],
            "reject_stage": None,
            "reject_reason": None,
            "reject_detail": None,
        }
    )
    out = DecodeFrames(frame_interval=1, frames_factor=2.0)(batch)
    assert out["frames_shape"].iat[0] == [3, 12, 144, 256]
    assert out["reject_stage"].tolist() == [None, "decode"]


def test_encoders_reject_non_finite_outputs_and_keep_the_other_rows():
    """NaN or Inf latents or caption states never reach the cache: the row is rejected as
    `encode: non-finite`, its neighbours are kept."""
    import torch

    from pipelines.preprocess import NON_FINITE, TextEncode, VaeEncode

    class Vae:
        def encode_many(self, videos, chunk):  # a row whose first pixel is white comes out NaN
            out = []
            for video in videos:
                mean = torch.zeros(4, video.shape[1], 2, 2)
                out.append((mean + float("nan") if video[0, 0, 0, 0] > 0.99 else mean, mean))
            return out

    class Text:
        def encode(self, texts):  # (B, L, D), (B, L)
            states = torch.zeros(len(texts), 3, 4)
            states[[i for i, text in enumerate(texts) if "inf" in text]] = float("inf")
            return states, torch.ones(len(texts), 3, dtype=torch.bool)

    frames = [np.zeros((3, 2, 16, 16), np.uint8), np.full((3, 2, 16, 16), 255, np.uint8)]
    batch = pd.DataFrame({"frames": [f.tobytes() for f in frames], "frames_shape": [list(f.shape) for f in frames],
                          "text": ["fine", "inf here"], "reject_stage": None, "reject_reason": None,
                          "reject_detail": None})  # fmt: skip
    vae = VaeEncode.__new__(VaeEncode)
    vae.vae, vae.device, vae.store, vae.chunk, vae.node = Vae(), torch.device("cpu"), torch.float32, 4, "local"
    out = vae(batch)
    assert out["reject_stage"].tolist() == [None, "encode"] and out["reject_reason"].iat[1] == NON_FINITE
    assert out["latent_mean"].iat[0] and not out["latent_mean"].iat[1]
    text = TextEncode.__new__(TextEncode)
    text.encoder, text.store, text.call = Text(), torch.float32, 4
    out = text(batch.drop(columns=["frames", "frames_shape"]))
    assert out["reason"].tolist() == [None, NON_FINITE] and out["num_tokens"].tolist() == [3, 0]


@pytest.mark.parametrize(
    ("src", "t", "interval", "factor", "expected"),
    [
        (100, 16, 1, 2.0, list(range(34, 66))),  # 32 frames, centred
        (100, 16, 3, 2.0, [3 * i + 3 * 1 for i in range(32)]),  # 34 strided frames, 32 kept
        (20, 16, 1, 2.0, list(range(20))),  # all there is
        (9, 1, 1, 2.0, [4]),  # T = 1 of a video: the middle frame
        (1, 1, 1, 2.0, [0]),
    ],
)
def test_frame_indices(src, t, interval, factor, expected):
    assert frame_indices(src, t, interval, factor).tolist() == expected


def _plan_rows(table_path, tmp_path, config_changes=None, on_ray=False, **patches):
    """`_plan` of a table into a scratch store: probe.arrow's rows as dicts. `on_ray`: the table
    read and validated in Ray Data tasks (Ray must be up)."""
    from pipelines import cache, preprocess
    from pipelines.config import load_config
    from pipelines.dataset import table_columns
    from pipelines.reuse import Encodings

    config = load_config("configs/debug/train.py", "train", {"preprocess.rows_per_shard": 2, **(config_changes or {})})
    store = cache.Store(tmp_path / "store")
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    columns = table_columns(table_path)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in patches.items():
            patch.setattr(preprocess, name, value)
        _, rows = preprocess._table_digest(table_path, columns, None, on_ray)
        parts = {"vae": "v", "text_encoder": "t", "model_max_length": "8", "dtype": "fp32"}
        read = preprocess._read_table(store, "v", table_path, config, on_ray)
        preprocess._plan(store, "v", read, rows, config, None, Encodings(), parts, preprocess.Reuse(), scratch)
    rows = store.read_table("v/probe.arrow").to_pylist()
    store.delete_dir("v")
    assert not list(scratch.iterdir())  # nothing spilled is left
    assert not store.folders(f"{cache.WORK_DIR}/v")  # nor a part file a read task wrote
    return rows


def test_validate_stage_rejects_rows_that_cannot_be_used(tmp_path):
    table_path = tmp_path / "data.csv"
    table_path.write_bytes(
        b"path,text\nok.mp4,a red circle\nempty.mp4,\n,no path\nbad.mp4,caf\xe9 au lait\nok.mp4,a red circle\n"
    )  # the bad bytes do not stop the file from being read
    rows = _plan_rows(table_path, tmp_path)
    assert [(row["reject_stage"], row["reject_reason"]) for row in rows] == [
        ("probe", "file not found"),  # not there: rejected without probing, the row is usable otherwise
        ("validate", "empty caption"),
        ("validate", "empty path"),
        ("validate", "undecodable text (not UTF-8)"),
        ("validate", "duplicate row (same path and caption)"),
    ]
    assert [row["row"] for row in rows] == list(range(5))


def test_the_plan_does_not_depend_on_batches_or_spill_files(tmp_path):
    """A table larger than memory is planned a batch at a time, with repeated rows and the shard
    plan found on ids spilled to several files, its rows read in this process or by Ray Data
    tasks: the plan is the one a single batch gives."""
    from pipelines import preprocess
    from pipelines.dataset import iter_table

    rng = np.random.default_rng(3)
    lines = ["path,text,num_frames,height,width,fps"]
    for i in range(300):
        frames, (height, width) = rng.choice([1, 20, 40, 80]), [(144, 256), (240, 426), (256, 256), (480, 270)][i % 4]
        path, text = f"clip_{rng.integers(0, 250):03d}.mp4", f"caption {rng.integers(0, 3)}"  # some repeat
        if i % 37 == 5:
            text = ""
        lines.append(f"{path},{text},{frames},{height},{width},{24 if i % 5 else ''}")
    table_path = tmp_path / "data.csv"
    table_path.write_text("\n".join(lines) + "\n")
    whole = _plan_rows(table_path, tmp_path)
    batched = _plan_rows(
        table_path, tmp_path,
        iter_table=lambda path: iter_table(path, batch_rows=7), partition_count=lambda rows: 5,
    )  # fmt: skip
    assert batched == whole
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipelines.config import ConfigError, load_config
    from pipelines.dataset import map_table, table_columns

    parquet = tmp_path / "data.parquet"  # integers with nulls in some row groups only: floats in those
    numbers = pd.read_csv(table_path).astype({"fps": "Int64"})
    pq.write_table(pa.Table.from_pandas(numbers, preserve_index=False), parquet, row_group_size=40)
    digests = {}
    preprocess._connect_and_count_gpus(None)
    try:  # read and validated by Ray Data tasks, a batch of 7 rows each, written to files
        on_ray = _plan_rows(
            tmp_path=tmp_path, table_path=table_path, on_ray=True,
            map_table=lambda *args: map_table(*args, batch_rows=7), partition_count=lambda rows: 5,
        )  # fmt: skip
        for path, on_ray_too in [(path, ray_too) for path in (table_path, parquet) for ray_too in (False, True)]:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(preprocess, "map_table", lambda *args: map_table(*args, batch_rows=7))
                digests[path.suffix, on_ray_too] = preprocess._table_digest(path, table_columns(path), None, on_ray_too)
        with pytest.MonkeyPatch.context() as patch:  # a task that finds another cache than the command's
            patch.setattr("pipelines.dataset.iter_table", lambda path: pytest.fail("the table is not to blame"))
            kwargs = {"location": str(tmp_path / "elsewhere"), "folder": "read", "table_path": table_path,
                      "config": load_config("configs/debug/train.py", "train")}  # fmt: skip
            with pytest.raises(ConfigError, match=r"elsewhere is not shared with the machine that runs"):
                list(map_table(table_path, preprocess._read_batch, kwargs))
    finally:
        ray.shutdown()
    assert on_ray == whole
    assert digests[".csv", True] == digests[".csv", False] and digests[".csv", False][1] == 300
    assert digests[".parquet", True] == digests[".parquet", False]
    reasons = {row["reject_reason"] for row in whole}
    assert {"duplicate row (same path and caption)", "empty caption", None} <= reasons
    assert sum(row["shard"] is not None for row in whole) > 100
    first = {}
    for row in whole:  # the first of each path and caption stays; every later one is the duplicate
        repeat = row["reject_reason"] == "duplicate row (same path and caption)"
        if row["reject_reason"] != "empty caption":  # an earlier reason stands
            assert repeat == (row["id"] in first), row
        first.setdefault(row["id"], row["row"])


def test_spill_files_stay_in_the_cache_folder_and_go_with_the_run(tmp_path, debug_models, monkeypatch):
    """The plan's spill files are written in the cache's work folder (not the system's temporary
    folder, which may be memory), and are deleted when a run ends, by an interrupt too."""
    from pipelines import preprocess
    from pipelines.config import load_config

    table = tmp_path / "data.csv"
    table.write_text("path,text\nmissing.mp4,a red circle\n")  # rejected without a model or Ray
    config = load_config(str(write_config(tmp_path, debug_models)), "train", {"data_path": str(table)})
    cache_dir, seen = tmp_path / "cache", []
    plan = preprocess._plan

    def interrupted(*args):
        seen.append(args[-1])
        (args[-1] / "ids-000.arrow").write_bytes(b"spilled")
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess, "_plan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess.preprocess(config, cache_dir)
    (version,) = [p.name for p in (cache_dir / WORK_DIR).iterdir()]
    assert seen == [cache_dir / WORK_DIR / version / preprocess.SCRATCH_DIR]
    assert not seen[0].exists()

    seen[0].mkdir()
    (seen[0] / "kept-007.arrow").write_bytes(b"left by a killed run")
    monkeypatch.setattr(preprocess, "_plan", lambda *args: (seen.append(sorted(args[-1].iterdir())), plan(*args)))
    summary = preprocess.preprocess(config, cache_dir)
    assert seen[1] == []  # a killed run's files are gone before the plan starts
    assert summary.rejected == {"probe: file not found": 1} and not (cache_dir / WORK_DIR).exists()


def test_cache_at_a_uri(demo_csv, debug_models, tmp_path):
    """A cache location may be a URI of pyarrow's filesystems (file:// here; s3://, gs://... alike)."""
    uri = f"file://{tmp_path / 'uri-cache'}"
    config = write_config(tmp_path, debug_models)
    # The demo rows plus a duplicate of the first row, a row without a caption, and two rows whose
    # metadata columns disagree with their files (too many frames; another size): decode rejects
    # that share shards with good rows.
    lines = demo_csv.read_text().splitlines()
    rows = ["path,text,num_frames,height,width,fps"] + [f"{line},,,," for line in lines[1:]]
    rows += [f"{lines[1]},,,,", f"{lines[2].split(',')[0]},,,,,"]
    rows += [
        "clip_000.mp4,the table says 500 frames,500,144,256,30",
        "clip_001.mp4,the table says square,17,256,256,30",  # frames it has (17-20), not its size
    ]
    table = demo_csv.parent / "with_bad_rows.csv"
    table.write_text("\n".join(rows) + "\n")
    result = run_sora("preprocess", str(table), "--config", str(config), "--cache-dir", uri)
    assert result.returncode == 0, result.stderr[-3000:]
    cache = Cache(uri)
    assert sum(cache.manifest["buckets"].values()) == DEMO_NUM
    validate = [r for r in cache.rejects().to_pylist() if r[STAGE] == "validate"]
    assert [(r[ROW], r[REASON]) for r in validate] == [
        (DEMO_NUM + 3, "duplicate row (same path and caption)"),
        (DEMO_NUM + 4, "empty caption"),
    ]
    decode = {r[ROW]: r[DETAIL] for r in cache.rejects().to_pylist() if r[STAGE] == "decode"}
    assert sorted(decode) == [DEMO_NUM + 5, DEMO_NUM + 6]
    assert "the table says 256x256" in decode[DEMO_NUM + 6]
    assert sum(1 for bucket in cache.buckets() for _ in cache.iter_samples(bucket)) == DEMO_NUM
    report = run_sora("bucket-report", uri, "--config", str(config), "--json")
    assert report.returncode == 0 and json.loads(report.stdout)["kept"] == DEMO_NUM


def test_a_folder_that_is_not_a_cache_is_left_alone(demo_csv, debug_models, tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    result = run_sora("preprocess", str(demo_csv), "--config", str(write_config(tmp_path, debug_models)),
                      "--cache-dir", str(folder))  # fmt: skip
    assert result.returncode == 2 and "is not a cache" in result.stderr
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_rejects_name_the_input_row(clean_cache, demo_csv):
    rejects = Cache(clean_cache[0]).rejects().to_pylist()
    lines = demo_csv.read_text().splitlines()[1:]
    assert [r[ROW] for r in rejects] == sorted(r[ROW] for r in rejects)
    for reject in rejects:
        assert lines[reject[ROW]].startswith(reject[PATH] + ",")


def test_a_filtered_parquet_table_keeps_its_rows_in_place(tmp_path):
    from pipelines.dataset import read_table, resolve_paths

    frame = pd.DataFrame({"path": [f"clip_{i}.mp4" for i in range(6)], "text": [f"caption {i}" for i in range(6)]})
    frame.iloc[::2].to_parquet(tmp_path / "filtered.parquet")  # saved with its old row labels 0, 2, 4
    table = read_table(tmp_path / "filtered.parquet")
    assert list(table.index) == [0, 1, 2] and table["path"].tolist() == ["clip_0.mp4", "clip_2.mp4", "clip_4.mp4"]
    assert all(path.is_absolute() for path in resolve_paths(table["path"], "relative/data.csv", None))


def test_reject_columns_of_mixed_types_become_one_kind():
    from pipelines.preprocess import Rejects

    batch = pd.DataFrame({"reject_stage": ["decode", None, pd.NA], "reject_reason": ["x", None, None],
                          "reject_detail": [None, None, None]})  # fmt: skip
    rejects = Rejects(batch)
    assert [rejects.failed(i) for i in range(3)] == [True, False, False]
    out = rejects.into(batch)
    assert out["reject_stage"].tolist() == ["decode", None, None] and out["reject_stage"].dtype == object


def test_bucket_report_and_preprocess_read_metadata_alike(tmp_path):
    """Both read the table's metadata through one reader: float values round, so a sample
    gets the same bucket in the report as in the cache."""
    from pipelines.bucket_report import report_from_table
    from pipelines.config import load_config

    table_path = tmp_path / "data.csv"
    # 16.6 frames round to 17 (> T=16 x frame_interval 1: bucket T=16); truncated, 16 would go to T=8;
    # 8.6 rounds to 9 (T=8), truncated 8 would not reach T=8.
    table_path.write_text(
        "path,text,num_frames,height,width,fps\n"
        "a.mp4,a red circle,16.6,143.6,256.4,24\n"
        "b.mp4,a blue square,8.6,144,256,24\n"
        "c.mp4,a green star,9,143.5,255.5,24\n"
    )
    config = load_config("configs/debug/train.py", "train", {"data_path": str(table_path)})
    report = report_from_table(table_path, config, progress=False)
    from_report = {row.bucket.name: row.samples for row in report.buckets}
    probed = pd.DataFrame(_plan_rows(table_path, tmp_path))
    assert probed[SRC_NUM_FRAMES].tolist() == [17, 9, 9]
    assert probed[[SRC_HEIGHT, SRC_WIDTH]].to_numpy().tolist() == [[144, 256]] * 3
    assert probed["bucket"].value_counts().to_dict() == from_report
    assert sorted(from_report) == ["144p-16f-0.56", "144p-8f-0.56"]
    assert from_report["144p-8f-0.56"] == 2


def test_metadata_junk_is_missing_and_probed(tmp_path):
    from pipelines.dataset import read_metadata

    table = pd.DataFrame(
        {
            "path": ["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4"],
            "text": ["a"] * 5,
            "num_frames": ["16.6", "inf", "1e400", "junk", ""],
            "height": [143.5, 144, 144, 144, 144],
            "width": ["256", "256", "256", "256", "256"],
        }
    )
    metadata, known = read_metadata(table)
    assert metadata["num_frames"].tolist()[0] == 17 and metadata["num_frames"].isna().tolist()[1:] == [True] * 4
    assert metadata["height"].tolist() == [144] * 5  # 143.5 rounds half to even: 144
    assert known.tolist() == [True, False, False, False, False]
    assert metadata["fps"].isna().all()  # no fps column: missing, not zero


@pytest.mark.parametrize("spill_files", [1, 5])
def test_shard_plan_is_per_bucket_rows_sorted_by_id_rows_per_shard_each(tmp_path, spill_files):
    """`_assign` on whole columns: each kept row gets its bucket's target size, and
    `_number_shards` a shard `<bucket>/part-NNNNN` where rows are numbered in id order within the
    bucket, from ids spilled to disk (in one file or several); rows no bucket takes are rejected
    at the bucketing stage with the reason; rejected rows stay."""
    from bucketing.assign import assign_bucket, sample_key
    from pipelines import preprocess
    from pipelines.config import load_config
    from pipelines.spill import Spill

    config = load_config("configs/debug/train.py", "train", {"preprocess.rows_per_shard": 3})
    rng = np.random.default_rng(1)
    count = 60
    frame = pd.DataFrame({ID: [f"{value:08x}" for value in rng.permutation(10**6)[:count]]})
    frame[preprocess.SRC_NUM_FRAMES] = rng.choice([1, 3, 20, 40, 80], count)
    frame[preprocess.SRC_HEIGHT] = rng.choice([8, 144, 240, 480], count)
    frame[preprocess.SRC_WIDTH] = rng.choice([8, 256, 426, 480], count)
    for column in preprocess.REJECT_COLUMNS:
        frame[column] = None
    frame["row"] = np.arange(count)
    frame.loc[::7, list(preprocess.REJECT_COLUMNS)] = ["validate", "empty path", ""]
    preprocess._assign(frame, config)
    kept = Spill(tmp_path, "kept", preprocess.KEPT_SCHEMA, ID, spill_files)
    kept.add(frame[frame["bucket"].notna()].iloc[::-1])  # the plan must not depend on the rows' order
    scratch = tmp_path / "numbers"
    scratch.mkdir()
    lookup = preprocess._number_shards(kept, count, config.preprocess.rows_per_shard, scratch)
    numbers = np.concatenate([lookup(np.arange(start, min(start + 7, count))) for start in range(0, count, 7)])
    assert not list(scratch.iterdir())
    names = [None if n < 0 else f"{b}/part-{n:05d}" for b, n in zip(frame["bucket"], numbers, strict=True)]
    frame["shard"] = pd.Series(names, dtype=object)
    assert not [file for file in tmp_path.rglob("*") if file.is_file()]  # the spill files are gone once read

    by_bucket: dict[str, list[tuple[str, str]]] = {}
    for row in frame.itertuples(index=False):
        row = row._asdict()
        if row["reject_stage"] == "validate":
            assert row["bucket"] is None and row["shard"] is None
            continue
        expected = assign_bucket(
            config.buckets, row[preprocess.SRC_NUM_FRAMES], row[preprocess.SRC_HEIGHT],
            row[preprocess.SRC_WIDTH], sample_key(row[ID]), config.seed,
        )  # fmt: skip
        if row["shard"] is None:
            assert row["reject_stage"] == "bucket" and row["reject_reason"] == expected.description
            continue
        assert (row["bucket"], row["height"], row["width"]) == (expected.name, expected.height, expected.width)
        by_bucket.setdefault(row["bucket"], []).append((row[ID], row["shard"]))
    assert len(by_bucket) >= 2
    for name, rows in by_bucket.items():
        shards = [shard for _id, shard in sorted(rows)]
        assert shards == [f"{name}/part-{i // 3:05d}" for i in range(len(rows))]
