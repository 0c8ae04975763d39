"""The GPU check: one command, one table, a few minutes on one GPU (`make gpu-check`).

    python benchmarks/gpu_check.py            # on a CUDA machine: the full check, ~5 min on an H100/H200
    python benchmarks/gpu_check.py --smoke    # every step at toy sizes on CPU (what the tests run)

Rows (CUDA, bf16):
- SDPA backends that run for bf16 attention (flash, memory-efficient), and whether flash-attn is installed;
- STDiT-XL/2 forward + backward at 16x256x256 (batch 8): samples/s and MFU; again with the
  blocks under `torch.compile` (the config's `model.compile_blocks`);
- STDiT2-XL/2 forward + backward at Open-Sora 1.1's 240p, 16-frame bucket (240x426, batch 4);
- one 16x512x512 sample: 100 guided IDDPM steps and 30 guided rflow steps (seconds);
- SD VAE encode, frames/s (batches of 32 frames of 256x256), and T5-XXL encode, samples/s
  (batches of 8 captions of 120 tokens), both at random weights: the compute is real;
- 20 training steps of STDiT-XL/2 16x256x256 through the project's own path: a cache on disk,
  `CacheBatches` in the prefetch thread, DeepSpeed ZeRO-2 in bf16 (world size 1): samples/s and
  the share of step time spent waiting for data.

It needs torch, the project's code and, for some rows, diffusers, transformers and DeepSpeed;
Ray is not needed. A missing package skips its rows and says which. Wheels placed in
`gpu-wheels/` (`make gpu-wheels`) whose package is missing are installed into gpu-wheels/site
first, for machines without a network; nothing the machine has is replaced.
MFU is against the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s; `--peak-tflops` to set it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WHEELS = ROOT / "gpu-wheels"
# Dense bf16 peaks (TFLOP/s) by a part of the device name.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0}
CAPTION, REAL_TOKENS = 120, 20


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The FLOP count of benchmarks/model.py and the SD VAE / T5 geometries of benchmarks/train.py.
MODEL_BENCH = _module("model_bench", ROOT / "benchmarks" / "model.py")
TRAIN_BENCH = _module("train_bench", ROOT / "benchmarks" / "train.py")


@dataclass(frozen=True)
class Sizes:
    """What the check runs at: the real sizes on CUDA, toy ones for --smoke on CPU."""

    model: str
    model2: str
    text_dim: int
    train_latent: tuple[int, int, int]  # (T, h, w) of 16x256x256
    train_batch: int
    bucket_latent: tuple[int, int, int]  # 240p, 16 frames: 240x426 -> 30x53
    bucket_batch: int
    sample_latent: tuple[int, int, int]  # 16x512x512
    iddpm_steps: int
    rflow_steps: int
    vae_frames: int
    vae_side: int
    t5: str
    t5_batch: int
    engine_steps: int
    dtype: torch.dtype


FULL = Sizes("STDiT-XL/2", "STDiT2-XL/2", 4096, (16, 32, 32), 8, (16, 30, 53), 4, (16, 64, 64), 100, 30, 32, 256,
             "xxl", 8, 20, torch.bfloat16)  # fmt: skip
SMOKE = Sizes("debug", "debug", 64, (2, 8, 8), 2, (2, 8, 10), 2, (2, 8, 8), 3, 3, 2, 64, "base", 2, 3,
              torch.float32)  # fmt: skip


@dataclass
class Row:
    name: str
    value: str
    note: str = ""


class Check:
    def __init__(self, sizes: Sizes, device: torch.device, peak_tflops: float | None) -> None:
        self.sizes, self.device, self.peak = sizes, device, peak_tflops
        self.rows: list[Row] = []

    def run(self, name: str, measure: Callable[[], tuple[str, str]]) -> None:
        """One row: `measure` returns (value, note); a missing package or an error is its own row."""
        started = time.perf_counter()
        try:
            value, note = measure()
        except ModuleNotFoundError as error:
            value, note = "skipped", f"{error.name} is not installed (put its wheel in gpu-wheels/)"
        except Exception as error:  # the check goes on to the next row
            traceback.print_exc()
            value, note = "FAILED", f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        row = Row(name, value, f"{note} [{time.perf_counter() - started:.0f} s]".strip())
        self.rows.append(row)
        print(f"{row.name:<44} {row.value:>16}  {row.note}", flush=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def mfu(self, flops: float, seconds: float) -> str:
        if self.peak is None:
            return f"{flops / seconds / 1e12:.1f} TFLOP/s"
        return f"{flops / seconds / 1e12:.1f} TFLOP/s, MFU {flops / seconds / 1e12 / self.peak:.1%}"


def _model(size: str, text_dim: int, latent: tuple[int, int, int], device, dtype):
    from sora_model.sizes import MODEL_SIZES, Family
    from sora_model.stdit import build_model

    torch.manual_seed(0)
    options = {} if MODEL_SIZES[size].family is Family.STDIT2 else {"input_size": latent}
    return build_model(size, text_dim, CAPTION, **options).to(device, dtype)


def _inputs(size: str, batch: int, latent, text_dim: int, device, dtype) -> tuple:
    from pipelines.models import size_inputs

    x = torch.randn(batch, 4, *latent, device=device, dtype=dtype)
    y = torch.randn(batch, CAPTION, text_dim, device=device, dtype=dtype)
    mask = torch.zeros(batch, CAPTION, dtype=torch.bool, device=device)
    mask[:, :REAL_TOKENS] = True
    height, width = latent[1] * 8, latent[2] * 8
    sizes = size_inputs(size, batch, device, dtype, height=height, width=width, num_frames=latent[0], fps=24,
                        ar=height / width)  # fmt: skip
    return x, y, mask, sizes


def sdpa_backends(check: Check) -> tuple[str, str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 16, 1024, 72, device=check.device, dtype=check.sizes.dtype)
    working = []
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}  # fmt: skip
    for name, backend in backends.items():
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            working.append(name)
        except RuntimeError:
            pass
    flash_attn = importlib.util.find_spec("flash_attn") is not None
    if check.device.type == "cuda":
        assert "flash" in working or "efficient" in working, f"only {working} run for bf16 attention"
    return ", ".join(working), f"flash-attn package {'installed' if flash_attn else 'absent'}"


def forward_backward(check: Check, size: str, latent, batch: int, compiled: bool = False) -> tuple[str, str]:
    sizes = check.sizes
    model = _model(size, sizes.text_dim, latent, check.device, sizes.dtype).train()
    if compiled:
        from pipelines.models import compile_blocks

        compile_blocks(model)
    x, y, mask, extra = _inputs(size, batch, latent, sizes.text_dim, check.device, sizes.dtype)
    t = torch.full((batch,), 500, device=check.device)

    def step() -> None:
        model(x, t, y, mask, **extra).float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocations, kernels, compilation
        step()
    check.sync()
    steps = 5 if check.device.type == "cuda" else 1
    started = time.perf_counter()
    for _ in range(steps):
        step()
    check.sync()
    seconds = (time.perf_counter() - started) / steps
    tokens = latent[0] * -(-latent[1] // 2) * -(-latent[2] // 2)
    flops = batch * MODEL_BENCH.model_flops(model, tokens, latent[0])
    return f"{batch / seconds:.2f} samples/s", f"batch {batch}, {check.mfu(flops, seconds)}"


def sampling(check: Check, kind: str, steps: int) -> tuple[str, str]:
    from sora_model.diffusion import build_scheduler

    sizes = check.sizes
    model = _model(sizes.model, sizes.text_dim, sizes.sample_latent, check.device, sizes.dtype).eval()
    x, y, mask, extra = _inputs(sizes.model, 2, sizes.sample_latent, sizes.text_dim, check.device, torch.float32)
    noise, y, mask = x[:1], y[:1], mask[:1]  # one video; `extra` is sized for the guidance batch of 2
    both = torch.cat([y, model.null_caption(1, CAPTION).to(y)]).to(sizes.dtype)
    masks = torch.cat([mask, mask])

    def model_fn(x, t, x_mask):  # the guidance batch: [caption; null caption]
        return model(x.to(sizes.dtype), t, both, masks, x_mask, **extra).float()

    scheduler = build_scheduler(kind, steps, 7.0)
    with torch.no_grad():
        started = time.perf_counter()
        scheduler.sample(model_fn, noise, generator=torch.Generator(check.device).manual_seed(0))
        check.sync()
    seconds = time.perf_counter() - started
    t, h, w = sizes.sample_latent
    return f"{seconds:.1f} s", f"{t}x{h * 8}x{w * 8}, {steps} steps, guidance (batch 2)"


def vae_encode(check: Check) -> tuple[str, str]:
    sizes = check.sizes
    vae = TRAIN_BENCH.sd_vae().to(check.device, sizes.dtype).eval()
    frames = torch.randn(sizes.vae_frames, 3, sizes.vae_side, sizes.vae_side, device=check.device, dtype=sizes.dtype)
    with torch.no_grad():
        vae.encode(frames)  # warm-up
        check.sync()
        started = time.perf_counter()
        for _ in range(3):
            vae.encode(frames).latent_dist.sample()
        check.sync()
    seconds = (time.perf_counter() - started) / 3
    return f"{sizes.vae_frames / seconds:.1f} frames/s", f"batches of {sizes.vae_frames} at {sizes.vae_side}^2"


def t5_encode(check: Check) -> tuple[str, str]:
    sizes = check.sizes
    with torch.device(check.device):
        t5 = TRAIN_BENCH.t5_encoder(sizes.t5, 32128).to(sizes.dtype).eval()
    tokens = torch.randint(0, 32128, (sizes.t5_batch, CAPTION), device=check.device)
    with torch.no_grad():
        t5(input_ids=tokens)
        check.sync()
        started = time.perf_counter()
        for _ in range(3):
            t5(input_ids=tokens)
        check.sync()
    seconds = (time.perf_counter() - started) / 3
    return f"{sizes.t5_batch / seconds:.1f} samples/s", f"T5-{sizes.t5} encoder, {CAPTION} tokens"


def write_cache(folder: Path, sizes: Sizes, samples: int) -> Path:
    """A cache of random latents and captions in the project's format, one fixed-size bucket."""
    import pyarrow as pa

    from pipelines import cache

    frames, h, w = sizes.train_latent
    bucket = f"{h * 8}x{w * 8}-{frames}f-{h / w:.2f}"
    rows = []
    generator = torch.Generator().manual_seed(0)
    for index in range(samples):
        mean = torch.randn(4, frames, h, w, generator=generator).to(torch.bfloat16)
        logvar = torch.full_like(mean, -4.0)
        text = torch.randn(REAL_TOKENS, sizes.text_dim, generator=generator).to(torch.bfloat16)
        (mean_bytes, shape, dtype), (logvar_bytes, _, _) = cache.tensor_to_bytes(mean), cache.tensor_to_bytes(logvar)
        text_bytes, text_shape, text_dtype = cache.tensor_to_bytes(text)
        rows.append({
            cache.ID: f"sample-{index:04d}", cache.PATH: f"clip_{index:04d}.mp4", cache.TEXT: "a caption",
            cache.RESOLUTION: f"{h * 8}x{w * 8}", cache.NUM_FRAMES: frames, cache.ASPECT: f"{h / w:.2f}",
            cache.HEIGHT: h * 8, cache.WIDTH: w * 8, cache.SRC_NUM_FRAMES: 3 * frames, cache.SRC_HEIGHT: h * 8,
            cache.SRC_WIDTH: w * 8, cache.SRC_FPS: 24.0, cache.FPS: 8.0, cache.LATENT_MEAN: mean_bytes,
            cache.LATENT_LOGVAR: logvar_bytes, cache.LATENT_SHAPE: shape, cache.LATENT_DTYPE: dtype,
            cache.TEXT_EMB: text_bytes, cache.TEXT_SHAPE: text_shape, cache.TEXT_DTYPE: text_dtype,
            cache.NUM_TOKENS: REAL_TOKENS, cache.LATENT_KEY: f"latent-{index}", cache.TEXT_KEY: "text",
        })  # fmt: skip
    version = "v-gpu-check"
    store, shard = cache.Store(folder), f"{version}/{cache.BUCKETS_DIR}/{bucket}/part-00000.arrow"
    data = cache.table_bytes(pa.Table.from_pylist(rows, cache.SAMPLE_SCHEMA))
    store.write_bytes(shard, data)
    store.write_json(cache.MANIFEST, {"format_version": cache.FORMAT_VERSION, "version": version, "fingerprint": {},
                                      "buckets": {bucket: samples}, "rows_in": samples, "kept": samples,
                                      "shards": {shard: cache.shard_record(data, samples)}})  # fmt: skip
    return folder


def engine_steps(check: Check) -> tuple[str, str]:
    import deepspeed  # noqa: F401  (skips the row, by name, where it is missing)

    from pipelines.cache import Cache
    from pipelines.config import load_config
    from pipelines.device import DevicePlan
    from pipelines.train_data import CacheBatches, Prefetcher, plan_epoch, seed_of
    from pipelines.trainer import build_training, single_process_group

    sizes = check.sizes
    frames, h, w = sizes.train_latent
    cuda = check.device.type == "cuda"
    dtype = "bf16" if cuda else "fp32"
    with tempfile.TemporaryDirectory() as folder:
        config_text = (
            f"num_frames = {frames}\nimage_size = ({h * 8}, {w * 8})\nbatch_size = {sizes.train_batch}\n"
            f'dtype = "{dtype}"\nmodel = dict(type="{sizes.model}")\ndata_path = "unused.csv"\n'
            f'text_encoder = dict(from_pretrained="unused", model_max_length={CAPTION})\n'
        )
        (Path(folder) / "train.py").write_text(config_text)
        config = load_config(Path(folder) / "train.py", "train")
        data = CacheBatches(Cache(write_cache(Path(folder) / "cache", sizes, 4 * sizes.train_batch)))
        plan = plan_epoch(data.train_rows(), data.batch_sizes(config.buckets), 0, 0, 1)
        steps = sizes.engine_steps
        refs = [plan.batches[0][i % plan.steps] for i in range(steps + 2)]
        device = DevicePlan(cuda, dtype, dtype)
        with single_process_group(device.backend):
            engine, _, diffusion = build_training(config, sizes.text_dim, device, with_ema=False)
            loads = (data.load(ref, torch.Generator().manual_seed(seed_of(0, 0, i, 0))) for i, ref in enumerate(refs))
            prefetcher = Prefetcher(loads, pin_memory=cuda)
            try:
                seconds, waited, samples = TRAIN_BENCH.timed_steps(engine, diffusion, config.model.type, prefetcher,
                                                                   steps, 2)  # fmt: skip
            finally:
                prefetcher.close()
    return (f"{samples / seconds:.2f} samples/s",
            f"{steps} steps, batch {sizes.train_batch}, DeepSpeed ZeRO-2 {dtype}, data wait "
            f"{100 * waited / seconds:.2f} %")  # fmt: skip


def install_wheels() -> None:
    """Make the packages of gpu-wheels/ importable where they are missing: installed into
    gpu-wheels/site (no system change, no network), which goes last on sys.path, so a package
    the machine has (its torch) always wins."""
    import importlib.metadata

    site = WHEELS / "site"
    if str(site) not in sys.path:
        sys.path.append(str(site))
    importlib.invalidate_caches()

    def installed(wheel: Path) -> bool:
        try:
            importlib.metadata.version(wheel.name.split("-")[0])
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    missing = [wheel for wheel in sorted(WHEELS.glob("*.whl")) if not installed(wheel)] if WHEELS.is_dir() else []
    if not missing:
        return
    print(f"installing {len(missing)} wheel(s) into {site}: {', '.join(w.name for w in missing)}")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                             "--upgrade", "--target", str(site), *map(str, missing)])  # fmt: skip
    importlib.invalidate_caches()
    if result.returncode != 0:
        print("warning: some wheels did not install (made for another Python?); rows that need them are skipped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every step at toy sizes, on CPU if there is no GPU")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: by its name)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    install_wheels()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    peak = args.peak_tflops or next((value for key, value in PEAK_TFLOPS.items() if key in name), None)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: {name}"
          + (f", dense bf16 peak {peak} TFLOP/s" if peak else ""), flush=True)  # fmt: skip
    present = {
        pkg: importlib.util.find_spec(pkg) is not None for pkg in ("deepspeed", "diffusers", "flash_attn", "ray")
    }
    print("packages: " + ", ".join(f"{pkg} {'yes' if ok else 'no'}" for pkg, ok in present.items()), flush=True)
    if not cuda and not args.smoke:
        print("no CUDA device: the rest of the check needs one (`--smoke` runs every step at toy sizes on CPU)")
        return 2
    sizes = FULL if cuda and not args.smoke else SMOKE
    check = Check(sizes, device, peak if cuda else None)
    print(f"\n{'row':<44} {'value':>16}  notes", flush=True)
    check.run("SDPA backends running bf16 attention", lambda: sdpa_backends(check))
    train_shape = "x".join(str(n * 8 if i else n) for i, n in enumerate(sizes.train_latent))
    check.run(f"{sizes.model} fwd+bwd {train_shape}",
              lambda: forward_backward(check, sizes.model, sizes.train_latent, sizes.train_batch))  # fmt: skip
    check.run(f"{sizes.model} fwd+bwd {train_shape}, compiled blocks",
              lambda: forward_backward(check, sizes.model, sizes.train_latent, sizes.train_batch, True))  # fmt: skip
    check.run(f"{sizes.model2} fwd+bwd 240p 16f bucket",
              lambda: forward_backward(check, sizes.model2, sizes.bucket_latent, sizes.bucket_batch))  # fmt: skip
    check.run(f"sample, IDDPM {sizes.iddpm_steps} steps", lambda: sampling(check, "iddpm", sizes.iddpm_steps))
    check.run(f"sample, rflow {sizes.rflow_steps} steps", lambda: sampling(check, "rflow", sizes.rflow_steps))
    check.run("SD VAE encode (random weights)", lambda: vae_encode(check))
    check.run(f"T5-{sizes.t5} encode (random weights)", lambda: t5_encode(check))
    check.run(f"training steps, cache -> DeepSpeed ({sizes.model})", lambda: engine_steps(check))
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in check.rows], indent=2) + "\n")
    failed = [row.name for row in check.rows if row.value == "FAILED"]
    print(
        f"\n{len(check.rows) - len(failed)} of {len(check.rows)} rows measured"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
