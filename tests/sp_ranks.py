"""Run by tests/test_sequence_parallel.py in a fresh interpreter: 2 gloo ranks, one SP group.

Each rank builds the same debug model twice (seed 0): one runs the whole batch alone, the
other is split across the 2 ranks with `pipelines.sequence_parallel.install`. The loss of a
diffusion training step must agree, and the SP gradients, averaged over the group as
DeepSpeed averages them, must equal the single-device ones. Prints one JSON line per case
from rank 0: the largest difference of a gradient entry and the relative difference of all gradients (L2).
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.models import size_inputs
from pipelines.sequence_parallel import install
from pipelines.trainer import apply_activation_checkpointing
from sora_model.diffusion import build_scheduler
from sora_model.sizes import MODEL_SIZES
from sora_model.stdit import MODELS

CAPTION_CHANNELS, CAPTION_LENGTH = 32, 8
# (model type, latent (T, H, W), with a frame mask, activation checkpointing, sp_split): split by
# space, a grid of 3 x 5 patches (15 tokens a frame, padded to 16 for 2 ranks), one of 4 x 4, an
# image; split by time, 4 frames (RoPE over time for STDiT2, the temporal position table for STDiT).
CASES = [
    ("debug", (4, 6, 10), True, False, "space"),
    ("debug", (3, 8, 8), False, True, "space"),
    ("debug", (1, 6, 10), False, False, "space"),
    ("debug-stdit", (4, 6, 10), True, False, "space"),
    ("debug-stdit", (2, 8, 8), False, True, "space"),
    ("debug", (4, 6, 10), True, False, "time"),
    ("debug", (4, 8, 8), False, True, "time"),
    ("debug-stdit", (4, 6, 10), True, True, "time"),
]


def batch(model_type: str, latent: tuple[int, int, int], frame_mask: bool) -> dict:
    generator = torch.Generator().manual_seed(1)
    frames, height, width = latent
    out = {
        "x": torch.randn(2, 4, frames, height, width, generator=generator),
        "y": torch.randn(2, CAPTION_LENGTH, CAPTION_CHANNELS, generator=generator),
        "y_mask": torch.tensor([[True] * CAPTION_LENGTH, [True] * 5 + [False] * 3]),
        "t": torch.tensor([100, 900]),
        "noise": torch.randn(2, 4, frames, height, width, generator=generator),
    }
    if frame_mask:
        out["x_mask"] = torch.ones(2, frames, dtype=torch.bool)
        out["x_mask"][0, 0] = False  # the first frame of sample 0 conditions
    values = dict(height=8.0 * height, width=8.0 * width, num_frames=float(frames), fps=24.0, ar=width / height)
    out["sizes"] = size_inputs(
        model_type, 2, torch.device("cpu"), **{k: torch.full((2,), v) for k, v in values.items()}
    )
    return out


def loss_and_grads(model, diffusion, data: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()

    def model_fn(x_t, t, x_mask):
        return model(x_t, t, data["y"], data["y_mask"], x_mask, **data["sizes"])

    loss = diffusion.training_losses(model_fn, data["x"], data["t"], data["noise"], data.get("x_mask"))["loss"].mean()
    loss.backward()
    # Names as the state_dict has them (activation checkpointing's wrapper adds a level)
    grads = {name.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
             for name, p in model.named_parameters() if p.grad is not None}  # fmt: skip
    return loss.detach(), grads


def build(model_type: str, latent: tuple[int, int, int]):
    torch.manual_seed(0)
    size = MODEL_SIZES[model_type]
    options = {"input_size": latent} if model_type == "debug-stdit" else {"qk_norm": True}
    model = MODELS[size.family](size, caption_channels=CAPTION_CHANNELS, model_max_length=CAPTION_LENGTH, **options)
    for parameter in model.parameters():  # initialize_weights zeroes the final layer and gates
        parameter.data.add_(0.02 * torch.randn(parameter.shape))
    return model.train()


def rank_main(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    diffusion = build_scheduler("iddpm", timestep_respacing="")
    for model_type, latent, frame_mask, checkpointing, split_along in CASES:
        reference = build(model_type, latent)
        split = copy.deepcopy(reference)
        if checkpointing:
            apply_activation_checkpointing(split)
        install(split, dist.group.WORLD, 2, split_along)
        data = batch(model_type, latent, frame_mask)
        torch.manual_seed(5)  # caption dropout: the same draw in both models
        loss, grads = loss_and_grads(reference, diffusion, data)
        torch.manual_seed(5)
        split_loss, split_grads = loss_and_grads(split, diffusion, data)
        worst, squared_diff, squared = 0.0, 0.0, 0.0
        for name, grad in grads.items():
            averaged = split_grads[name]
            dist.all_reduce(averaged)
            averaged /= 2  # DeepSpeed's average over the world
            worst = max(worst, float((averaged - grad).abs().max()))
            squared_diff += float((averaged - grad).square().sum())
            squared += float(grad.square().sum())
        exchanged = sorted({name.split(".")[-1] for name, module in split.named_modules()
                            if type(module).__name__.startswith("Ulysses")})  # fmt: skip
        state_keys = sorted(split.state_dict()) == sorted(reference.state_dict()) and grads.keys() == split_grads.keys()
        if rank == 0:
            report = {
                "case": [model_type, list(latent), frame_mask, checkpointing, split_along],
                "loss": float(loss),
                "loss_diff": abs(float(loss) - float(split_loss)),
                "grad_max_diff": worst,
                "grad_rel_diff": (squared_diff / squared) ** 0.5,
                "grads": len(grads),
                "state_keys_equal": state_keys,
                "exchanged": exchanged,
            }
            print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank_main, args=(int(sys.argv[1]),), nprocs=2)
