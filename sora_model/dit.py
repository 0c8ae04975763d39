"""DiT-XL/2 over video, as Open-Sora's baseline (Open-Sora's `models/dit/dit.py`, after Peebles & Xie's DiT).

Full attention over all T*S tokens of a clip; every block is modulated by adaLN-zero from one
vector, the timestep embedding plus the mean of the caption's real tokens. Position embeddings
are fixed sin-cos tables for the trained grid, spatial and temporal added separately. Reads top
to bottom: the block, the final layer, the model.
Shapes: B batch, T frames, S = H*W tokens of one frame, N = T*S, D hidden size, L caption tokens.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from sora_model.layers import (
    Attention,
    CaptionEmbedder,
    Mlp,
    PatchEmbed3D,
    TimestepEmbedder,
    VideoDiTMixin,
    caption_mask,
    layer_norm,
    modulate,
    sincos_embedding,
)
from sora_model.sizes import ModelSize


class DiTBlock(nn.Module):
    """DiT's block: full attention over all T*S tokens, adaLN-zero from the pooled condition."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, use_flash: bool) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, use_flash=use_flash)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(c)[:, None]  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, -1)  # (B, 1, D) each
        x = x + gate_msa * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))  # (B, N, D)
        return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))  # (B, N, D)


class DiTFinalLayer(nn.Module):
    """DiT's final layer: norm, adaLN shift/scale from the condition, linear to patch values."""

    def __init__(self, dim: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, -1)  # (B, 1, D) each
        return self.linear(modulate(layer_norm(x), shift, scale))  # (B, N, patch volume * out_channels)


class DiT(VideoDiTMixin, nn.Module):
    """DiT-XL/2 as Open-Sora's baseline: 3D attention, conditioned on timestep + pooled caption."""

    def __init__(
        self,
        size: ModelSize,
        input_size: tuple[int, int, int] = (16, 32, 32),  # latent (T, H, W)
        in_channels: int = 4,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        class_dropout_prob: float = 0.1,
        no_temporal_pos_emb: bool = False,
        enable_flashattn: bool = False,
    ) -> None:
        super().__init__()
        dim = size.hidden_size
        self.size = size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels  # epsilon and the learned variance
        self.patch_size = size.patch_size
        self.no_temporal_pos_emb = no_temporal_pos_emb
        t, h, w = (s // p for s, p in zip(input_size, size.patch_size, strict=True))
        self.register_buffer("pos_embed_spatial", sincos_embedding(dim, (h, w)).float()[None])  # (1, S, D)
        self.register_buffer("pos_embed_temporal", sincos_embedding(dim, (t,)).float()[None])  # (1, T, D)
        self.x_embedder = PatchEmbed3D(size.patch_size, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = CaptionEmbedder(caption_channels, dim, class_dropout_prob, model_max_length)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, size.num_heads, size.mlp_ratio, enable_flashattn) for _ in range(size.depth)
        )
        self.final_layer = DiTFinalLayer(dim, math.prod(size.patch_size), self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's: xavier linears; adaLN-zero, so every block starts as the identity and the output at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.linear.weight)

    def forward(self, x, timestep, y, y_mask=None, x_mask=None) -> torch.Tensor:
        """x (B, C, T, H, W), timestep (B,), y (B, L, caption_channels), y_mask (B, L) -> (B, 2C, T, H, W)."""
        if x_mask is not None:  # (B, T)
            raise ValueError("DiT-XL/2 has no frame conditioning (x_mask); use an STDiT model")
        frames, rows, cols = self.patch_grid(x)  # the patch grid: along T, H and W
        tokens = rearrange(self.x_embedder(x), "b (t s) d -> b t s d", t=frames)  # (B, T, S, D)
        tokens = tokens + self.pos_embed_spatial[:, None]  # (B, T, S, D)
        if not self.no_temporal_pos_emb:  # (1, T, D)
            tokens = tokens + self.pos_embed_temporal[:, :, None]  # (B, T, S, D)
        tokens = rearrange(tokens, "b t s d -> b (t s) d")  # (B, N, D)
        caption = self.y_embedder(y)  # (B, L, D)
        y_mask = caption_mask(y_mask, caption.shape[0])  # (B, L) bool, or None
        if y_mask is not None:  # DiT conditions on one vector: the mean of the real caption tokens
            weights = y_mask.to(caption.dtype)[..., None]  # (B, L, 1)
            pooled = (caption * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
        else:
            pooled = caption.mean(1)  # (B, D)
        c = self.t_embedder(timestep) + pooled  # (B, D)
        for block in self.blocks:  # (B, N, D) -> (B, N, D)
            tokens = block(tokens, c)  # (B, N, D)
        tokens = self.final_layer(tokens, c)  # (B, N, patch volume * 2C)
        latent = self.unpatchify(tokens, frames, rows, cols)  # (B, 2C, T, H, W) padded to patch multiples
        return latent[:, :, : x.shape[2], : x.shape[3], : x.shape[4]].float()  # (B, 2C, T, H, W)
