"""Training throughput three ways, side by side in one run: the same model, batches and steps.

(a) from the cache, through the training data path (`CacheBatches.load` in the prefetch
    thread, then the copy to the device), as `sora train` runs it;
(b) from the same batches already in memory on the device: (a)/(b) is the data path's
    cost (target: (a) >= 97 % of (b)), and (a) also reports the share of time the step
    waited for data (target: under 1 %);
(c) Open-Sora's way: every step decodes the batch's clips from their files, resizes them,
    encodes them with a VAE of the SD VAE's architecture and the captions with a T5 v1.1
    encoder (random weights: the compute is real, the values are not), then trains.
    The training step is fed the VAE's latents and the cached caption embeddings (the
    benchmark's T5 is wider than the cache's), so it is the very step of (a) and (b).

One DeepSpeed ZeRO-2 engine in this process (world size 1), with the demo config's model and
buckets, trains every way; (b) and (a) run twice each, alternating. The batches are the first
of the epoch plan, so (a), (b) and (c) see the same shapes. On CPU the defaults run in a few
minutes.

    python benchmarks/train.py [--cache demo/cache] [--data demo/data/data.csv] [--steps 40]
                               [--online-steps 3] [--t5 base]

The cache and data default to what `make demo` writes.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "demo" / "train.py"
# T5 v1.1 encoder geometries (d_model, d_kv, d_ff, layers, heads), as the released checkpoints.
T5_SIZES = {
    "base": (768, 64, 2048, 12, 12),
    "xl": (2048, 64, 5120, 24, 32),
    "xxl": (4096, 64, 10240, 24, 64),
}


def sd_vae():
    """A VAE of the SD VAE's architecture (stabilityai/sd-vae-ft-ema), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
    )


def t5_encoder(size: str, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    d_model, d_kv, d_ff, layers, heads = T5_SIZES[size]
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                      num_heads=heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    return T5EncoderModel(config)


class OnlineEncoders:
    """Open-Sora's per-step work before the model: decode, resize, VAE-encode, T5-encode."""

    def __init__(self, data, files: dict[str, Path], config, t5_size: str, device, dtype) -> None:
        from transformers import AutoTokenizer

        self.data, self.files, self.config, self.device, self.dtype = data, files, config, device, dtype
        self.vae = sd_vae().to(device, dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(config.text_encoder.from_pretrained)
        self.t5 = t5_encoder(t5_size, len(self.tokenizer)).to(device, dtype).eval()

    @torch.no_grad()
    def batch(self, ref) -> dict[str, torch.Tensor]:
        from bucketing.assign import parse_bucket_name
        from pipelines.cache import HEIGHT, PATH, SRC_NUM_FRAMES, TEXT, WIDTH
        from pipelines.media import frame_indices, read_frames, resize_crop

        rows = self.data.table(ref.bucket).take(list(ref.rows)).to_pylist()
        frames = parse_bucket_name(ref.bucket)[1]
        clips = []
        for row in rows:
            indices = frame_indices(row[SRC_NUM_FRAMES], frames, self.config.frame_interval, 1.0)
            decoded = read_frames(self.files[row[PATH]], indices)  # (F, H, W, 3)
            clips.append(resize_crop(decoded, row[HEIGHT], row[WIDTH]))  # (3, T, H, W) in [-1, 1]
        video = torch.stack(clips).to(self.device, self.dtype)  # (B, 3, T, H, W)
        b, _, t, h, w = video.shape
        pixels = video.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)
        latents = self.vae.encode(pixels).latent_dist.sample() * 0.18215  # (B*T, 4, h/8, w/8)
        latents = latents.reshape(b, t, *latents.shape[1:]).permute(0, 2, 1, 3, 4).float()
        tokens = self.tokenizer([row[TEXT] for row in rows], max_length=self.config.text_encoder.model_max_length,
                                padding="max_length", truncation=True, return_tensors="pt").to(self.device)  # fmt: skip
        self.t5(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        cached = self.data.load(ref, torch.Generator().manual_seed(0))  # caption embeddings of the cache's width
        return {**{name: tensor.to(self.device) for name, tensor in cached.items()}, "x": latents}


def timed_steps(engine, diffusion, model_type: str, batches, steps: int, warmup: int) -> tuple[float, float, int]:
    """(seconds of the timed steps, seconds of them spent waiting for data, samples) after `warmup` steps."""
    from pipelines.trainer import StepKey, train_step

    total = wait_total = 0.0
    samples = 0
    for step in range(warmup + steps):
        started = time.perf_counter()
        wait, batch = next(batches)
        batch = {name: tensor.to(engine.device, non_blocking=True) for name, tensor in batch.items()}
        metrics = train_step(engine, diffusion, batch, model_type, StepKey(0, 0, step))
        float(metrics["loss"])  # wait for the device
        if step >= warmup:
            total += time.perf_counter() - started
            wait_total += wait
            samples += batch["x"].shape[0]
    return total, wait_total, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / "demo" / "cache")
    parser.add_argument("--data", type=Path, default=ROOT / "demo" / "data" / "data.csv")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of (a) and (b)")
    parser.add_argument("--online-steps", type=int, default=3, help="timed steps of (c)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--t5", choices=sorted(T5_SIZES), default="base", help="T5 v1.1 geometry of (c)")
    args = parser.parse_args()

    from pipelines.cache import Cache
    from pipelines.config import load_config
    from pipelines.dataset import read_table, resolve_paths
    from pipelines.device import local_device
    from pipelines.train_data import CacheBatches, Prefetcher, plan_epoch, seed_of
    from pipelines.trainer import build_training, single_process_group
    from sora_model.loading import torch_dtype

    config = load_config(CONFIG, "train")
    data = CacheBatches(Cache(args.cache), config.mask_ratios, config.eval_fraction)
    plan = plan_epoch(data.train_rows(), data.batch_sizes(config.buckets), config.seed, 0, 1)
    count = args.warmup + max(args.steps, args.online_steps)
    refs = list(itertools.islice(itertools.cycle(plan.batches[0]), count))
    table = read_table(args.data)
    files = dict(zip(table["path"].astype(str), resolve_paths(table["path"].astype(str), args.data, None), strict=True))
    device = local_device(config.dtype)
    print(device.describe(), f"| torch threads {torch.get_num_threads()}", flush=True)

    def load(index: int):
        return data.load(refs[index], torch.Generator().manual_seed(seed_of(config.seed, 0, index, 0)))

    with single_process_group(device.backend):
        torch.manual_seed(config.seed)
        # One engine for every way: the same model, step and optimizer.
        trainer, _, diffusion = build_training(config, data.cache.text_dim(), device, with_ema=False)
        steps = args.warmup + args.steps
        target = trainer.device
        model_type = config.model.type
        # (b) and (a) twice each, alternating, so that warm-up and drift hit both alike.
        totals = {"a": [0.0, 0.0, 0], "b": [0.0, 0.0, 0]}
        for _ in range(2):
            in_memory = [{k: v.to(target) for k, v in load(i).items()} for i in range(steps)]
            measured = timed_steps(trainer, diffusion, model_type, ((0.0, b) for b in in_memory), args.steps,
                                   args.warmup)  # fmt: skip
            del in_memory
            totals["b"] = [x + y for x, y in zip(totals["b"], measured, strict=True)]
            prefetcher = Prefetcher((load(i) for i in range(steps)), pin_memory=device.use_gpu)
            try:
                measured = timed_steps(trainer, diffusion, model_type, prefetcher, args.steps, args.warmup)
            finally:
                prefetcher.close()
            totals["a"] = [x + y for x, y in zip(totals["a"], measured, strict=True)]
        results = {key: tuple(value) for key, value in totals.items()}
        online = OnlineEncoders(data, files, config, args.t5, target, torch_dtype(device.dtype))

        def online_batches():
            for index in range(args.warmup + args.online_steps):
                started = time.perf_counter()
                batch = online.batch(refs[index])
                yield time.perf_counter() - started, batch

        results["c"] = timed_steps(trainer, diffusion, model_type, online_batches(), args.online_steps, args.warmup)

    rate = {key: samples / seconds for key, (seconds, _, samples) in results.items()}
    labels = {
        "a": "(a) from the cache, training data path",
        "b": "(b) same batches, already in memory",
        "c": f"(c) Open-Sora's way: decode + SD VAE + T5-{args.t5} every step",
    }
    shapes = sorted({ref.bucket for ref in refs[: args.warmup + args.steps]})
    print(f"model {config.model.type!r} of {CONFIG.relative_to(ROOT)}; the batches' buckets: {', '.join(shapes)}")
    for key in ("a", "b", "c"):
        seconds, wait, samples = results[key]
        waited = "decoding and encoding" if key == "c" else "waiting for data"
        print(f"{labels[key]:<58} {rate[key]:8.2f} samples/s  ({samples} samples in {seconds:.1f} s, "
              f"{100 * wait / seconds:.1f} % of it {waited})")  # fmt: skip
    print(f"(a)/(b) = {rate['a'] / rate['b']:.3f}   (target >= 0.97: the data path's cost)")
    print(f"(a)/(c) = {rate['a'] / rate['c']:.1f}   (training from the cache against encoding every step)")
    print(f"data wait in (a): {100 * results['a'][1] / results['a'][0]:.2f} % of the step time (target < 1 %)")


if __name__ == "__main__":
    main()
