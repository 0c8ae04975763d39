"""Rectified flow against Open-Sora 1.2's equations (opensora/schedulers/rf): noising, loss, time draws,
timestep transform, Euler sampling, guidance and condition frames."""

from __future__ import annotations

import math

import pytest
import torch

from sora_model.diffusion import RFlow, build_scheduler, timestep_transform

SHAPE = (2, 4, 3, 4, 4)  # (B, C, T, H, W)


def test_add_noise_is_the_straight_line_from_data_to_noise():
    # Open-Sora 1.2: x_t = (1 - t/T) x0 + (t/T) noise
    flow = RFlow()
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([250.0, 1000.0])
    xt = flow.add_noise(x0, noise, t)
    torch.testing.assert_close(xt[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(xt[1], noise[1])
    torch.testing.assert_close(flow.add_noise(x0, noise, torch.zeros(2)), x0)


def test_the_loss_is_zero_for_the_true_velocity_and_skips_condition_frames():
    # target v = x0 - noise; loss = mean over generated frames of (v_model - v)^2
    flow = RFlow()
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([100.0, 900.0])
    seen = {}

    def oracle(xt, t_in, mask):
        seen["xt"], seen["t"] = xt, t_in
        return torch.cat([x0 - noise, torch.zeros_like(x0)], dim=1)  # learned-sigma half ignored

    assert flow.training_losses(oracle, x0, t, noise)["loss"].abs().max() == 0
    torch.testing.assert_close(seen["t"], t)  # continuous times reach the model unchanged
    # A wrong velocity: 1 everywhere off by 1 -> loss 1 per sample.
    loss = flow.training_losses(lambda xt, t_in, m: x0 - noise + 1, x0, t, noise)["loss"]
    torch.testing.assert_close(loss, torch.ones(2))
    # Frame mask: condition frames enter clean (t = 0) and are left out of the loss.
    mask = torch.tensor([[True, False, True], [False, True, True]])
    wrong_on_conditions = lambda xt, t_in, m: (x0 - noise) + (~m)[:, None, :, None, None] * 5.0  # noqa: E731
    assert flow.training_losses(wrong_on_conditions, x0, t, noise, mask)["loss"].abs().max() == 0
    flow.training_losses(oracle, x0, t, noise, mask)
    torch.testing.assert_close(seen["xt"][0, :, 1], x0[0, :, 1])
    torch.testing.assert_close(seen["xt"][0, :, 0], flow.add_noise(x0, noise, t)[0, :, 0])


def test_training_times_uniform_and_logit_normal():
    uniform = RFlow().sample_timesteps(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(uniform, torch.rand(4, generator=torch.Generator().manual_seed(0)) * 1000)
    # Open-Sora 1.2's logit-normal: T * sigmoid(N(loc, scale))
    flow = RFlow(sample_method="logit-normal", loc=0.5, scale=2.0)
    drawn = flow.sample_timesteps(4, torch.Generator().manual_seed(0))
    normal = torch.randn(4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(drawn, 1000 * torch.sigmoid(normal * 2.0 + 0.5))
    many = RFlow(sample_method="logit-normal").sample_timesteps(20000, torch.Generator().manual_seed(1))
    assert many.min() > 0 and many.max() < 1000 and abs(many.median().item() - 500) < 15
    with pytest.raises(ValueError, match="sample_method"):
        RFlow(sample_method="beta")


def test_timestep_transform_follows_open_sora_1_2():
    # s' = r s / (1 + (r - 1) s), r = sqrt(H W / 512^2) * sqrt(frames / 1) * scale
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    torch.testing.assert_close(timestep_transform(t, 512, 512, 1), t)  # the base size: unchanged
    r = math.sqrt(1024 * 1024 / 512**2) * math.sqrt(4)  # 4
    expected = torch.tensor([r * s / (1 + (r - 1) * s) * 1000 for s in (0.0, 0.25, 0.5, 1.0)])
    torch.testing.assert_close(timestep_transform(t, 1024, 1024, 4), expected)
    assert timestep_transform(t, 1024, 1024, 4)[2] == pytest.approx(800.0)
    # Per-sample sizes, and the scale.
    per_sample = timestep_transform(torch.tensor([500.0, 500.0]), torch.tensor([512, 256]), torch.tensor([512, 256]), 1)
    torch.testing.assert_close(per_sample, torch.tensor([500.0, 0.5 * 0.5 / (1 - 0.5 * 0.5) * 1000]))
    flow = RFlow(use_timestep_transform=True, transform_scale=2.0)
    torch.testing.assert_close(flow.sampling_times(1, "cpu", (512, 512, 1))[1], torch.tensor([2 * 0.9 / 1.9 * 1000]))
    with pytest.raises(ValueError, match="height, width, num_frames"):
        flow.sample_timesteps(2, torch.Generator())


def test_sampling_times_and_euler_steps():
    flow = RFlow(num_sampling_steps=4, cfg_scale=1.0)
    assert [float(t[0]) for t in flow.sampling_times(1, "cpu")] == [1000.0, 750.0, 500.0, 250.0]
    # The exact velocity of a single data point x0 is (x0 - x_t) / (t/T): Euler on the straight
    # path lands on x0 exactly, whatever the noise.
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    exact = lambda x, t, mask: (torch.cat([x0, x0]) - x) / (t / 1000)[:, None, None, None, None]  # noqa: E731
    torch.testing.assert_close(flow.sample(exact, noise), x0)


def test_guidance_acts_on_every_channel():
    # v = v_uncond + cfg (v_cond - v_uncond); one step of dt = 1 from t = T
    flow = RFlow(num_sampling_steps=1, cfg_scale=3.0)
    cond, uncond = torch.full(SHAPE, 2.0), torch.full(SHAPE, 0.5)

    def model(x, t, mask):
        return torch.cat([torch.cat([cond, uncond]), torch.zeros(SHAPE[0] * 2, *SHAPE[1:])], dim=1)

    noise = torch.zeros(SHAPE)
    torch.testing.assert_close(flow.sample(model, noise), torch.full(SHAPE, 0.5 + 3.0 * 1.5))


def test_condition_frames_are_held_and_partly_edited_frames_start_late():
    flow = RFlow(num_sampling_steps=4, cfg_scale=1.0)
    reference, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    # Frame 0 a condition (0), frame 1 half edited (0.5), frame 2 generated (1).
    edit = torch.tensor([[0.0, 0.5, 1.0]] * 2)
    calls = []

    def model(x, t, mask):
        calls.append((float(t[0]), mask[0].tolist(), x[:1].clone()))
        return torch.zeros_like(x)  # v = 0: generated frames keep what they start from

    out = flow.sample(model, noise, reference, edit, generator=torch.Generator().manual_seed(0))
    assert [(t, mask) for t, mask, _ in calls] == [
        (1000.0, [False, False, True]),
        (750.0, [False, False, True]),
        (500.0, [False, True, True]),
        (250.0, [False, True, True]),
    ]
    # The model's first call already sees the references in the condition frames.
    torch.testing.assert_close(calls[0][2][0, :, :2], reference[0, :, :2])
    torch.testing.assert_close(out[:, :, 0], reference[:, :, 0])  # held exactly
    torch.testing.assert_close(out[:, :, 2], noise[:, :, 2])  # generated from the noise (v = 0)
    # Frame 1 was noised to t = 500 when it started: half reference, half fresh noise.
    fresh = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, :, 1], 0.5 * reference[:, :, 1] + 0.5 * fresh[:, :, 1])


def test_the_config_names_rflow():
    flow = build_scheduler("rflow", 30, 7.0, 3, sample_method="logit-normal", use_timestep_transform=True)
    assert isinstance(flow, RFlow) and flow.num_sampling_steps == 30 and flow.cfg_scale == 7.0
    assert flow.sample_method == "logit-normal" and flow.use_timestep_transform
