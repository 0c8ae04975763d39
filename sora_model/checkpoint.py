"""Model weights from a file or folder: Open-Sora `.pth`/`.pt`, safetensors, or a checkpoint folder."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sora_model.errors import ModelLoadError

# File names looked for in a folder, best first (EMA weights are what one samples with).
FOLDER_FILES = ("ema.safetensors", "model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin")
# Keys some trainers wrap a state dict in.
WRAPPERS = ("ema", "model", "state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint. `.pth`/`.pt`/`.bin` load with weights_only=True: no code runs."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in FOLDER_FILES if (path / name).is_file()), None)
        if found is None:
            raise ModelLoadError(f"no weights in {path}: expected one of {', '.join(FOLDER_FILES)}")
        path = found
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file: say which, keep the cause
        raise ModelLoadError(f"cannot read checkpoint {path}: {error}") from error
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in WRAPPERS if k in state), None)
        if key is None:
            raise ModelLoadError(f"{path}: no tensors found (top-level keys: {', '.join(list(state)[:8])})")
        state = state[key]
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights strictly: every parameter name and shape must match the model.

    Two things are fitted rather than refused, as Open-Sora's own loader does: the sin-cos
    position buffers of STDiT (recomputed for the model's input size) and the null caption
    (`y_embedder.y_embedding`, cut or extended by its last row to the model's max length).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    for key in ("pos_embed", "pos_embed_temporal", "pos_embed_spatial"):
        if key in own:
            state[key] = own[key]  # deterministic values, recomputed for this input size
        else:
            state.pop(key, None)
    null_key = "y_embedder.y_embedding"
    if null_key in state and null_key in own and state[null_key].shape != own[null_key].shape:
        have, want = state[null_key].shape[0], own[null_key].shape[0]
        warnings.warn(f"{path}: null caption has {have} tokens, the model {want}; fitting it", stacklevel=2)
        fitted = state[null_key][:want]
        if have < want:
            fitted = torch.cat([fitted, fitted[-1:].repeat(want - have, 1)])
        state[null_key] = fitted
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            problems.append(f"other shapes for {len(mismatched)} (e.g. {'; '.join(mismatched[:3])})")
        raise ModelLoadError(f"{path} does not fit this model: {'; '.join(problems)}; is model.type right?")
    model.load_state_dict(state, strict=True)
