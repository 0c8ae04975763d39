"""Long video and frame conditioning: the seed's "Inference-long" section.

A video of `loop` clips is generated clip by clip. Each clip has `num_frames` frames; from
the second clip on, its first `condition_frame_length` frames are the last ones of the
clip before, held fixed, so the whole video has
`loop x (num_frames - condition_frame_length) + condition_frame_length` frames.

Reference images and videos enter through a `mask_strategy`: ';'-separated tuples
`ref_index,loop_index,ref_start_frame,num_frames,target_location[,edit_ratio]` (the seed's
order: which reference, which clip, from which reference frame, how many frames, where in
the clip). `target_location` is the first target frame of that clip; a negative one counts
from the end as Python does (-1 is the last frame, -L the last L frames). Frames that would
fall outside the reference or the clip are an error, never silently cut. The edit ratio
(default 0) is Open-Sora 1.1's: 0 keeps the frame fixed at the reference, 1 generates it
normally, and a value between keeps it for the first (1 - ratio) of the steps.

With the per-frame SD VAE a latent frame is one video frame, so frame numbers here are
both. This module is plain Python (config loading checks strategies with it); the
tensor side is `sora_model.long_video`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

FIELDS = ("ref_index", "loop_index", "ref_start_frame", "num_frames", "target_location", "edit_ratio")
TUPLE_FORM = ",".join(FIELDS[:5]) + "[,edit_ratio]"


class ConditionError(ValueError):
    """A mask strategy that cannot be applied; the message names the tuple and the field."""


@dataclass(frozen=True)
class MaskTuple:
    """One insertion of reference frames into one clip."""

    ref_index: int
    loop_index: int
    ref_start_frame: int
    num_frames: int
    target_location: int
    edit_ratio: float = 0.0
    text: str = ""  # the tuple as written, for messages
    position: int = 0  # its place in the strategy, from 0

    def __str__(self) -> str:
        return f'tuple {self.position} "{self.text}"'

    def target_start(self, clip_frames: int) -> int:
        return self.target_location if self.target_location >= 0 else clip_frames + self.target_location

    def target_frames(self, clip_frames: int) -> range:
        """The clip frames this tuple fills."""
        start = self.target_start(clip_frames)
        return range(start, start + self.num_frames)

    @property
    def ref_frames(self) -> range:
        """The reference frames it takes."""
        return range(self.ref_start_frame, self.ref_start_frame + self.num_frames)


@dataclass(frozen=True)
class LongVideo:
    """The clip layout of a (long) video."""

    num_frames: int  # per clip
    loop: int = 1
    condition_frame_length: int = 0  # frames carried from one clip into the next (loop > 1)

    def __post_init__(self) -> None:
        if self.loop > 1 and not 0 < self.condition_frame_length < self.num_frames:
            raise ConditionError(
                f"condition_frame_length must be between 1 and num_frames - 1 ({self.num_frames - 1}) "
                f"when loop > 1, got {self.condition_frame_length}"
            )

    @property
    def carried(self) -> int:
        return self.condition_frame_length if self.loop > 1 else 0

    @property
    def total_frames(self) -> int:
        """loop x (num_frames - condition_frame_length) + condition_frame_length."""
        return self.loop * (self.num_frames - self.carried) + self.carried


def parse_mask_strategy(text: str | None) -> list[MaskTuple]:
    """';'-separated tuples -> MaskTuples; None or "" is no tuple. Checks each field's form."""
    if text is None or not text.strip():
        return []
    tuples = []
    for position, part in enumerate(text.split(";")):
        written = part.strip()
        numbers = [number.strip() for number in written.split(",")]
        where = f'tuple {position} "{written}"'
        if len(numbers) not in (5, 6):
            count = f"{len(numbers)} number{'' if len(numbers) == 1 else 's'}"
            hint = _opensora_1_1_hint(numbers)
            raise ConditionError(f"{where}: {count}; expected 5 or 6: {TUPLE_FORM}{hint}")
        values: list = []
        for name, number in zip(FIELDS, numbers, strict=False):
            try:
                values.append(float(number) if name == "edit_ratio" else int(number))
            except ValueError:
                kind = "a number" if name == "edit_ratio" else "an integer"
                raise ConditionError(f"{where}: {name} must be {kind}, got {number!r}") from None
        masked = MaskTuple(*values, text=written, position=position)  # type: ignore[misc]
        for name in ("ref_index", "loop_index", "ref_start_frame"):
            if getattr(masked, name) < 0:
                raise ConditionError(f"{where}: {name} must be 0 or more, got {getattr(masked, name)}")
        if masked.num_frames < 1:
            raise ConditionError(
                f"{where}: num_frames must be 1 or more, got {masked.num_frames}{_opensora_1_1_hint(numbers)}"
            )
        if not (math.isfinite(masked.edit_ratio) and 0.0 <= masked.edit_ratio <= 1.0):
            raise ConditionError(f"{where}: edit_ratio must be between 0 and 1, got {numbers[5]}")
        tuples.append(masked)
    return tuples


# Open-Sora 1.1's own files write loop_id,ref_id,ref_start,target_start,length[,edit_ratio]
# and fill missing trailing numbers with these defaults.
_OPENSORA_1_1_DEFAULTS = ("0", "0", "0", "0", "1", "0")


def _opensora_1_1_hint(numbers: list[str]) -> str:
    """If the tuple reads as Open-Sora 1.1's order, how to write it in the seed's order."""
    if not 1 <= len(numbers) <= 6 or not all(number.lstrip("-").isdigit() for number in numbers[:5]):
        return ""
    loop_id, ref_id, ref_start, target_start, length, edit = numbers + list(_OPENSORA_1_1_DEFAULTS[len(numbers) :])
    seed_order = [ref_id, loop_id, ref_start, length, target_start] + ([edit] if edit != "0" else [])
    return (
        f" (Open-Sora 1.1 files use the order loop,ref,ref_start,target_start,length; if this is one, "
        f'write it as "{",".join(seed_order)}")'
    )


def check_strategy(masks: Sequence[MaskTuple], reference_frames: Sequence[int], video: LongVideo) -> list[int]:
    """Check tuples against the references (their frame counts; 1 for an image) and the clips.

    Returns the references no tuple uses (the seed's own example has one); callers say so.
    """
    used = set()
    taken: dict[tuple[int, int], MaskTuple] = {}  # (loop, frame) -> the tuple that fills it
    for masked in masks:
        if masked.ref_index >= len(reference_frames):
            count = len(reference_frames)
            raise ConditionError(
                f"{masked}: ref_index {masked.ref_index} is out of range: there "
                f"{'is 1 reference' if count == 1 else f'are {count} references'}"
            )
        used.add(masked.ref_index)
        available = reference_frames[masked.ref_index]
        if masked.ref_frames.stop > available:
            what = "an image (1 frame)" if available == 1 else f"{available} frames"
            raise ConditionError(
                f"{masked}: ref_start_frame {masked.ref_start_frame} + num_frames {masked.num_frames} needs "
                f"{masked.ref_frames.stop} frames, reference {masked.ref_index} has {what}"
            )
        if masked.loop_index >= video.loop:
            raise ConditionError(f"{masked}: loop_index {masked.loop_index} is out of range: loop is {video.loop}")
        frames = masked.target_frames(video.num_frames)
        if frames.start < 0 or frames.stop > video.num_frames:
            raise ConditionError(
                f"{masked}: target_location {masked.target_location} with num_frames {masked.num_frames} covers "
                f"frames {frames.start}..{frames.stop - 1}, outside the clip's frames 0..{video.num_frames - 1}"
            )
        if masked.loop_index > 0 and frames.start < video.carried:
            raise ConditionError(
                f"{masked}: frames {frames.start}..{frames.stop - 1} of loop {masked.loop_index} overlap its first "
                f"{video.carried} frames, which continue loop {masked.loop_index - 1} (condition_frame_length)"
            )
        for frame in frames:
            other = taken.setdefault((masked.loop_index, frame), masked)
            if other is not masked:
                raise ConditionError(f"{masked}: frame {frame} of loop {masked.loop_index} is already set by {other}")
    return sorted(set(range(len(reference_frames))) - used)


def frames_needed(masks: Sequence[MaskTuple], ref_index: int) -> tuple[int, ...]:
    """The reference frames the tuples take from reference `ref_index`, in order, each once
    (only those: "0,0,0,1,0;0,1,5000,1,0" needs frames 0 and 5000, not the 5001 between)."""
    return tuple(sorted({frame for masked in masks if masked.ref_index == ref_index for frame in masked.ref_frames}))
