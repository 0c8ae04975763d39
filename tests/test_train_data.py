"""Training batches from the cache: plans, shapes, determinism, resume, masks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bucketing.assign import parse_bucket_name
from pipelines.cache import Cache
from pipelines.config import ConfigError, load_config
from pipelines.train_data import CacheBatches, frame_mask, plan_epoch

ROWS = {"144p-16f-0.56": 9, "144p-1f-1.00": 5, "240p-8f-1.78": 1}
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
    plan = plan_epoch(data.bucket_rows(), sizes, seed=config.seed, epoch=0, workers=1)
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
