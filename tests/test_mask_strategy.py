"""Mask strategies and the long-video loop (sora_model.mask_strategy, sora_model.long_video), on tensors."""

from __future__ import annotations

import pytest
import torch

from sora_model.long_video import Conditioning, sample_long
from sora_model.mask_strategy import (
    ConditionError,
    LongVideo,
    MaskTuple,
    check_strategy,
    frames_needed,
    parse_mask_strategy,
)


def test_parse_the_seeds_example():
    first, last = parse_mask_strategy("0,0,0,1,0;0,0,0,1,-1")
    assert (first.ref_index, first.loop_index, first.ref_start_frame, first.num_frames) == (0, 0, 0, 1)
    assert first.target_location == 0 and first.edit_ratio == 0.0
    assert last.target_location == -1 and last.position == 1
    assert last.target_frames(16) == range(15, 16)  # -1: the last frame of the clip
    assert parse_mask_strategy("1, 2, 3, 4, -4, 0.5")[0] == MaskTuple(1, 2, 3, 4, -4, 0.5, "1, 2, 3, 4, -4, 0.5", 0)
    assert parse_mask_strategy(None) == [] and parse_mask_strategy("  ") == []


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("0,0,0,1", 'tuple 0 "0,0,0,1"', "4 numbers; expected 5 or 6"),
        ("0,0,0,1,0;0,0,x,1,0", 'tuple 1 "0,0,x,1,0"', "ref_start_frame must be an integer, got 'x'"),
        ("0,0,0,1,0,high", 'tuple 0 "0,0,0,1,0,high"', "edit_ratio must be a number"),
        ("0,0,0,1,0,1.5", 'tuple 0 "0,0,0,1,0,1.5"', "edit_ratio must be between 0 and 1, got 1.5"),
        ("0,0,0,1,0,nan", 'tuple 0 "0,0,0,1,0,nan"', "edit_ratio must be between 0 and 1"),
        ("-1,0,0,1,0", 'tuple 0 "-1,0,0,1,0"', "ref_index must be 0 or more, got -1"),
        ("0,0,0,0,0", 'tuple 0 "0,0,0,0,0"', "num_frames must be 1 or more, got 0"),
        ("0,0,0,1.5,0", 'tuple 0 "0,0,0,1.5,0"', "num_frames must be an integer, got '1.5'"),
    ],
)
def test_malformed_tuples_name_the_tuple_and_the_field(text, where, message):
    with pytest.raises(ConditionError) as caught:
        parse_mask_strategy(text)
    assert str(caught.value).startswith(f"{where}: {message}"), str(caught.value)


def test_open_sora_1_1_tuples_get_their_seed_order_spelled_out():
    with pytest.raises(ConditionError, match=r'write it as "0,0,0,8,0,0\.3"'):
        parse_mask_strategy("0,0,0,0,8,0.3")  # 1.1: loop 0, ref 0, start 0, target 0, length 8, edit 0.3
    with pytest.raises(ConditionError, match='write it as "0,0,0,1,0"'):
        parse_mask_strategy("0")  # 1.1's defaults fill the rest


def test_total_frames_follow_the_seeds_formula():
    assert LongVideo(16, 1, 4).total_frames == 16
    assert LongVideo(16, 10, 4).total_frames == 10 * (16 - 4) + 4
    assert LongVideo(8, 3, 2).total_frames == 20
    with pytest.raises(ConditionError, match="condition_frame_length must be between 1 and num_frames - 1"):
        LongVideo(8, 2, 8)


@pytest.mark.parametrize(
    ("strategy", "frames", "message"),
    [
        ("1,0,0,1,0", [1], 'tuple 0 "1,0,0,1,0": ref_index 1 is out of range: there is 1 reference'),
        ("0,0,0,2,0", [1], "needs 2 frames, reference 0 has an image"),
        ("0,0,5,4,0", [8], "ref_start_frame 5 \\+ num_frames 4 needs 9 frames, reference 0 has 8 frames"),
        ("0,2,0,1,0", [1], "loop_index 2 is out of range: loop is 2"),
        ("0,0,0,3,6", [9], "covers frames 6..8, outside the clip's frames 0..7"),
        ("0,0,0,3,-2", [9], "covers frames 6..8, outside"),
        ("0,0,0,1,-9", [1], "covers frames -1..-1, outside"),
        ("0,1,0,1,1", [1], "frames 1..1 of loop 1 overlap its first 2 frames, which continue loop 0"),
        ("0,0,0,2,0;0,0,0,1,1", [2], 'tuple 1 "0,0,0,1,1": frame 1 of loop 0 is already set by tuple 0'),
    ],
)
def test_tuples_are_checked_against_references_and_clips(strategy, frames, message):
    with pytest.raises(ConditionError, match=message):
        check_strategy(parse_mask_strategy(strategy), frames, LongVideo(8, 2, 2))


def test_valid_strategies_pass_and_unused_references_are_reported():
    video = LongVideo(8, 2, 2)
    assert check_strategy(parse_mask_strategy("0,0,0,1,0;0,1,0,1,-1"), [1], video) == []
    assert check_strategy(parse_mask_strategy("0,0,2,8,0;1,1,0,2,-2,0.5"), [10, 1 + 1], video) == []
    assert check_strategy([], [], video) == []
    # The seed's own example: reference_path "one.png;two.mp4", and no tuple takes two.mp4.
    assert check_strategy(parse_mask_strategy("0,0,0,1,0;0,0,0,1,-1"), [1, 30], LongVideo(16, 10, 4)) == [1]


def test_only_the_frames_the_tuples_take_are_needed():
    masks = parse_mask_strategy("0,0,0,2,0;0,1,5000,1,5;1,0,0,1,-1;0,1,1,1,3")
    assert frames_needed(masks, 0) == (0, 1, 5000)  # not the 5001 frames between
    assert frames_needed(masks, 1) == (0,)
    assert frames_needed(masks, 2) == ()


class RecordingSampler:
    """A stand-in for the diffusion sampler: frames it generates are filled with the clip's number."""

    def __init__(self, shape):
        self.shape, self.calls = shape, []

    def __call__(self, reference, edit):
        self.calls.append((reference, edit))
        clip = torch.full(self.shape, float(len(self.calls)))
        if edit is not None:  # frozen frames come out as their reference, as the real sampler does
            frozen = (edit == 0)[:, None, :, None, None]
            clip = torch.where(frozen, reference, clip)
        return clip


def test_long_video_carries_frames_and_joins_clips():
    video = LongVideo(num_frames=6, loop=3, condition_frame_length=2)
    shape = (2, 4, 6, 2, 3)  # (B, C, T, h, w)
    sampler = RecordingSampler(shape)
    joined = sample_long(sampler, [None, None], video, shape[1:])
    assert joined.shape == (2, 4, video.total_frames, 2, 3) == (2, 4, 14, 2, 3)
    assert sampler.calls[0] == (None, None)  # the first clip is free
    for _, edit in sampler.calls[1:]:
        assert edit[:, :2].eq(0).all() and edit[:, 2:].eq(1).all()
    # The carried frames are the last two of the clip before; each clip's new frames follow.
    assert sampler.calls[1][0][:, :, :2].eq(1).all() and sampler.calls[2][0][:, :, :2].eq(2).all()
    per_frame = torch.tensor([1.0] * 6 + [2.0] * 4 + [3.0] * 4)  # clip 1, then the new frames of clips 2 and 3
    assert torch.equal(joined, per_frame[None, None, :, None, None].expand_as(joined))


def test_references_go_where_the_tuples_say():
    video = LongVideo(num_frames=5, loop=2, condition_frame_length=1)
    shape = (2, 3, 5, 1, 1)
    image = torch.full((3, 1, 1, 1), -7.0)  # latents of a one-frame reference
    clip = torch.tensor([5.0, 6.0, 40.0]).repeat(3, 1)[..., None, None]  # frames 5, 6 and 40 of a video
    masks = parse_mask_strategy("0,0,0,1,-1;1,1,5,2,2,0.25")
    conditioned = Conditioning(tuple(masks), (image, clip, None), ((0,), (5, 6, 40), ()))
    sampler = RecordingSampler(shape)
    sample_long(sampler, [conditioned, None], video, shape[1:])
    (ref0, edit0), (ref1, edit1) = sampler.calls
    assert edit0[0].tolist() == [1, 1, 1, 1, 0] and ref0[0, :, 4].eq(-7).all()
    assert edit0[1].eq(1).all()  # the unconditioned sample in the same batch is free
    assert edit1[0].tolist() == [0, 1, 0.25, 0.25, 1]  # the carried frame, then video frames 5 and 6
    assert ref1[0, 0, 2:4, 0, 0].tolist() == [5.0, 6.0]
    assert edit1[1].tolist() == [0, 1, 1, 1, 1]  # long video: the carried frame only
