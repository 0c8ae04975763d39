"""Loading pretrained parts by hub name or local folder, with errors a user can act on."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch

from sora_model.errors import ModelLoadError

T = TypeVar("T")

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config's `dtype` string (fp32, fp16, bf16)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None


def load_pretrained(what: str, name: str, load: Callable[[], T]) -> T:
    """Run a `from_pretrained` call, turning hub and file errors into one clear ModelLoadError.

    `name` is a hub id (`stabilityai/sd-vae-ft-ema`) or a local folder; both go through the
    very same `from_pretrained` call, so local copies of real models work unchanged.
    """
    try:
        return load()
    except (OSError, ValueError) as error:
        hints = []
        if not os.path.exists(name):
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                hints.append(
                    "HF_HUB_OFFLINE=1 is set and it is not in the Hugging Face cache; download it on a "
                    "machine with network access (huggingface-cli download) or point the config at a folder"
                )
            hints.append("`sora debug-models DIR` writes tiny stand-ins for tests and demos")
        hint = "; ".join(hints)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"cannot load the {what} {name!r}: {first_line}" + (f" ({hint})" if hint else "")
        ) from error
