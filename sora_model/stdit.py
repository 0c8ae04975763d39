"""STDiT: the spatial-temporal diffusion transformer of Open-Sora 1.0, and STDiT2 of 1.1.

Latents (B, C, T, H, W) are cut into (1, 2, 2) patches. Every block runs spatial attention
over the tokens of one frame, temporal attention over the frames at one position,
cross-attention to the caption, and an MLP; all are modulated by the timestep through
adaLN-single (one shared MLP `t_block`, a per-block `scale_shift_table`).

- STDiT (1.0): fixed size, sin-cos position embeddings (scaled by `space_scale` and
  `time_scale`); the temporal branch reads the raw residual stream and reuses the spatial gate.
- STDiT2 (1.1): any size in one batch shape (padded to patch multiples, cropped back), a 2D
  position embedding normalised by resolution, RoPE in temporal attention, optional QK-norm,
  and conditioning on height, width, aspect ratio, frame count and fps.

Both take `x_mask` (B, T): False marks condition frames (image-to-video, long video), which
get the timestep-0 modulation. Parameter names equal Open-Sora's released checkpoints.
Ported from Open-Sora's `models/stdit/stdit.py`, `models/stdit/stdit2.py` and `models/layers/blocks.py`.

The file reads top to bottom: helpers, the two blocks, the final layer, STDiT, STDiT2, and
`build_model`, which picks one of them (or DiT, `dit.py`) by the sizes table (`sizes.py`).
Shapes: B batch, T frames, S = H*W tokens of one frame, N = T*S, D hidden size, L caption tokens.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from sora_model.dit import DiT
from sora_model.layers import (
    Attention,
    CaptionEmbedder,
    CrossAttention,
    Mlp,
    PatchEmbed3D,
    RotaryEmbedding,
    SizeEmbedder,
    TimestepEmbedder,
    VideoDiTMixin,
    caption_mask,
    layer_norm,
    modulate,
    sincos_embedding,
    warn_once,
)
from sora_model.sizes import MODEL_SIZES, Family, ModelSize

# STDiT2's conditioning values as Open-Sora 1.1 gives them, which its released weights learnt
# (its VariableVideoTextDataset and scripts/inference.py). Training: ar = width / height of the
# bucket, fps = the video file's own rate (UNKNOWN_FPS when the file does not say), IMAGE_FPS for an
# image. Sampling: ar = height / width, fps = the config's `fps` (IMAGE_FPS for one frame).
# The two aspect ratios are each other's inverse; the weights learnt both, so both stay.
IMAGE_FPS = 120.0
UNKNOWN_FPS = 24.0


def training_conditions(height: float, width: float, src_fps: float, image: bool) -> dict[str, float]:
    """Open-Sora 1.1's training ar and fps of one sample (its bucket's height and width)."""
    fps = IMAGE_FPS if image else (src_fps if src_fps > 0 else UNKNOWN_FPS)
    return {"ar": width / height, "fps": fps}


def sampling_conditions(height: float, width: float, num_frames: int, fps: float) -> dict[str, float]:
    """Open-Sora 1.1's sampling ar and fps for a config's image_size, num_frames and fps."""
    return {"ar": height / width, "fps": IMAGE_FPS if num_frames == 1 else fps}


# --------------------------------------------------------------------------- helpers


def split_modulation(table: torch.Tensor, t_modulation: torch.Tensor | None) -> list[torch.Tensor | None]:
    """adaLN-single: a block's table (k, D) + the shared t_block output (B, k*D) -> k x (B, 1, D)
    shift/scale/gate vectors; k x None when there is no such timestep (no x_mask, no t0)."""
    count = table.shape[0]
    if t_modulation is None:
        return [None] * count
    return list((table[None] + t_modulation.reshape(t_modulation.shape[0], count, -1)).chunk(count, dim=1))


def modulation_per_token(
    x_mask: torch.Tensor | None, normal: list, zero: list, tokens_per_frame: int
) -> list[torch.Tensor]:
    """k x (B, 1, D) modulations -> k x (B, T*S, D) where condition frames (x_mask (B, T) False)
    take the timestep-0 modulation `zero`. Without a mask, `normal` broadcasts over all tokens."""
    if x_mask is None or zero[0] is None:
        return normal
    return [
        torch.where(x_mask[:, :, None], generated, condition).repeat_interleave(tokens_per_frame, dim=1)  # (B, T*S, D)
        for generated, condition in zip(normal, zero, strict=True)
    ]


def select_frames(x_mask: torch.Tensor, normal: torch.Tensor, zero: torch.Tensor, frames: int) -> torch.Tensor:
    """Token-wise choice between two (B, T*S, D) tensors by frame: x_mask (B, T), True = normal."""
    normal = rearrange(normal, "b (t s) d -> b t s d", t=frames)
    zero = rearrange(zero, "b (t s) d -> b t s d", t=frames)
    return rearrange(torch.where(x_mask[:, :, None, None], normal, zero), "b t s d -> b (t s) d")


def initialize_weights(model: STDiT | STDiT2) -> None:
    """DiT/PixArt initialisation; the output projections of the new branches start at zero."""

    def basic(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    model.apply(basic)
    nn.init.xavier_uniform_(model.x_embedder.proj.weight.view(model.x_embedder.proj.weight.shape[0], -1))
    for layer in (model.t_embedder.mlp[0], model.t_embedder.mlp[2], model.t_block[1]):
        nn.init.normal_(layer.weight, std=0.02)
    nn.init.normal_(model.y_embedder.y_proj.fc1.weight, std=0.02)
    nn.init.normal_(model.y_embedder.y_proj.fc2.weight, std=0.02)
    for block in model.blocks:
        for layer in (block.cross_attn.proj, block.attn_temp.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


# --------------------------------------------------------------------------- blocks


class STDiTBlock(nn.Module):
    """Open-Sora 1.0: spatial attention, temporal attention (no norm, the spatial gate), cross-attention, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, use_flash: bool) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn = Attention(dim, num_heads, use_flash=use_flash)
        self.cross_attn = CrossAttention(dim, num_heads, use_flash=use_flash)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn_temp = Attention(dim, num_heads, use_flash=use_flash)

    def forward(
        self, x, y, y_mask, t_modulation, frames, temporal_pos_embed=None, x_mask=None, t0_modulation=None
    ) -> torch.Tensor:
        """x (B, T*S, D), y (B, L, D), y_mask (B, L), t_modulation and t0_modulation (B, 6D) -> (B, T*S, D)."""
        tokens_per_frame = x.shape[1] // frames  # S
        normal = split_modulation(self.scale_shift_table, t_modulation)  # 6 x (B, 1, D)
        zero = split_modulation(self.scale_shift_table, t0_modulation)  # 6 x (B, 1, D), or 6 x None
        modulation = modulation_per_token(x_mask, normal, zero, tokens_per_frame)  # 6 x (B, 1 or T*S, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation  # (B, 1 or T*S, D) each
        # spatial attention: the tokens of one frame
        x_modulated = modulate(layer_norm(x), shift_msa, scale_msa)  # (B, T*S, D)
        x_spatial = rearrange(x_modulated, "b (t s) d -> (b t) s d", t=frames)  # (B*T, S, D)
        x_spatial = self.attn(x_spatial)  # (B*T, S, D)
        x = x + gate_msa * rearrange(x_spatial, "(b t) s d -> b (t s) d", t=frames)  # (B, T*S, D)
        # temporal attention: one position across frames. Open-Sora 1.0 applies no norm here and
        # reuses the spatial gate, unmasked.
        x_temporal = rearrange(x, "b (t s) d -> (b s) t d", t=frames)  # (B*S, T, D)
        if temporal_pos_embed is not None:  # (1, T, D)
            x_temporal = x_temporal + temporal_pos_embed  # (B*S, T, D)
        x_temporal = self.attn_temp(x_temporal)  # (B*S, T, D)
        x = x + normal[2] * rearrange(x_temporal, "(b s) t d -> b (t s) d", s=tokens_per_frame)  # (B, T*S, D)
        # cross-attention to the caption, then the MLP
        x = x + self.cross_attn(x, y, y_mask)  # (B, T*S, D)
        x_modulated = modulate(layer_norm(x), shift_mlp, scale_mlp)  # (B, T*S, D)
        return x + gate_mlp * self.mlp(x_modulated)  # (B, T*S, D)


class STDiT2Block(nn.Module):
    """Open-Sora 1.1: as STDiTBlock, but temporal attention has its own norm, modulation and gate, and RoPE."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, use_flash: bool) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, use_flash=use_flash)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.cross_attn = CrossAttention(dim, num_heads, use_flash=use_flash)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn_temp = Attention(dim, num_heads, qk_norm=qk_norm, use_flash=use_flash)
        self.scale_shift_table_temporal = nn.Parameter(torch.randn(3, dim) / dim**0.5)

    def forward(
        self, x, y, y_mask, t_modulation, t_temporal, frames, rope, x_mask=None, t0_modulation=None, t0_temporal=None
    ) -> torch.Tensor:
        """x (B, T*S, D), y (B, L, D), y_mask (B, L); t_modulation (B, 6D) and t_temporal (B, 3D), the
        same at timestep 0 for condition frames -> (B, T*S, D)."""
        tokens_per_frame = x.shape[1] // frames  # S
        normal = split_modulation(self.scale_shift_table, t_modulation)  # 6 x (B, 1, D)
        normal += split_modulation(self.scale_shift_table_temporal, t_temporal)  # + 3 x (B, 1, D)
        zero = split_modulation(self.scale_shift_table, t0_modulation)  # 6 x (B, 1, D), or 6 x None
        zero += split_modulation(self.scale_shift_table_temporal, t0_temporal)  # + 3 x (B, 1, D), or 3 x None
        modulation = modulation_per_token(x_mask, normal, zero, tokens_per_frame)  # 9 x (B, 1 or T*S, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation[:6]  # (B, 1 or T*S, D) each
        shift_temporal, scale_temporal, gate_temporal = modulation[6:]  # (B, 1 or T*S, D) each
        # spatial attention: the tokens of one frame
        x_modulated = modulate(layer_norm(x), shift_msa, scale_msa)  # (B, T*S, D)
        x_spatial = rearrange(x_modulated, "b (t s) d -> (b t) s d", t=frames)  # (B*T, S, D)
        x_spatial = self.attn(x_spatial)  # (B*T, S, D)
        x = x + gate_msa * rearrange(x_spatial, "(b t) s d -> b (t s) d", t=frames)  # (B, T*S, D)
        # temporal attention: one position across frames, RoPE over T
        x_modulated = modulate(layer_norm(x), shift_temporal, scale_temporal)  # (B, T*S, D)
        x_temporal = rearrange(x_modulated, "b (t s) d -> (b s) t d", t=frames)  # (B*S, T, D)
        x_temporal = self.attn_temp(x_temporal, rope=rope)  # (B*S, T, D)
        x = x + gate_temporal * rearrange(x_temporal, "(b s) t d -> b (t s) d", s=tokens_per_frame)  # (B, T*S, D)
        # cross-attention to the caption, then the MLP
        x = x + self.cross_attn(x, y, y_mask)  # (B, T*S, D)
        x_modulated = modulate(layer_norm(x), shift_mlp, scale_mlp)  # (B, T*S, D)
        return x + gate_mlp * self.mlp(x_modulated)  # (B, T*S, D)


# --------------------------------------------------------------------------- final layer


class T2IFinalLayer(nn.Module):
    """adaLN-single final layer (PixArt's T2IFinalLayer): norm, shift/scale from the raw timestep embedding, linear."""

    def __init__(self, dim: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x, t, x_mask=None, t0=None, frames: int = 1) -> torch.Tensor:
        """x (B, T*S, D), t and t0 (B, D), x_mask (B, T) -> (B, T*S, patch volume * out_channels)."""
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        out = modulate(layer_norm(x), shift, scale)  # (B, T*S, D)
        if x_mask is not None and t0 is not None:  # x_mask (B, T), t0 (B, D)
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)  # (B, 1, D) each
            # Open-Sora normalises the already-modulated tokens here; kept for its checkpoints.
            zero = modulate(layer_norm(out), shift0, scale0)  # (B, T*S, D)
            out = select_frames(x_mask, out, zero, frames)  # (B, T*S, D)
        return self.linear(out)  # (B, T*S, patch volume * out_channels)


# --------------------------------------------------------------------------- the models


class STDiT(VideoDiTMixin, nn.Module):
    """Open-Sora 1.0's STDiT (fixed input size)."""

    def __init__(
        self,
        size: ModelSize,
        input_size: tuple[int, int, int] = (16, 32, 32),  # latent (T, H, W)
        in_channels: int = 4,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        class_dropout_prob: float = 0.1,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
        enable_flashattn: bool = False,
    ) -> None:
        super().__init__()
        dim = size.hidden_size
        self.size = size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels  # epsilon and the learned variance
        self.patch_size = size.patch_size
        self.space_scale, self.time_scale = space_scale, time_scale
        # Persistent buffers, as in Open-Sora's checkpoints; recomputed on load and for other sizes.
        self.grid = tuple(s // p for s, p in zip(input_size, size.patch_size, strict=True))  # trained (t, h, w)
        self.register_buffer("pos_embed", self._spatial_pos_embed(self.grid[1], self.grid[2]))
        self.register_buffer("pos_embed_temporal", self._temporal_pos_embed(self.grid[0]))
        self.x_embedder = PatchEmbed3D(size.patch_size, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = CaptionEmbedder(caption_channels, dim, class_dropout_prob, model_max_length)
        self.blocks = nn.ModuleList(
            STDiTBlock(dim, size.num_heads, size.mlp_ratio, enable_flashattn) for _ in range(size.depth)
        )
        self.final_layer = T2IFinalLayer(dim, math.prod(size.patch_size), self.out_channels)
        initialize_weights(self)

    def _spatial_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w, D); coordinates divided by space_scale (new height / old height)."""
        return sincos_embedding(self.size.hidden_size, (h, w), scale=self.space_scale).float()[None]

    def _temporal_pos_embed(self, t: int) -> torch.Tensor:
        """(1, t, D); frame positions divided by time_scale (new / old frame_interval)."""
        return sincos_embedding(self.size.hidden_size, (t,), scale=self.time_scale).float()[None]

    def forward(self, x, timestep, y, y_mask=None, x_mask=None) -> torch.Tensor:
        """x (B, C, T, H, W), timestep (B,), y (B, L, caption_channels), y_mask (B, L), x_mask (B, T)
        -> (B, 2C, T, H, W)."""
        frames, rows, cols = self.patch_grid(x)  # the patch grid: along T, H and W
        # The buffers hold the tables of the trained grid; another grid gets its own, computed here.
        trained_hw, trained_t = (rows, cols) == self.grid[1:], frames == self.grid[0]  # bool, bool
        pos_embed = self.pos_embed if trained_hw else self._spatial_pos_embed(rows, cols).to(x.device)  # (1, S, D)
        temporal_pos_embed = self.pos_embed_temporal if trained_t else self._temporal_pos_embed(frames)  # (1, t, D)
        tokens = self.x_embedder(x)  # (B, N, D)
        tokens = rearrange(tokens, "b (t s) d -> b t s d", t=frames)  # (B, t, S, D)
        tokens = tokens + pos_embed.to(tokens.dtype)  # (B, t, S, D)
        tokens = rearrange(tokens, "b t s d -> b (t s) d")  # (B, N, D)
        t_emb = self.t_embedder(timestep)  # (B, D)
        t_modulation = self.t_block(t_emb)  # (B, 6D)
        t0_emb = t0_modulation = None  # (B, D), (B, 6D) with condition frames
        if x_mask is not None:  # (B, T): condition frames get the timestep-0 modulation
            t0_emb = self.t_embedder(torch.zeros_like(timestep))  # (B, D)
            t0_modulation = self.t_block(t0_emb)  # (B, 6D)
        y = self.y_embedder(y)  # (B, L, D)
        y_mask = caption_mask(y_mask, x.shape[0])  # (B, L) bool, or None
        for index, block in enumerate(self.blocks):  # (B, N, D) -> (B, N, D)
            # The temporal position embedding enters the first block's temporal attention only, always:
            # Open-Sora's STDiT takes `no_temporal_pos_emb` and ignores it, and its weights expect it.
            block_pos_embed = temporal_pos_embed.to(tokens) if index == 0 else None  # (1, t, D)
            tokens = block(tokens, y, y_mask, t_modulation, frames, block_pos_embed, x_mask, t0_modulation)  # (B, N, D)
        tokens = self.final_layer(tokens, t_emb, x_mask, t0_emb, frames)  # (B, N, patch volume * 2C)
        latent = self.unpatchify(tokens, frames, rows, cols)  # (B, 2C, T, H, W) padded to patch multiples
        return latent[:, :, : x.shape[2], : x.shape[3], : x.shape[4]].float()  # (B, 2C, T, H, W)


class STDiT2(VideoDiTMixin, nn.Module):
    """Open-Sora 1.1's STDiT2 (any size, size conditioning, RoPE in time)."""

    def __init__(
        self,
        size: ModelSize,
        in_channels: int = 4,
        caption_channels: int = 4096,
        model_max_length: int = 200,
        class_dropout_prob: float = 0.1,
        input_sq_size: int = 512,
        qk_norm: bool = False,
        enable_flashattn: bool = False,
    ) -> None:
        super().__init__()
        dim = size.hidden_size
        if dim % 3:
            raise ValueError(f"STDiT2 needs hidden_size divisible by 3 (size conditioning), got {dim}")
        self.size = size
        self.input_sq_size = input_sq_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels  # epsilon and the learned variance
        self.patch_size = size.patch_size
        self.x_embedder = PatchEmbed3D(size.patch_size, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = CaptionEmbedder(caption_channels, dim, class_dropout_prob, model_max_length)
        self.t_block_temp = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.rope = RotaryEmbedding(dim // size.num_heads)
        self.blocks = nn.ModuleList(
            STDiT2Block(dim, size.num_heads, size.mlp_ratio, qk_norm, enable_flashattn) for _ in range(size.depth)
        )
        self.final_layer = T2IFinalLayer(dim, math.prod(size.patch_size), self.out_channels)
        self.csize_embedder = SizeEmbedder(dim // 3)  # height and width: 2 x D/3
        self.ar_embedder = SizeEmbedder(dim // 3)  # aspect ratio: D/3
        self.fl_embedder = SizeEmbedder(dim)  # frame count
        self.fps_embedder = SizeEmbedder(dim)
        initialize_weights(self)
        nn.init.normal_(self.t_block_temp[1].weight, std=0.02)

    def forward(self, x, timestep, y, y_mask=None, x_mask=None, *, height, width, num_frames, fps, ar) -> torch.Tensor:
        """x (B, C, T, H, W); height/width (pixels), num_frames, fps, ar: (B,) each -> (B, 2C, T, H, W).

        ar and fps as Open-Sora 1.1 gives them: `training_conditions`, `sampling_conditions`.
        """
        hw_info = self.csize_embedder(torch.stack([height, width], dim=1))  # (B, 2D/3)
        size_info = torch.cat([hw_info, self.ar_embedder(ar[:, None])], dim=1)  # (B, D)
        frame_info = self.fl_embedder(num_frames[:, None].float()) + self.fps_embedder(fps[:, None].float())  # (B, D)
        frames, rows, cols = self.patch_grid(x)  # the patch grid: along T, H and W
        # The 2D position embedding is stretched to the trained square size (input_sq_size).
        scale = float(torch.sqrt(height[0] * width[0])) / self.input_sq_size  # the batch's size / trained size
        base_size = round(math.sqrt(rows * cols))  # the side of a square grid of as many patches
        pos_embed = sincos_embedding(self.size.hidden_size, (rows, cols), scale=scale, base_size=base_size)  # (S, D)
        tokens = self.x_embedder(x)  # (B, N, D)
        tokens = rearrange(tokens, "b (t s) d -> b t s d", t=frames)  # (B, t, S, D)
        tokens = tokens + pos_embed.to(tokens)  # (B, t, S, D)
        tokens = rearrange(tokens, "b t s d -> b (t s) d")  # (B, N, D)
        t_emb = self.t_embedder(timestep)  # (B, D)
        t_modulation = self.t_block(t_emb + size_info)  # (B, 6D)
        t_temporal = self.t_block_temp(t_emb + frame_info)  # (B, 3D)
        t0_spatial = t0_modulation = t0_temporal = None  # (B, D), (B, 6D), (B, 3D) with condition frames
        if x_mask is not None:  # (B, T): condition frames get the timestep-0 modulation
            t0_emb = self.t_embedder(torch.zeros_like(timestep))  # (B, D)
            t0_spatial = t0_emb + size_info  # (B, D)
            t0_modulation = self.t_block(t0_spatial)  # (B, 6D)
            t0_temporal = self.t_block_temp(t0_emb + frame_info)  # (B, 3D)
        y = self.y_embedder(y)  # (B, L, D)
        y_mask = caption_mask(y_mask, x.shape[0])  # (B, L) bool, or None
        for block in self.blocks:  # (B, N, D) -> (B, N, D)
            tokens = block(  # (B, N, D)
                tokens, y, y_mask, t_modulation, t_temporal, frames, self.rope, x_mask, t0_modulation, t0_temporal
            )
        # Open-Sora 1.1's final layer: plain t for generated frames, t0 + size info for condition frames.
        tokens = self.final_layer(tokens, t_emb, x_mask, t0_spatial, frames)  # (B, N, patch volume * 2C)
        latent = self.unpatchify(tokens, frames, rows, cols)  # (B, 2C, T, H, W) padded to patch multiples
        return latent[:, :, : x.shape[2], : x.shape[3], : x.shape[4]].float()  # (B, 2C, T, H, W)


# --------------------------------------------------------------------------- the factory

MODELS: dict[Family, type[STDiT | STDiT2 | DiT]] = {Family.STDIT: STDiT, Family.STDIT2: STDiT2, Family.DIT: DiT}


def build_model(
    name: str,
    caption_channels: int,
    model_max_length: int,
    from_pretrained: str | None = None,
    enable_layernorm_kernel: bool = False,
    **options,
) -> STDiT | STDiT2 | DiT:
    """The model a config's `model = dict(type=...)` names, by the sizes table; weights from
    `from_pretrained` (a .pth/.pt, a safetensors file or a checkpoint folder) when given."""
    from sora_model.checkpoint import load_weights

    if enable_layernorm_kernel:  # PyTorch's layer_norm already runs one fused kernel on CUDA; apex is not needed
        warn_once("enable_layernorm_kernel: using PyTorch's layer_norm (a fused kernel on CUDA); apex is not used")
    size = MODEL_SIZES[name]
    model = MODELS[size.family](size, caption_channels=caption_channels, model_max_length=model_max_length, **options)
    if from_pretrained is not None:
        load_weights(model, from_pretrained)
    return model
