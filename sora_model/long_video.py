"""Sampling a long or conditioned video: clip by clip, each clip's condition frames held fixed.

The layout and the `mask_strategy` tuples are defined in `sora_model.mask_strategy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sora_model.mask_strategy import LongVideo, MaskTuple


@dataclass(frozen=True)
class Conditioning:
    """A sample's tuples and its encoded references.

    `references[i]` holds the latents (C, F, h, w) of reference i's frames
    `frames[i]` (those the tuples take, in order; None for a reference no tuple uses).
    """

    masks: tuple[MaskTuple, ...]
    references: tuple[torch.Tensor | None, ...]
    frames: tuple[tuple[int, ...], ...]

    def clip(self, loop_index: int, previous: torch.Tensor | None, video: LongVideo, like: torch.Tensor):
        """Reference latents (C, T, h, w) and edit ratios (T,) of one clip, or None if it is free.

        `previous` is the clip before (C, T, h, w): its last frames start this one.
        `like` gives shape (C, T, h, w), dtype and device.
        """
        reference = torch.zeros_like(like)
        edit = torch.ones(like.shape[1], device=like.device)  # 1: generated normally
        conditioned = False
        if previous is not None and video.carried:
            reference[:, : video.carried] = previous[:, -video.carried :]
            edit[: video.carried] = 0.0
            conditioned = True
        for masked in self.masks:
            if masked.loop_index != loop_index:
                continue
            held = self.frames[masked.ref_index]
            positions = [held.index(frame) for frame in masked.ref_frames]
            frames = masked.target_frames(like.shape[1])
            source = self.references[masked.ref_index][:, positions]  # (C, num_frames, h, w)
            reference[:, frames.start : frames.stop] = source.to(reference)
            edit[frames.start : frames.stop] = masked.edit_ratio
            conditioned = True
        return (reference, edit) if conditioned else None


SampleClip = Callable[[torch.Tensor | None, torch.Tensor | None], torch.Tensor]
"""sample_clip(reference (B, C, T, h, w) or None, edit (B, T) or None) -> latents (B, C, T, h, w)."""


def sample_long(
    sample_clip: SampleClip,
    conditions: Sequence[Conditioning | None],
    video: LongVideo,
    latent_shape: tuple[int, int, int, int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Generate `video.loop` clips for a batch and join them: (B, C, total_frames, h, w).

    `latent_shape` is one clip's (C, T, h, w). Clip k > 0 starts with the last
    `condition_frame_length` frames of clip k - 1, held fixed; the joined video keeps
    those frames once.
    """
    clips: list[torch.Tensor] = []
    for loop_index in range(video.loop):
        previous = clips[-1] if clips else None
        like = torch.empty(latent_shape, device=device)
        per_sample = []
        for index, condition in enumerate(conditions):
            last = None if previous is None else previous[index]
            if condition is None:
                condition = Conditioning((), (), ())
            per_sample.append(condition.clip(loop_index, last, video, like))
        if all(item is None for item in per_sample):
            clip = sample_clip(None, None)
        else:
            free = (torch.zeros_like(like), torch.ones(latent_shape[1], device=device))
            pairs = [free if item is None else item for item in per_sample]
            reference = torch.stack([pair[0] for pair in pairs])  # (B, C, T, h, w)
            edit = torch.stack([pair[1] for pair in pairs])  # (B, T)
            clip = sample_clip(reference, edit)
        clips.append(clip)
    joined = [clips[0]] + [clip[:, :, video.carried :] for clip in clips[1:]]
    return torch.cat(joined, dim=2)
