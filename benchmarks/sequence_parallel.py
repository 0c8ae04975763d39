"""Sequence parallelism: activation memory per worker and step time, sp_size 1 against 2, side by side.

One training step (forward, backward) of a model on a batch of one video, run by `sp` processes
that split its tokens (`pipelines.sequence_parallel`), each with one CPU thread (gloo) or one GPU
(NCCL, when there are at least `sp` GPUs; bf16 autocast). Per worker it reports the activations
saved for the backward pass (tensors other than the weights, counted once per storage), the
peak memory (max RSS on CPU, max allocated on CUDA) and the seconds per step; the ratios are
against sp_size 1. Each sp_size above 1 runs once per layout of `--split` (space, time).

    python benchmarks/sequence_parallel.py [--size debug] [--latent 16 32 32] [--sp 1 2] [--split space time]
    python benchmarks/sequence_parallel.py --size STDiT-XL/2 --latent 64 64 64   # 64x512x512, on GPUs
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CAPTION, REAL_TOKENS = 120, 20


class SavedActivations:
    """Bytes of the tensors autograd keeps for backward, weights excepted, each storage once."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.weights:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def worker(rank: int, sp: int, split: str, args: argparse.Namespace, port: int, results) -> None:
    from pipelines.models import size_inputs
    from pipelines.sequence_parallel import install
    from sora_model.sizes import MODEL_SIZES, Family
    from sora_model.stdit import build_model

    cuda = args.device == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=sp)
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    frames, height, width = args.latent
    text_dim = 64 if args.size.startswith("debug") else 4096
    torch.manual_seed(0)
    fixed = MODEL_SIZES[args.size].family is not Family.STDIT2
    model = build_model(args.size, text_dim, CAPTION, **({"input_size": tuple(args.latent)} if fixed else {}))
    model = model.to(device).train()
    if sp > 1:
        install(model, dist.group.WORLD, sp, split)
    x = torch.randn(1, 4, frames, height, width, device=device)
    y = torch.randn(1, CAPTION, text_dim, device=device)
    y_mask = (torch.arange(CAPTION, device=device) < REAL_TOKENS)[None]  # (1, L)
    t = torch.tensor([500], device=device)
    sizes = size_inputs(args.size, 1, device, height=8.0 * height, width=8.0 * width, num_frames=frames, fps=24,
                        ar=width / height)  # fmt: skip
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    saved = SavedActivations(model)

    def step() -> None:
        with autocast, saved.hooks():
            out = model(x, t, y, y_mask, **sizes)
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures = torch.tensor([float(saved.total), float(peak), seconds], dtype=torch.float64, device=device)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)  # the most loaded worker
    if rank == 0:
        results.put(figures.tolist())
    dist.destroy_process_group()


def run(sp: int, split: str, args: argparse.Namespace, port: int) -> list[float]:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(worker, args=(sp, split, args, port, results), nprocs=sp, start_method="spawn")
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="debug", help="a model type of sora_model/sizes.py (STDiT or STDiT2)")
    parser.add_argument("--latent", type=int, nargs=3, default=[16, 32, 32], metavar=("T", "H", "W"))
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--split", nargs="+", choices=["space", "time"], default=["space", "time"],
                        help="sp_split layouts to run for each sp_size above 1")  # fmt: skip
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.device_count() >= max(args.sp) else "cpu"
    frames, height, width = args.latent
    tokens = frames * -(-height // 2) * -(-width // 2)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU, 1 thread per worker"
    print(f"{args.size}, latent {frames}x{height}x{width} ({tokens} tokens), batch 1, forward + backward; {where}")
    print(
        f"{'sp_size':>7} {'split':>6} {'activations MiB':>16} {'ratio':>6} {'peak MiB':>9} {'ratio':>6} "
        f"{'s/step':>7} {'ratio':>6}"
    )
    runs = [(sp, split) for sp in args.sp for split in (args.split if sp > 1 else ["-"])]
    base = None
    for index, (sp, split) in enumerate(runs):
        activations, peak, seconds = run(sp, "space" if split == "-" else split, args, 29600 + index)
        base = base or (activations, peak, seconds)
        print(f"{sp:>7} {split:>6} {activations / 2**20:>16.1f} {activations / base[0]:>6.2f} {peak / 2**20:>9.1f} "
              f"{peak / base[1]:>6.2f} {seconds:>7.2f} {seconds / base[2]:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
