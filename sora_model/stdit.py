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
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
from einops import rearrange
from torch import nn

from sora_model.layers import (
    Attention,
    CaptionEmbedder,
    CrossAttention,
    Mlp,
    PatchEmbed3D,
    RotaryEmbedding,
    SizeEmbedder,
    T2IFinalLayer,
    TimestepEmbedder,
    frame_modulation,
    layer_norm,
    modulate,
    sincos_1d,
    sincos_2d,
)
from sora_model.sizes import MODEL_SIZES, Family, ModelSize


def _modulations(table: torch.Tensor, t: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Per-block shift/scale/gate vectors: table (count, D) + t (B, count*D) -> count x (B, 1, D)."""
    return list((table[None] + t.reshape(t.shape[0], count, -1)).chunk(count, dim=1))


class STDiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, use_flash: bool) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn = Attention(dim, num_heads, use_flash=use_flash)
        self.cross_attn = CrossAttention(dim, num_heads, use_flash=use_flash)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn_temp = Attention(dim, num_heads, use_flash=use_flash)

    def forward(self, x, y, y_mask, t_mlp, frames, tpe=None, x_mask=None, t0_mlp=None) -> torch.Tensor:
        spatial = x.shape[1] // frames
        normal = _modulations(self.scale_shift_table, t_mlp, 6)  # 6 x (B, 1, D)
        zero = _modulations(self.scale_shift_table, t0_mlp, 6) if t0_mlp is not None else [None] * 6
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            frame_modulation(x_mask, n, z, spatial) for n, z in zip(normal, zero, strict=True)
        )
        # spatial attention: the tokens of one frame
        x_m = modulate(layer_norm(x), shift_msa, scale_msa)  # (B, T*S, D)
        x_s = self.attn(rearrange(x_m, "b (t s) d -> (b t) s d", t=frames))
        x = x + gate_msa * rearrange(x_s, "(b t) s d -> b (t s) d", t=frames)
        # temporal attention: one position across frames. Open-Sora 1.0 applies no norm here and
        # reuses the spatial gate, unmasked.
        x_t = rearrange(x, "b (t s) d -> (b s) t d", t=frames)
        if tpe is not None:
            x_t = x_t + tpe
        x_t = self.attn_temp(x_t)
        x = x + normal[2] * rearrange(x_t, "(b s) t d -> b (t s) d", s=spatial)
        # cross-attention to the caption, then the MLP
        x = x + self.cross_attn(x, y, y_mask)
        return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class STDiT2Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, use_flash: bool) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, use_flash=use_flash)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.cross_attn = CrossAttention(dim, num_heads, use_flash=use_flash)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn_temp = Attention(dim, num_heads, qk_norm=qk_norm, use_flash=use_flash)
        self.scale_shift_table_temporal = nn.Parameter(torch.randn(3, dim) / dim**0.5)

    def forward(self, x, y, y_mask, t_mlp, t_tmp, frames, rope, x_mask=None, t0_mlp=None, t0_tmp=None):
        spatial = x.shape[1] // frames
        normal = _modulations(self.scale_shift_table, t_mlp, 6) + _modulations(
            self.scale_shift_table_temporal, t_tmp, 3
        )
        if t0_mlp is not None:
            zero = _modulations(self.scale_shift_table, t0_mlp, 6) + _modulations(
                self.scale_shift_table_temporal, t0_tmp, 3
            )
        else:
            zero = [None] * 9
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_tmp, scale_tmp, gate_tmp) = (
            frame_modulation(x_mask, n, z, spatial) for n, z in zip(normal, zero, strict=True)
        )
        x_m = modulate(layer_norm(x), shift_msa, scale_msa)  # (B, T*S, D)
        x_s = self.attn(rearrange(x_m, "b (t s) d -> (b t) s d", t=frames))
        x = x + gate_msa * rearrange(x_s, "(b t) s d -> b (t s) d", t=frames)
        x_m = modulate(layer_norm(x), shift_tmp, scale_tmp)
        x_t = self.attn_temp(rearrange(x_m, "b (t s) d -> (b s) t d", t=frames), rope=rope)  # RoPE over T
        x = x + gate_tmp * rearrange(x_t, "(b s) t d -> b (t s) d", s=spatial)
        x = x + self.cross_attn(x, y, y_mask)
        return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class _Base(nn.Module):
    """What STDiT and STDiT2 share: embedders, unpatchify, init, the null caption."""

    def _common(self, size: ModelSize, in_channels, caption_channels, model_max_length, class_dropout_prob):
        dim = size.hidden_size
        self.size = size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels  # epsilon and the learned variance
        self.patch_size = size.patch_size
        self.x_embedder = PatchEmbed3D(size.patch_size, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = CaptionEmbedder(caption_channels, dim, class_dropout_prob, model_max_length)

    def null_caption(self, batch: int, length: int | None = None) -> torch.Tensor:
        """The unconditional caption for classifier-free guidance: (batch, length, caption_channels)."""
        return self.y_embedder.null(batch, length)

    def unpatchify(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        """(B, t*h*w, pt*ph*pw*C) tokens -> (B, C, t*pt, h*ph, w*pw)."""
        pt, ph, pw = self.patch_size
        return rearrange(x, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)

    def _grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        return math.ceil(t / pt), math.ceil(h / ph), math.ceil(w / pw)

    def initialize_weights(self) -> None:
        """DiT/PixArt initialisation; the output projections of the new branches start at zero."""

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.x_embedder.proj.weight.shape[0], -1))
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            for layer in (block.cross_attn.proj, block.attn_temp.proj):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _caption(self, y: torch.Tensor, y_mask: torch.Tensor | None, batch: int):
        if y_mask is not None and y_mask.shape[0] != batch:  # a guidance batch: [cond; uncond]
            y_mask = y_mask.repeat(batch // y_mask.shape[0], 1)
        return self.y_embedder(y), (None if y_mask is None else y_mask.bool())


class STDiT(_Base):
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
        no_temporal_pos_emb: bool = False,
        enable_flashattn: bool = False,
    ) -> None:
        super().__init__()
        dim = size.hidden_size
        self.hidden_size = dim
        self.input_size = input_size
        self.space_scale, self.time_scale = space_scale, time_scale
        self.no_temporal_pos_emb = no_temporal_pos_emb
        # Persistent buffers, as in Open-Sora's checkpoints; recomputed on load and for other sizes.
        grid = tuple(s // p for s, p in zip(input_size, size.patch_size, strict=True))
        self.register_buffer("pos_embed", self._spatial_embedding(grid[1], grid[2]))
        self.register_buffer("pos_embed_temporal", self._temporal_embedding(grid[0]))
        self._common(size, in_channels, caption_channels, model_max_length, class_dropout_prob)
        self.blocks = nn.ModuleList(
            STDiTBlock(dim, size.num_heads, size.mlp_ratio, enable_flashattn) for _ in range(size.depth)
        )
        self.final_layer = T2IFinalLayer(dim, math.prod(size.patch_size), self.out_channels)
        self.initialize_weights()

    def _spatial_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w, D); coordinates divided by space_scale (new height / old height)."""
        return torch.from_numpy(sincos_2d(self.hidden_size, h, w, scale=self.space_scale)).float()[None]

    def _temporal_embedding(self, t: int) -> torch.Tensor:
        """(1, t, D); frame positions divided by time_scale (new / old frame_interval)."""
        positions = np.arange(t, dtype=np.float64) / self.time_scale
        return torch.from_numpy(sincos_1d(self.hidden_size, positions)).float()[None]

    def refresh_position_embeddings(self) -> None:
        """Recompute the sin-cos buffers (after loading a checkpoint that holds other values)."""
        grid = [s // p for s, p in zip(self.input_size, self.patch_size, strict=True)]
        self.pos_embed.copy_(self._spatial_embedding(grid[1], grid[2]))
        self.pos_embed_temporal.copy_(self._temporal_embedding(grid[0]))

    def forward(self, x, timestep, y, y_mask=None, x_mask=None) -> torch.Tensor:
        """x (B, C, T, H, W), timestep (B,), y (B, L, caption_channels), y_mask (B, L) -> (B, 2C, T, H, W)."""
        batch = x.shape[0]
        t, h, w = self._grid(x)
        trained_grid = (self.input_size[1] // self.patch_size[1], self.input_size[2] // self.patch_size[2])
        pos = self.pos_embed if (h, w) == trained_grid else self._spatial_embedding(h, w).to(x.device)
        tpe = self.pos_embed_temporal if self.pos_embed_temporal.shape[1] == t else self._temporal_embedding(t)
        tokens = self.x_embedder(x)  # (B, T*S, D)
        tokens = rearrange(
            rearrange(tokens, "b (t s) d -> b t s d", t=t) + pos.to(tokens.dtype), "b t s d -> b (t s) d"
        )
        t_emb = self.t_embedder(timestep)  # (B, D)
        t_mlp = self.t_block(t_emb)  # (B, 6D)
        t0_emb = t0_mlp = None
        if x_mask is not None:
            t0_emb = self.t_embedder(torch.zeros_like(timestep))
            t0_mlp = self.t_block(t0_emb)
        y, y_mask = self._caption(y, y_mask, batch)
        for index, block in enumerate(self.blocks):
            # The temporal position embedding enters the first block's temporal attention only.
            block_tpe = tpe.to(tokens) if index == 0 and not self.no_temporal_pos_emb else None
            tokens = block(tokens, y, y_mask, t_mlp, t, block_tpe, x_mask, t0_mlp)
        tokens = self.final_layer(tokens, t_emb, x_mask, t0_emb, t)  # (B, N, p*2C)
        return self.unpatchify(tokens, t, h, w)[:, :, : x.shape[2], : x.shape[3], : x.shape[4]].float()


class STDiT2(_Base):
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
        self.input_sq_size = input_sq_size
        self._common(size, in_channels, caption_channels, model_max_length, class_dropout_prob)
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
        self.initialize_weights()
        nn.init.normal_(self.t_block_temp[1].weight, std=0.02)

    def forward(
        self, x, timestep, y, y_mask=None, x_mask=None, *, height, width, num_frames, fps, ar=None
    ) -> torch.Tensor:
        """x (B, C, T, H, W); height/width (pixels), num_frames, fps: (B,) each -> (B, 2C, T, H, W)."""
        batch = x.shape[0]
        ar = height / width if ar is None else ar
        data_info = torch.cat(
            [self.csize_embedder(torch.stack([height, width], dim=1)), self.ar_embedder(ar[:, None])], dim=1
        )  # (B, D)
        fl = self.fl_embedder(num_frames[:, None].float()) + self.fps_embedder(fps[:, None].float())  # (B, D)
        t, h, w = self._grid(x)
        # The 2D position embedding is stretched to the trained square size (input_sq_size).
        scale = float(torch.sqrt(height[0] * width[0])) / self.input_sq_size
        pos = sincos_2d(self.size.hidden_size, h, w, scale=scale, base_size=round(math.sqrt(h * w)))
        tokens = self.x_embedder(x)  # (B, T*S, D)
        pos = torch.from_numpy(pos).to(tokens)
        tokens = rearrange(rearrange(tokens, "b (t s) d -> b t s d", t=t) + pos, "b t s d -> b (t s) d")

        t_emb = self.t_embedder(timestep)
        t_mlp, t_tmp = self.t_block(t_emb + data_info), self.t_block_temp(t_emb + fl)
        t0_spc = t0_mlp = t0_tmp = None
        if x_mask is not None:
            t0_emb = self.t_embedder(torch.zeros_like(timestep))
            t0_spc = t0_emb + data_info
            t0_mlp, t0_tmp = self.t_block(t0_spc), self.t_block_temp(t0_emb + fl)
        y, y_mask = self._caption(y, y_mask, batch)
        for block in self.blocks:
            tokens = block(tokens, y, y_mask, t_mlp, t_tmp, t, self.rope, x_mask, t0_mlp, t0_tmp)
        # Open-Sora 1.1's final layer: plain t for generated frames, t0 + size info for condition frames.
        tokens = self.final_layer(tokens, t_emb, x_mask, t0_spc, t)
        return self.unpatchify(tokens, t, h, w)[:, :, : x.shape[2], : x.shape[3], : x.shape[4]].float()


class DiTBlock(nn.Module):
    """DiT's block: full attention over all T*S tokens, adaLN-zero from the pooled condition."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, use_flash: bool) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, use_flash=use_flash)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, -1)
        x = x + gate_msa * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class DiT(_Base):
    """DiT-XL/2 as Open-Sora's baseline: 3D attention, conditioned on timestep + pooled caption."""

    def __init__(
        self,
        size: ModelSize,
        input_size: tuple[int, int, int] = (16, 32, 32),
        in_channels: int = 4,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        class_dropout_prob: float = 0.1,
        no_temporal_pos_emb: bool = False,
        enable_flashattn: bool = False,
    ) -> None:
        super().__init__()
        dim = size.hidden_size
        self.hidden_size = dim
        self.input_size = input_size
        self.no_temporal_pos_emb = no_temporal_pos_emb
        grid = [s // p for s, p in zip(input_size, size.patch_size, strict=True)]
        spatial = torch.from_numpy(sincos_2d(dim, grid[1], grid[2])).float()[None]
        temporal = torch.from_numpy(sincos_1d(dim, np.arange(grid[0], dtype=np.float64))).float()[None]
        self.register_buffer("pos_embed_spatial", spatial)
        self.register_buffer("pos_embed_temporal", temporal)
        self.size = size
        self.in_channels, self.out_channels, self.patch_size = in_channels, 2 * in_channels, size.patch_size
        self.x_embedder = PatchEmbed3D(size.patch_size, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = CaptionEmbedder(caption_channels, dim, class_dropout_prob, model_max_length)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, size.num_heads, size.mlp_ratio, enable_flashattn) for _ in range(size.depth)
        )
        self.final_layer = DiTFinalLayer(dim, math.prod(size.patch_size), self.out_channels)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.linear.weight)

    def forward(self, x, timestep, y, y_mask=None, x_mask=None) -> torch.Tensor:
        """x (B, C, T, H, W), timestep (B,), y (B, L, caption_channels) -> (B, 2C, T, H, W)."""
        if x_mask is not None:
            raise ValueError("DiT-XL/2 has no frame conditioning (x_mask); use an STDiT model")
        t, h, w = self._grid(x)
        tokens = rearrange(self.x_embedder(x), "b (t s) d -> b t s d", t=t) + self.pos_embed_spatial[:, None]
        if not self.no_temporal_pos_emb:
            tokens = tokens + self.pos_embed_temporal[:, :, None]
        tokens = rearrange(tokens, "b t s d -> b (t s) d")
        caption = self.y_embedder(y)  # (B, L, D)
        if y_mask is not None:  # the mean of the real tokens: DiT conditions on one vector
            if y_mask.shape[0] != caption.shape[0]:
                y_mask = y_mask.repeat(caption.shape[0] // y_mask.shape[0], 1)
            weights = y_mask.to(caption.dtype)[..., None]
            pooled = (caption * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            pooled = caption.mean(1)
        c = self.t_embedder(timestep) + pooled  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        tokens = self.final_layer(tokens, c)
        return self.unpatchify(tokens, t, h, w)[:, :, : x.shape[2], : x.shape[3], : x.shape[4]].float()


class DiTFinalLayer(nn.Module):
    def __init__(self, dim: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, -1)
        return self.linear(modulate(layer_norm(x), shift, scale))


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

    if enable_layernorm_kernel:
        # PyTorch's layer_norm already runs one fused kernel on CUDA; apex is not needed.
        _note_layernorm_kernel()
    size = MODEL_SIZES[name]
    families = {Family.STDIT: STDiT, Family.STDIT2: STDiT2, Family.DIT: DiT}
    model = families[size.family](size, caption_channels=caption_channels, model_max_length=model_max_length, **options)
    if from_pretrained is not None:
        load_weights(model, from_pretrained)
    return model


@functools.cache
def _note_layernorm_kernel() -> None:
    warnings.warn(
        "enable_layernorm_kernel: using PyTorch's layer_norm (a fused kernel on CUDA); apex is not used",
        stacklevel=3,
    )
