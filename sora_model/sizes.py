"""Model sizes by name: the `type=` strings of a config's `model = dict(...)` section.

A `type` picks an entry of this table; nothing is imported or registered by name.
The numbers are those of the released Open-Sora checkpoints (v1.0 STDiT-XL/2, v1.1
STDiT2-XL/2) and of DiT-XL/2, which Open-Sora lists as a baseline.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Family(enum.Enum):
    STDIT = "stdit"  # Open-Sora 1.0: fixed size, sin-cos position embeddings
    STDIT2 = "stdit2"  # Open-Sora 1.1: variable size, RoPE in time, size conditioning
    DIT = "dit"  # DiT with full 3D attention, as Open-Sora's baseline


@dataclass(frozen=True)
class ModelSize:
    family: Family
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) in latent pixels
    mlp_ratio: float = 4.0


MODEL_SIZES: dict[str, ModelSize] = {
    "STDiT-XL/2": ModelSize(Family.STDIT, depth=28, hidden_size=1152, num_heads=16),
    "STDiT2-XL/2": ModelSize(Family.STDIT2, depth=28, hidden_size=1152, num_heads=16),
    "DiT-XL/2": ModelSize(Family.DIT, depth=28, hidden_size=1152, num_heads=16),
    # Trains on 2 CPU cores in seconds; used by configs/debug and the tests.
    # (hidden size divisible by 3: STDiT2's size conditioning splits it in thirds)
    "debug": ModelSize(Family.STDIT2, depth=2, hidden_size=96, num_heads=4),
    # The same for Open-Sora 1.0's STDiT (fixed size): debug variants of its configs.
    "debug-stdit": ModelSize(Family.STDIT, depth=2, hidden_size=96, num_heads=4),
    # Learns the demo set's captions on 2 CPU cores in about an hour; configs/demo and `make
    # demo-model`. Open-Sora 1.0's STDiT: its absolute frame positions let the model place the
    # shape by frame (STDiT2 has only RoPE's relative ones); README, The demo model.
    "demo": ModelSize(Family.STDIT, depth=3, hidden_size=120, num_heads=4),
}
