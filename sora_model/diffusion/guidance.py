"""Classifier-free guidance, shared by every scheduler."""

from __future__ import annotations

import torch

from sora_model.diffusion.gaussian import ModelFn


def classifier_free_guidance(model: ModelFn, cfg_scale: float, cfg_channel: int | None) -> ModelFn:
    """Guide a model whose batch is [conditional; unconditional] (the caption and the null caption).

    The returned function takes the conditional half only. Guidance applies to the first
    `cfg_channel` output channels; Open-Sora uses 3 of the 4 noise channels, leaving the
    last noise channel and the learned variance as the conditional model predicts them.
    `cfg_channel=None` guides every noise channel.
    """

    def guided(x: torch.Tensor, t: torch.Tensor, x_mask: torch.Tensor | None) -> torch.Tensor:
        both_mask = None if x_mask is None else torch.cat([x_mask, x_mask])
        output = model(torch.cat([x, x]), torch.cat([t, t]), both_mask)  # (2B, C', T, H, W)
        cond, uncond = output.chunk(2)
        channels = cfg_channel if cfg_channel is not None else x.shape[1]
        eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return guided
