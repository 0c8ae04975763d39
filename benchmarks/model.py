"""STDiT forward + backward: time, tokens/s and peak memory, debug and XL sizes side by side.

One training step (forward, backward) on a 16x256x256 video, i.e. a 16x32x32 latent
(4,096 tokens with 1x2x2 patches), batch 1, attention through PyTorch SDPA, a 120-token
caption of which 20 are real. Each size runs in its own process so peak memory is its
own (max RSS on CPU, max allocated on CUDA). On CUDA it runs in bf16 and also reports
model FLOPs utilisation against the GPU's dense bf16 peak (--peak-tflops).

    python benchmarks/model.py [--sizes debug STDiT-XL/2] [--steps 2] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

LATENT = (16, 32, 32)  # (T, H, W) of a 16x256x256 video after the SD VAE
CAPTION, REAL_TOKENS = 120, 20


def model_flops(model, tokens: int, frames: int) -> float:
    """FLOPs of one forward + backward: 6 x parameters x tokens, plus the attention matmuls."""
    params = sum(p.numel() for p in model.parameters())
    dim, depth = model.size.hidden_size, model.size.depth
    spatial = tokens // frames
    attention = 4 * dim * (frames * spatial**2 + spatial * frames**2 + tokens * REAL_TOKENS)  # QK^T and AV
    return 6 * params * tokens + 3 * depth * attention


def measure(size: str, steps: int) -> dict:
    from pipelines.models import size_inputs
    from sora_model.sizes import MODEL_SIZES, Family
    from sora_model.stdit import build_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    text_dim = 64 if size == "debug" else 4096
    torch.manual_seed(0)
    options = {} if MODEL_SIZES[size].family is Family.STDIT2 else {"input_size": LATENT}  # fixed-size models
    model = build_model(size, text_dim, CAPTION, **options).to(device).train()
    x = torch.randn(1, 4, *LATENT, device=device)
    y = torch.randn(1, CAPTION, text_dim, device=device)
    mask = torch.zeros(1, CAPTION, dtype=torch.bool, device=device)
    mask[:, :REAL_TOKENS] = True
    t = torch.tensor([500], device=device)
    extra = size_inputs(size, 1, device, height=256, width=256, num_frames=16, fps=8, ar=1.0)  # STDiT2 only
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with autocast:
            out = model(x, t, y, mask, **extra)
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tokens = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "size": size,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_gib": peak / 2**30,
        "tflops": model_flops(model, tokens, LATENT[0]) / seconds / 1e12,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["debug", "STDiT-XL/2"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100: 989)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps)))
        return
    print(f"forward + backward, batch 1, latent {'x'.join(map(str, LATENT))} ({16 * 16 * 16} tokens), SDPA")
    print(f"{'size':<12} {'device':<24} {'params':>8} {'s/step':>8} {'tokens/s':>10} {'peak GiB':>9} {'TFLOP/s':>8}")
    for size in args.sizes:
        child = [sys.executable, __file__, "--child", size, "--steps", str(args.steps)]
        result = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        line = (f"{result['size']:<12} {result['device']:<24} {result['params_m']:>7.1f}M {result['seconds']:>8.2f} "
                f"{result['tokens_per_s']:>10.0f} {result['peak_gib']:>9.2f} {result['tflops']:>8.3f}")  # fmt: skip
        if result["device"] != "cpu":
            line += f"  MFU {result['tflops'] / args.peak_tflops:.1%}"
        print(line)


if __name__ == "__main__":
    main()
