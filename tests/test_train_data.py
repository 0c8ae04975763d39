"""Training batches from the cache: plans, shapes, determinism, resume, masks."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from bucketing.assign import parse_bucket_name
from pipelines.cache import ID, Cache
from pipelines.config import ConfigError, load_config
from pipelines.train_data import BatchRef, CacheBatches, frame_mask, plan_epoch

ROWS = {"144p-16f-0.56": np.arange(9), "144p-1f-1.00": np.arange(5), "240p-8f-1.78": np.arange(1)}
SIZES = {"144p-16f-0.56": 2, "144p-1f-1.00": 4, "240p-8f-1.78": 2}


def test_plan_is_fixed_by_seed_and_epoch():
    a, b = plan_epoch(ROWS, SIZES, seed=1, epoch=0, workers=2), plan_epoch(ROWS, SIZES, seed=1, epoch=0, workers=2)
    assert a == b
    assert plan_epoch(ROWS, SIZES, seed=1, epoch=1, workers=2) != a
    assert plan_epoch(ROWS, SIZES, seed=2, epoch=0, workers=2) != a


def test_workers_get_disjoint_full_homogeneous_batches():
    plan = plan_epoch(ROWS, SIZES, seed=0, epoch=3, workers=2)
    seen = Counter()
    for worker in plan.batches:
        assert len(worker) == plan.steps
        for batch in worker:
            assert len(batch.rows) == SIZES[batch.bucket]  # full, one bucket
            seen.update((batch.bucket, row) for row in batch.rows)
    assert max(seen.values()) == 1  # no sample twice in an epoch, on any worker
    # 4 + 1 full batches; dealt in pairs, so one batch waits for the next epoch.
    assert plan.steps == 2
    assert plan.leftover == {"144p-16f-0.56": 1, "144p-1f-1.00": 1, "240p-8f-1.78": 1}


def test_plans_deal_the_given_rows_only():
    rows = {"144p-16f-0.56": np.array([1, 4, 6, 7])}  # the others held out
    used = {row for epoch in range(10) for ref in plan_epoch(rows, SIZES, 0, epoch, 1).batches[0] for row in ref.rows}
    assert used == {1, 4, 6, 7}
    # All rows given: the same plan as the row positions themselves (plans did not change with held-out rows).
    everything = plan_epoch({"144p-16f-0.56": np.arange(9)}, SIZES, 0, 0, 1)
    assert all(len(ref.rows) == 2 for ref in everything.batches[0]) and everything.steps == 4


def test_every_sample_is_used_over_epochs():
    used = set()
    for epoch in range(20):
        for worker in plan_epoch(ROWS, SIZES, seed=0, epoch=epoch, workers=1).batches:
            used.update((batch.bucket, row) for batch in worker for row in batch.rows)
    assert len(used) == 9 + 5  # every sample of the two trainable buckets
    assert not any(bucket == "240p-8f-1.78" for bucket, _ in used)  # one sample, batch size 2: never


@pytest.mark.parametrize("frames", [1, 2, 8, 16])
def test_frame_masks_follow_the_named_kinds(frames):
    generator = torch.Generator().manual_seed(0)
    assert frame_mask(frames, {"mask_no": 1.0}, generator).all()
    head = frame_mask(frames, {"mask_image_head": 1.0}, generator)
    tail = frame_mask(frames, {"mask_image_tail": 1.0}, generator)
    if frames == 1:
        assert head.all() and tail.all()  # an image is never conditioned on itself
        return
    assert head.tolist() == [False] + [True] * (frames - 1)
    assert tail.tolist() == [True] * (frames - 1) + [False]
    for _ in range(20):
        quarter = frame_mask(frames, {"mask_quarter_head_tail": 1.0}, generator)
        conditioned = (~quarter).sum().item()
        assert 2 <= conditioned <= 2 * max(1, frames // 4) or frames == 2
        assert not quarter[0] and not quarter[-1]
        random = frame_mask(frames, {"mask_quarter_random": 1.0}, generator)
        gaps = (~random).nonzero().flatten().tolist()
        assert 1 <= len(gaps) <= max(1, frames // 4) and gaps == list(range(gaps[0], gaps[0] + len(gaps)))


def test_mask_kinds_are_drawn_by_their_ratios():
    generator = torch.Generator().manual_seed(0)
    ratios = {"mask_no": 0.75, "mask_image_head": 0.25}
    heads = sum(not frame_mask(8, ratios, generator)[0] for _ in range(2000))
    assert 0.21 < heads / 2000 < 0.29


def test_batches_from_the_demo_cache(clean_cache):
    cache_dir, config_path = clean_cache
    config = load_config(config_path, "train")
    data = CacheBatches(Cache(cache_dir), config.mask_ratios)
    sizes = data.batch_sizes(config.buckets)
    plan = plan_epoch(data.train_rows(), sizes, seed=config.seed, epoch=0, workers=1)
    assert plan.steps > 0
    batches = list(data.iterate(plan, rank=0, seed=config.seed, epoch=0))
    for (step, batch), ref in zip(batches, plan.batches[0], strict=True):
        t = parse_bucket_name(ref.bucket)[1]
        b = sizes[ref.bucket]
        height, width = int(batch["height"][0]), int(batch["width"][0])
        assert batch["x"].shape == (b, 4, t, height // 8, width // 8), (step, ref.bucket)
        assert batch["y"].shape[0] == b and batch["y_mask"].shape == batch["y"].shape[:2]
        assert batch["y_mask"].any(dim=1).all()
        assert (batch["y"][~batch["y_mask"]] == 0).all()
        assert batch["x_mask"].shape == (b, t)
        assert torch.isfinite(batch["x"]).all()

    # Resuming at step k gives exactly the batches an uninterrupted pass gives from k on.
    resumed = list(data.iterate(plan, rank=0, seed=config.seed, epoch=0, start_step=1))
    for (step_a, a), (step_b, b) in zip(batches[1:], resumed, strict=True):
        assert step_a == step_b
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_batches_carry_open_soras_training_conditioning_values(clean_cache):
    """Open-Sora 1.1's VariableVideoTextDataset: ar = width / height of the bucket, fps = the
    file's own rate (24 when unknown), IMG_FPS = 120 for an image."""
    cache_dir, _ = clean_cache
    data = CacheBatches(Cache(cache_dir))
    seen = {"image": 0, "video": 0}
    for bucket, count in data.bucket_rows().items():
        # As a cache made with frame_interval 3 stores it: the effective rate is not what conditions.
        stored = data.table(bucket)
        effective = pc.divide(stored.column("src_fps"), 3.0)
        data._tables[bucket] = stored.set_column(stored.schema.get_field_index("fps"), "fps", effective)
        table = data.table(bucket).to_pylist()
        batch = data.load(BatchRef(bucket, tuple(range(count))), torch.Generator().manual_seed(0))
        for index, row in enumerate(table):
            image = row["path"].endswith((".png", ".jpg"))
            seen["image" if image else "video"] += 1
            assert float(batch["ar"][index]) == pytest.approx(row["width"] / row["height"]), row["path"]
            expected = 120.0 if image else row["src_fps"]
            assert float(batch["fps"][index]) == expected, row["path"]
            assert (float(batch["height"][index]), float(batch["width"][index])) == (row["height"], row["width"])
    assert seen["image"] and seen["video"]


def test_a_video_of_unknown_rate_is_conditioned_on_24_fps():
    from sora_model.stdit import sampling_conditions, training_conditions

    assert training_conditions(144, 256, 0.0, image=False) == {"ar": 256 / 144, "fps": 24.0}
    assert training_conditions(144, 256, 30.0, image=False) == {"ar": 256 / 144, "fps": 30.0}
    assert training_conditions(144, 256, 0.0, image=True)["fps"] == 120.0
    assert sampling_conditions(144, 256, 16, 24) == {"ar": 144 / 256, "fps": 24}
    assert sampling_conditions(144, 256, 1, 24)["fps"] == 120.0


def test_size_inputs_are_rounded_to_the_models_dtype_as_open_sora_casts_them():
    from pipelines.models import size_inputs

    values = {"height": 853, "width": 480, "num_frames": 16, "fps": 29.97, "ar": 240 / 426}
    bf16 = size_inputs("debug", 2, torch.device("cpu"), torch.bfloat16, **values)
    assert bf16["height"].tolist() == [852.0, 852.0] and bf16["fps"][0] == 30.0 and bf16["ar"][0] == 0.5625
    assert all(tensor.dtype == torch.float32 for tensor in bf16.values())
    fp32 = size_inputs("debug", 2, torch.device("cpu"), **values)
    assert fp32["height"][0] == 853.0 and fp32["ar"][0] == pytest.approx(240 / 426)
    assert size_inputs("STDiT-XL/2", 2, torch.device("cpu"), **values) == {}  # STDiT takes no size conditioning


def test_batch_sizes_come_from_the_bucket_config(clean_cache):
    config = load_config(clean_cache[1], "train")
    assert config.buckets.batch_size("144p", 16) == 2
    assert config.buckets.batch_size("144p", 1) == 4
    assert config.buckets.batch_size("1080p", 16) is None
    data = CacheBatches(Cache(clean_cache[0]))
    sizes = data.batch_sizes(config.buckets)
    assert set(sizes) == set(data.bucket_rows())
    assert all(size == config.buckets.batch_size(*parse_bucket_name(name)[:2]) for name, size in sizes.items())


def test_a_cache_bucket_the_config_lacks_is_an_error(clean_cache):
    config = load_config(clean_cache[1], "train", {"bucket_config": {"144p": {1: (1.0, 4)}}})
    with pytest.raises(ConfigError, match=r"the cache has bucket 144p-16f-\S+ but the config has no batch size"):
        CacheBatches(Cache(clean_cache[0])).batch_sizes(config.buckets)


def test_held_out_samples_are_chosen_by_id_and_never_planned(clean_cache):
    from pipelines.train_data import held_out

    ids = [f"sample-{i}" for i in range(2000)]
    chosen = [held_out(i, 0.25) for i in ids]
    assert chosen == [held_out(i, 0.25) for i in ids]  # a function of the id only
    assert 0.2 < sum(chosen) / len(ids) < 0.3
    assert not any(held_out(i, 0.0) for i in ids) and all(held_out(i, 1.0) for i in ids)
    assert all(held_out(i, 0.5) for i, kept in zip(ids, chosen, strict=True) if kept)  # nested as the share grows

    config = load_config(clean_cache[1], "train")
    data = CacheBatches(Cache(clean_cache[0]), eval_fraction=0.5)
    train, sizes = data.train_rows(), data.batch_sizes(config.buckets)
    evaluated = {(ref.bucket, row) for ref in data.eval_batches(sizes) for row in ref.rows}
    trained = {(bucket, int(row)) for bucket, rows in train.items() for row in rows}
    assert evaluated and trained and not evaluated & trained
    assert len(evaluated | trained) == sum(data.bucket_rows().values())
    for epoch in range(3):
        plan = plan_epoch(train, sizes, seed=config.seed, epoch=epoch, workers=1)
        assert {(ref.bucket, row) for ref in plan.batches[0] for row in ref.rows} <= trained

    # The evaluation view is fixed: the centred window of the posterior mean, no frame mask.
    ref = data.eval_batches(sizes)[0]
    first, second = data.load(ref, None), data.load(ref, None)
    assert "x_mask" not in first and all(torch.equal(first[k], second[k]) for k in first)
    sample = next(
        s
        for s in Cache(clean_cache[0]).iter_samples(ref.bucket)
        if s.id == data.table(ref.bucket)[ID][ref.rows[0]].as_py()
    )
    frames, stored = first["x"].shape[2], sample.latent_mean.shape[1]
    centre = (stored - frames) // 2
    torch.testing.assert_close(first["x"][0], sample.latent_mean[:, centre : centre + frames].float())


def test_prefetcher_gives_the_items_in_order_ahead_of_the_caller():
    import threading

    from pipelines.train_data import Prefetcher

    made = []

    def items():
        for index in range(5):
            made.append(index)
            yield {"x": torch.full((2,), float(index))}

    prefetcher = Prefetcher(items(), depth=2)
    deadline = time.monotonic() + 10
    while len(made) < 3 and time.monotonic() < deadline:  # 2 queued, 1 more waiting to be put
        time.sleep(0.01)
    assert made == [0, 1, 2]  # made ahead, and no further than the depth allows
    got = [item["x"][0].item() for _, item in prefetcher]
    assert got == [0.0, 1.0, 2.0, 3.0, 4.0]
    prefetcher.close()
    assert not any(thread.name == "prefetch" for thread in threading.enumerate())


def test_prefetcher_measures_the_wait_raises_errors_and_stops_when_closed():
    from pipelines.train_data import Prefetcher

    def slow():
        time.sleep(0.3)
        yield {"x": torch.zeros(1)}
        raise ValueError("shard 3 is damaged")

    prefetcher = Prefetcher(slow())
    wait, _ = next(prefetcher)
    assert wait >= 0.2  # the caller waited for the first item
    with pytest.raises(ValueError, match="shard 3 is damaged"):
        next(prefetcher)
    prefetcher.close()

    def endless():
        while True:
            yield {"x": torch.zeros(1)}

    endless_prefetcher = Prefetcher(endless())
    next(endless_prefetcher)
    endless_prefetcher.close()  # returns: the thread stops though its queue is full
    assert not endless_prefetcher._thread.is_alive()
