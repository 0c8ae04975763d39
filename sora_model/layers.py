"""Building blocks shared by STDiT, STDiT2 (`stdit.py`) and DiT (`dit.py`): Open-Sora's `layers/blocks.py`.

Names follow the released checkpoints (`x_embedder.proj`, `t_embedder.mlp.0`, `y_embedder.y_proj.fc1`,
`attn.qkv`, `cross_attn.kv_linear`, ...) so their weights load with a plain `load_state_dict`.
Attention runs through PyTorch's scaled_dot_product_attention, or flash-attn when asked for,
installed and on CUDA. Shapes: B batch, N tokens, D hidden size, H heads, Dh = D / H, L caption tokens.
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

# --------------------------------------------------------------------------- helpers


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation as PixArt-alpha writes it (`t2i_modulate`): x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters (STDiT's norm1/norm2/norm_final have none)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


@functools.cache
def warn_once(message: str) -> None:
    """Warn with `message` the first time only (per process); `warn_once.cache_clear()` re-arms it."""
    warnings.warn(message, stacklevel=3)  # points at the caller of the function that warns


def caption_mask(y_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """(b, L) mask of real caption tokens -> (batch, L) bool. A guidance batch [cond; uncond]
    passes one mask for both halves (the null caption is as long as the caption): it is repeated."""
    if y_mask is None:
        return None
    if y_mask.shape[0] != batch:
        y_mask = y_mask.repeat(batch // y_mask.shape[0], 1)
    return y_mask.bool()


def sincos_embedding(
    dim: int, grid: tuple[int] | tuple[int, int], scale: float = 1.0, base_size: int | None = None
) -> torch.Tensor:
    """Fixed sin-cos position table, (prod(grid), dim) float64, for the frames (T,) or one frame's (H, W).

    MAE's get_1d/2d_sincos_pos_embed as Open-Sora uses them: positions 0..n-1 are divided by `scale`
    (space_scale or time_scale: new size / old size) and, with `base_size`, stretched by base_size / n
    so that another resolution reuses the trained range (STDiT2). Each axis fills dim / len(grid)
    channels, sines then cosines; on an (H, W) grid rows are h-major and the first half embeds w.
    Open-Sora computes 2D positions in float32 and 1D ones in float64; kept, so the tables equal its own.
    """
    dtype = np.float64 if len(grid) == 1 else np.float32
    axes = [np.arange(n, dtype=dtype) / scale for n in grid]
    if base_size is not None:
        axes = [axis * (base_size / n) for axis, n in zip(axes, grid, strict=True)]
    coordinates = np.meshgrid(*axes[::-1])  # [w, h], each (H, W); or [t]
    channels = dim // len(grid)
    omega = 1.0 / 10000 ** (np.arange(channels // 2, dtype=np.float64) / (channels / 2.0))
    angles = [np.outer(coordinate.reshape(-1), omega) for coordinate in coordinates]
    return torch.from_numpy(np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=1))


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim), cosines first.

    Not `sincos_embedding`: DiT's (GLIDE's) version runs in float32 torch on the timesteps' device,
    puts cosines first and writes the frequencies as exp(-log(max_period) i / half); the trained
    t_embedder expects exactly these values.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# --------------------------------------------------------------------------- attention


def _flash_attention():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def attention(q, k, v, use_flash: bool, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, N, Dh) attention. flash-attn when asked for and possible (fp16/bf16 on CUDA, no mask);
    otherwise PyTorch SDPA, with one warning the first time flash-attn was asked for in vain."""
    if use_flash:
        flash = _flash_attention()
        usable = flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if usable and key_padding_mask is None:
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, N, H, Dh)
            return out.transpose(1, 2)
        if not usable:
            warn_once("enable_flashattn: flash-attn is not installed or the tensors are not fp16/bf16 on CUDA; "
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
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # (..., Dh) fp32
        return self.weight * normed.to(x.dtype)  # (..., Dh)


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
        qkv = self.qkv(x)  # (B, N, 3D)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)  # (B, H, N, Dh) each
        if rope is not None:  # Open-Sora 1.1 was trained with the rotation before the QK-norm; keep that order
            q, k = rope(q), rope(k)  # (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, Dh)
        out = attention(q, k, v, self.use_flash)  # (B, H, N, Dh)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


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
        q = rearrange(self.q_linear(x), "b n (h d) -> b h n d", h=self.num_heads)  # (B, H, N, Dh)
        kv = self.kv_linear(y)  # (B, L, 2D)
        k, v = rearrange(kv, "b l (two h d) -> two b h l d", two=2, h=self.num_heads)  # (B, H, L, Dh) each
        out = attention(q, k, v, self.use_flash, key_padding_mask=mask)  # (B, H, N, Dh)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class Mlp(nn.Module):
    """timm's Mlp (fc1, GELU, fc2), names kept for the checkpoints."""

    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (..., dim) -> (..., hidden) -> (..., out)


# --------------------------------------------------------------------------- embedders


class PatchEmbed3D(nn.Module):
    """(B, C, T, H, W) latents -> (B, T'*H'*W', D) tokens, zero-padded up to patch multiples."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size  # (1, 2, 2) for every released model
        _, _, frames, height, width = x.shape  # (B, C, T, H, W)
        x = F.pad(x, (0, (-width) % pw, 0, (-height) % ph, 0, (-frames) % pt))  # (B, C, T'*pt, H'*ph, W'*pw)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, T', H', W') -> (B, N, D), t-major, then h, then w


class TimestepEmbedder(nn.Module):
    """Timestep -> sinusoid (256) -> MLP -> (B, D)."""

    def __init__(self, dim: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        frequencies = timestep_embedding(t, self.frequency_size)  # (B, 256) fp32
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))  # (B, D)


class SizeEmbedder(TimestepEmbedder):
    """Each of k scalars (height, width, aspect ratio, frames, fps) -> sinusoid -> MLP; concatenated."""

    def forward(self, sizes: torch.Tensor) -> torch.Tensor:
        batch, count = sizes.shape  # (B, k)
        embedded = super().forward(sizes.reshape(-1))  # (B*k, D)
        return embedded.reshape(batch, count * embedded.shape[-1])  # (B, k*D)


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

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:  # y (B, L, C)
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob  # (B,)
            y = torch.where(drop[:, None, None], self.null(y.shape[0], y.shape[1]).to(y.dtype), y)  # (B, L, C)
        return self.y_proj(y)  # (B, L, D)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the sequence axis, pairs of dims interleaved
    (the rotary-embedding-torch layout Open-Sora 1.1 uses; `freqs` is in its checkpoints)."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)  # (N,) of x (..., N, Dh)
        angles = torch.repeat_interleave(positions[:, None] * self.freqs.float()[None], 2, dim=-1)  # (N, Dh)
        pairs = x.float().unflatten(-1, (-1, 2))  # (..., N, Dh/2, 2)
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (..., N, Dh): (-x1, x0) pairs
        return (x.float() * angles.cos() + rotated * angles.sin()).to(x.dtype)  # (..., N, Dh)


# --------------------------------------------------------------------------- what the models share


class VideoDiTMixin:
    """The methods STDiT, STDiT2 and DiT have alike, read off their `patch_size` and `y_embedder`:
    the patch grid of a latent, `unpatchify` (tokens back to a latent) and the null caption.
    It holds no parameters and has no __init__: each model builds its own modules."""

    patch_size: tuple[int, int, int]
    y_embedder: CaptionEmbedder

    def patch_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(B, C, T, H, W) latents -> (t, h, w) patches, counting the padded partial ones."""
        pt, ph, pw = self.patch_size
        _, _, frames, height, width = x.shape
        return math.ceil(frames / pt), math.ceil(height / ph), math.ceil(width / pw)

    def unpatchify(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        """(B, t*h*w, pt*ph*pw*C) tokens -> (B, C, t*pt, h*ph, w*pw)."""
        pt, ph, pw = self.patch_size
        return rearrange(x, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)

    def null_caption(self, batch: int, length: int | None = None) -> torch.Tensor:
        """The unconditional caption for classifier-free guidance: (batch, length, caption_channels)."""
        return self.y_embedder.null(batch, length)
