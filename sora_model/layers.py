"""Building blocks of the STDiT family (Open-Sora's `layers/blocks.py`), with its parameter names.

Names follow the released checkpoints (`x_embedder.proj`, `t_embedder.mlp.0`, `y_embedder.y_proj.fc1`,
`attn.qkv`, `cross_attn.kv_linear`, `final_layer.scale_shift_table`, ...) so their weights load
with a plain `load_state_dict`. Attention runs through PyTorch's scaled_dot_product_attention,
or flash-attn when asked for, installed and on CUDA.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation as PixArt-alpha writes it (`t2i_modulate`): x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def frame_modulation(
    x_mask: torch.Tensor | None, normal: torch.Tensor, zero: torch.Tensor | None, spatial: int
) -> torch.Tensor:
    """(B, 1, D) modulation -> per token (B, T*S, D): condition frames (x_mask False) get the
    timestep-0 modulation `zero`. Without a mask, `normal` broadcasts over all tokens."""
    if x_mask is None or zero is None:
        return normal
    chosen = torch.where(x_mask[:, :, None], normal, zero)  # (B, T, D)
    return chosen.repeat_interleave(spatial, dim=1)  # (B, T*S, D)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters (STDiT's norm1/norm2/norm_final have none)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _flash_attention():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def attention(q, k, v, use_flash: bool, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, N, D) attention. flash-attn when asked for and possible (fp16/bf16 on CUDA, no mask);
    otherwise PyTorch SDPA, with one warning the first time flash-attn was asked for in vain."""
    if use_flash:
        flash = _flash_attention()
        usable = flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if usable and key_padding_mask is None:
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, N, H, D)
            return out.transpose(1, 2)
        if not usable:
            _warn_once("enable_flashattn: flash-attn is not installed or the tensors are not fp16/bf16 on CUDA; "
                       "using PyTorch scaled_dot_product_attention")  # fmt: skip
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class RMSNorm(nn.Module):
    """LlamaRMSNorm: normalise in fp32, scale by a learned weight (QK-norm in STDiT2)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Self-attention over the token axis, with optional QK-norm and a rotary embedding."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_flash: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.use_flash = use_flash
        self.qkv = nn.Linear(dim, 3 * dim)
        head_dim = dim // num_heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if rope is not None:
            # Open-Sora 1.1 was trained with the rotation before the QK-norm; keep that order.
            q, k = rope(q), rope(k)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, self.use_flash)  # (B, H, N, D)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Video tokens attend to their own caption's real tokens (`mask`: True = real token)."""

    def __init__(self, dim: int, num_heads: int, use_flash: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.use_flash = use_flash
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = rearrange(self.q_linear(x), "b n (h d) -> b h n d", h=self.num_heads)  # (B, H, N, D)
        k, v = rearrange(self.kv_linear(y), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        out = attention(q, k, v, self.use_flash, key_padding_mask=mask)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    """timm's Mlp (fc1, GELU, fc2), names kept for the checkpoints."""

    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed3D(nn.Module):
    """(B, C, T, H, W) latents -> (B, T'*H'*W', D) tokens, zero-padded up to patch multiples."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        x = F.pad(x, (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt))
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), t-major, then h, then w


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim), cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Timestep -> sinusoid (256) -> MLP -> (B, D)."""

    def __init__(self, dim: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """Each of d scalars (height, width, aspect ratio, frames, fps) -> sinusoid -> MLP; concatenated."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d * D)
        batch, count = s.shape
        embedded = super().forward(s.reshape(-1))  # (B*d, D)
        return embedded.reshape(batch, count * embedded.shape[-1])


class CaptionEmbedder(nn.Module):
    """Caption states (B, L, 4096) -> (B, L, D); owns caption dropout and the null caption.

    The null caption `y_embedding` is a learned-looking but fixed buffer (Open-Sora keeps it in
    the checkpoint): it replaces the whole caption with probability `dropout_prob` during
    training, and it is the unconditional input of classifier-free guidance.
    """

    def __init__(self, in_channels: int, dim: int, dropout_prob: float, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(in_channels, dim, dim)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.dropout_prob = dropout_prob

    def null(self, batch: int, length: int | None = None) -> torch.Tensor:
        """The null caption, (batch, length, in_channels), for guidance."""
        length = length or self.y_embedding.shape[0]
        return self.y_embedding[:length][None].expand(batch, -1, -1)

    def forward(self, y: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if (self.training and self.dropout_prob > 0) or force_drop is not None:
            drop = force_drop if force_drop is not None else torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop[:, None, None], self.null(y.shape[0], y.shape[1]).to(y.dtype), y)
        return self.y_proj(y)


class T2IFinalLayer(nn.Module):
    """adaLN-single final layer: norm, shift/scale from the raw timestep embedding, linear."""

    def __init__(self, dim: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x, t, x_mask=None, t0=None, frames: int = 1) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        out = modulate(layer_norm(x), shift, scale)
        if x_mask is not None and t0 is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            # Open-Sora normalises the already-modulated tokens here; kept for its checkpoints.
            zero = modulate(layer_norm(out), shift0, scale0)
            out = per_frame(x_mask, out, zero, frames)
        return self.linear(out)


def per_frame(x_mask: torch.Tensor, normal: torch.Tensor, zero: torch.Tensor, frames: int) -> torch.Tensor:
    """Token-wise choice between two (B, T*S, D) tensors by frame: x_mask (B, T), True = normal."""
    normal = rearrange(normal, "b (t s) d -> b t s d", t=frames)
    zero = rearrange(zero, "b (t s) d -> b t s d", t=frames)
    return rearrange(torch.where(x_mask[:, :, None, None], normal, zero), "b t s d -> b (t s) d")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the sequence axis, pairs of dims interleaved
    (the rotary-embedding-torch layout Open-Sora 1.1 uses; `freqs` is in its checkpoints)."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., N, D)
        positions = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        angles = torch.repeat_interleave(positions[:, None] * self.freqs.float()[None], 2, dim=-1)  # (N, D)
        pairs = x.float().unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
        return (x.float() * angles.cos() + rotated * angles.sin()).to(x.dtype)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(N,) positions -> (N, dim): sines then cosines (MAE's get_1d_sincos_pos_embed)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, height: int, width: int, scale: float = 1.0, base_size: int | None = None) -> np.ndarray:
    """(H*W, dim) row-major: the first half embeds the w coordinate, the second the h coordinate.

    Coordinates are divided by `scale` (space_scale: new height / old height) and, with a
    base_size, stretched to base_size so another resolution reuses the trained range.
    """
    grid_h = np.arange(height, dtype=np.float32) / scale
    grid_w = np.arange(width, dtype=np.float32) / scale
    if base_size is not None:
        grid_h *= base_size / height
        grid_w *= base_size / width
    w, h = np.meshgrid(grid_w, grid_h)  # (H, W) each
    return np.concatenate([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], axis=1)
