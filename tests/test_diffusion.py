"""IDDPM numerics against simple references: schedules, losses with an oracle, sampling, masks, guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sora_model.diffusion import IDDPM, classifier_free_guidance
from sora_model.diffusion.gaussian import GaussianDiffusion, VarianceType, linear_betas, mean_flat, space_timesteps

SHAPE = (2, 4, 5, 6, 6)  # (B, C, T, H, W)


def test_linear_schedule_endpoints():
    betas = linear_betas(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000


@pytest.mark.parametrize(
    ("respacing", "expected"),
    [
        ("", list(range(10))),
        ("5", [0, 2, 4, 7, 9]),
        (5, [0, 2, 4, 7, 9]),
        ("2,3", [0, 4, 5, 7, 9]),  # two sections of 5 steps: 2 from the first, 3 from the second
        ("10", list(range(10))),
    ],
)
def test_space_timesteps(respacing, expected):
    assert space_timesteps(10, respacing) == expected


def test_space_timesteps_rejects_too_many_steps():
    with pytest.raises(ValueError, match="cannot take 11 steps"):
        space_timesteps(10, "11")


def test_respaced_process_reaches_the_same_noise_levels():
    full = GaussianDiffusion.spaced("", 1000)
    spaced = GaussianDiffusion.spaced("50", 1000)
    assert spaced.num_timesteps == 50 and spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == 999
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


def oracle(diffusion: GaussianDiffusion, x0: torch.Tensor, calls: list | None = None):
    """A model that knows x0: it returns the exact noise and v = -1 (the posterior variance)."""

    def model(xt, timesteps, x_mask):
        if calls is not None:
            calls.append(None if x_mask is None else x_mask.clone())
        index = torch.tensor([diffusion.timestep_map.index(int(s)) for s in timesteps])
        a = torch.from_numpy(diffusion.alphas_cumprod).float()[index].reshape(-1, 1, 1, 1, 1)
        eps = (xt - a.sqrt() * x0[: len(xt)]) / (1 - a).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    return model


def test_oracle_model_has_zero_loss():
    diffusion = GaussianDiffusion.spaced("", 1000)
    x0 = torch.rand(SHAPE) * 2 - 1
    t = torch.tensor([10, 700])
    terms = diffusion.training_losses(oracle(diffusion, x0), x0, t)
    assert terms["mse"].max() < 1e-6
    assert terms["vb"].abs().max() < 1e-3  # predicted posterior equals the true one
    assert terms["loss"].shape == (2,)
    assert terms["loss"].abs().max() < 1e-3


def test_loss_is_the_epsilon_mse_plus_the_variational_bound():
    diffusion = GaussianDiffusion.spaced("", 1000)
    x0 = torch.rand(SHAPE) * 2 - 1
    exact = oracle(diffusion, x0)

    def off_by_a_tenth(xt, timesteps, x_mask):  # epsilon 0.1 too high; the variance still right
        out = exact(xt, timesteps, x_mask)
        out[:, :4] += 0.1
        return out

    terms = diffusion.training_losses(off_by_a_tenth, x0, torch.tensor([10, 700]))
    torch.testing.assert_close(terms["mse"], torch.full((2,), 0.01))
    assert (terms["vb"] > 1e-5).all()  # the mean is off too, so the bound is not zero
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_masked_training_counts_generated_frames_only():
    diffusion = GaussianDiffusion.spaced("", 1000)
    x0 = torch.rand(SHAPE) * 2 - 1
    mask = torch.tensor([[True, True, False, False, True], [False, True, True, True, True]])
    seen = {}

    def model(xt, timesteps, x_mask):
        seen["xt"], seen["mask"] = xt, x_mask
        out = oracle(diffusion, x0)(xt, timesteps, x_mask)
        out[:, :4] = torch.where(x_mask[:, None, :, None, None], out[:, :4], torch.full_like(out[:, :4], 9.0))
        return out

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    terms = diffusion.training_losses(model, x0, torch.tensor([300, 300]), noise, mask=mask)
    assert terms["mse"].max() < 1e-6  # the wrong outputs on condition frames carry no loss
    assert torch.equal(seen["mask"], mask)
    # Open-Sora 1.1: condition frames are q_sample(x0, t0 = 0, noise), the same noise as the rest:
    # sqrt(abar_0) x0 + sqrt(1 - abar_0) noise with abar_0 = 1 - beta_0 = 1 - 1e-4.
    condition = ~mask[:, None, :, None, None].expand_as(x0)
    expected = math.sqrt(1 - 1e-4) * x0 + math.sqrt(1e-4) * noise
    torch.testing.assert_close(seen["xt"][condition], expected[condition])
    assert (seen["xt"][condition] - x0[condition]).abs().max() > 1e-3  # not clean


def test_mean_flat_with_mask_is_the_mean_of_masked_frames():
    values = torch.arange(2 * 1 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 1, 3, 1, 1)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert mean_flat(values, mask).tolist() == [1.0, 5.0]


def test_sampling_with_an_oracle_recovers_the_target():
    diffusion = GaussianDiffusion.spaced("50", 1000)
    target = torch.rand(SHAPE) * 2 - 1
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sample = diffusion.sample(oracle(diffusion, target), noise, generator=torch.Generator().manual_seed(1))
    assert (sample - target).abs().max() < 0.05


@pytest.mark.parametrize("steps", ["1", "2"])
def test_sampling_in_one_or_two_steps_lands_on_the_oracles_target(steps):
    diffusion = GaussianDiffusion.spaced(steps, 1000)
    target = torch.rand(SHAPE) * 2 - 1
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sample = diffusion.sample(oracle(diffusion, target), noise, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(sample).all() and (sample - target).abs().max() < 0.05


def test_sampling_is_deterministic_for_a_seed():
    diffusion = GaussianDiffusion.spaced("10", 1000)
    model = oracle(diffusion, torch.zeros(SHAPE))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = diffusion.sample(model, noise, generator=torch.Generator().manual_seed(3))
    b = diffusion.sample(model, noise, generator=torch.Generator().manual_seed(3))
    c = diffusion.sample(model, noise, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_edit_ratios_freeze_then_release_frames():
    steps = 10
    diffusion = GaussianDiffusion.spaced(str(steps), 1000)
    target = torch.zeros(SHAPE)
    reference = torch.full(SHAPE, 0.5)
    edit = torch.tensor([[0.0, 1.0, 0.3, 1.0, 1.0]] * 2)
    calls: list = []
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sample = diffusion.sample(
        oracle(diffusion, target, calls), noise, reference, edit, torch.Generator().manual_seed(1)
    )
    assert torch.equal(sample[:, :, 0], reference[:, :, 0])  # edit 0: a frozen condition frame
    assert (sample[:, :, 1] - target[:, :, 1]).abs().max() < 0.1  # edit 1: generated
    active = torch.stack([call[0] for call in calls])  # (steps, T) for the first sample
    assert active[:, 0].sum() == 0 and active[:, 1].sum() == steps
    assert active[:, 2].tolist() == [False] * 7 + [True] * 3  # edit 0.3: the last 30% of the steps
    assert (sample[:, :, 2] - target[:, :, 2]).abs().max() < 0.2  # then denoised towards the target


@pytest.mark.parametrize("ratio", [0.53, 0.29, 0.57, 0.58])
def test_an_edit_ratio_gets_its_exact_share_of_the_steps(ratio):
    """0.53 of 100 steps is 53, though 0.53 is 0.52999997 as a float32."""
    steps = 100
    diffusion = GaussianDiffusion.spaced(str(steps), 1000)
    calls: list = []
    edit = torch.tensor([[ratio, 1.0, 1.0, 1.0, 1.0]] * 2)  # float32, as sampling builds it
    reference = torch.zeros(SHAPE)
    diffusion.sample(oracle(diffusion, reference, calls), torch.randn(SHAPE), reference, edit)
    active = torch.stack([call[0] for call in calls])  # (steps, T) for the first sample
    assert int(active[:, 0].sum()) == round(ratio * steps)


def test_guidance_on_the_first_channels_only():
    def model(x, t, x_mask):
        half = len(x) // 2
        out = torch.zeros(len(x), 8, *x.shape[2:])
        out[:half] = 1.0  # conditional
        out[half:] = -1.0  # unconditional
        return out

    guided = classifier_free_guidance(model, cfg_scale=4.0, cfg_channel=3)
    out = guided(torch.zeros(SHAPE), torch.zeros(2, dtype=torch.long), None)
    assert out.shape == (2, 8, *SHAPE[2:])
    assert torch.all(out[:, :3] == -1 + 4 * 2)  # uncond + scale x (cond - uncond)
    assert torch.all(out[:, 3:] == 1.0)  # the 4th noise channel and the variance: conditional
    all_channels = classifier_free_guidance(model, 4.0, None)(
        torch.zeros(SHAPE), torch.zeros(2, dtype=torch.long), None
    )
    assert torch.all(all_channels[:, :4] == 7.0) and torch.all(all_channels[:, 4:] == 1.0)


def test_iddpm_respaces_sampling_not_training():
    scheduler = IDDPM(num_sampling_steps=20, timestep_respacing="", cfg_scale=7.0, cfg_channel=3)
    assert scheduler.num_timesteps == 1000 and scheduler.sample_diffusion.num_timesteps == 20


def test_fixed_variance_sampling_is_learned_range_at_its_minimum():
    """FIXED_SMALL is the posterior variance: what LEARNED_RANGE gives for v = -1 (the oracle's)."""
    fixed = GaussianDiffusion.spaced("5", 1000, variance=VarianceType.FIXED_SMALL)
    learned = GaussianDiffusion.spaced("5", 1000)
    target = torch.rand(SHAPE) * 2 - 1
    model = oracle(fixed, target)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = fixed.sample(lambda x, t, m: model(x, t, m)[:, :4], noise, generator=torch.Generator().manual_seed(1))
    assert out.shape == SHAPE
    torch.testing.assert_close(out, learned.sample(model, noise, generator=torch.Generator().manual_seed(1)))
    assert (out - target).abs().max() < 0.05


def dpm_oracle(solver, x0):
    def model(x, step, x_mask):
        t = float(step[0]) / solver.num_timesteps + 1.0 / solver.num_timesteps
        alpha, sigma, _ = solver.alpha_sigma_lambda(t)
        eps = (x - alpha * x0[: len(x)]) / sigma
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


def test_dpm_solver_with_an_oracle_recovers_the_target():
    from sora_model.diffusion import DPMSolver

    solver = DPMSolver(num_sampling_steps=10)
    target = torch.rand(SHAPE) * 2 - 1
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sample = solver.sample(dpm_oracle(solver, target), noise)
    assert (sample - target).abs().mean() < 0.01  # what is left is the noise of step 1 of 1000
    assert torch.equal(sample, solver.sample(dpm_oracle(solver, target), noise))  # an ODE: deterministic


def test_dpm_solver_2m_follows_the_exact_ode_better_than_ddim():
    """Gaussian data has a closed-form denoiser and probability-flow ODE: a reference to compare to."""
    from sora_model.diffusion import DPMSolver

    mean, std = 0.3, 0.5

    def denoiser(solver):
        def model(x, step, x_mask):
            t = float(step[0]) / solver.num_timesteps + 1.0 / solver.num_timesteps
            alpha, sigma, _ = solver.alpha_sigma_lambda(t)
            x0 = mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x - alpha * mean)  # E[x0 | x_t]
            return torch.cat([(x - alpha * x0) / sigma, torch.zeros_like(x)], dim=1)

        return model

    class DDIM(DPMSolver):  # the first-order update at every step
        def sample(self, model, noise, progress=False):
            x, times, channels = noise, self.timesteps(), noise.shape[1]
            for i in range(1, len(times)):
                alpha_p, sigma_p, lambda_p = self.alpha_sigma_lambda(times[i - 1])
                alpha, sigma, lambda_ = self.alpha_sigma_lambda(times[i])
                step = torch.full((x.shape[0],), (times[i - 1] - 1 / 1000) * 1000)
                x0 = (x - sigma_p * model(x, step, None)[:, :channels]) / alpha_p
                x = (sigma / sigma_p) * x - alpha * float(np.expm1(-(lambda_ - lambda_p))) * x0
            return x

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def errors(steps: int) -> tuple[float, float]:
        solver, ddim = DPMSolver(num_sampling_steps=steps), DDIM(num_sampling_steps=steps)
        alpha_1, sigma_1, _ = solver.alpha_sigma_lambda(1.0)
        alpha_e, sigma_e, _ = solver.alpha_sigma_lambda(1.0 / solver.num_timesteps)
        z = (noise - alpha_1 * mean) / np.sqrt(alpha_1**2 * std**2 + sigma_1**2)  # constant along the ODE
        exact = alpha_e * mean + np.sqrt(alpha_e**2 * std**2 + sigma_e**2) * z
        error_2m = (solver.sample(denoiser(solver), noise) - exact).abs().mean().item()
        return error_2m, (ddim.sample(denoiser(ddim), noise) - exact).abs().mean().item()

    # Below 10 steps the last step is first order (as in Open-Sora): 2M beats DDIM.
    error_2m, error_ddim = errors(8)
    assert error_2m < 0.9 * error_ddim, (error_2m, error_ddim)
    # Converging: second order halves DDIM's error at 100 steps.
    error_2m, error_ddim = errors(100)
    assert error_2m < 0.6 * error_ddim and error_2m < 0.01, (error_2m, error_ddim)


def test_build_scheduler_by_config_type():
    from sora_model.diffusion import DPMSolverSampler, build_scheduler

    assert isinstance(build_scheduler("iddpm", 10), IDDPM)
    sampler = build_scheduler("dpm-solver", 10)
    assert isinstance(sampler, DPMSolverSampler)
    with pytest.raises(ValueError, match="need scheduler type 'iddpm'"):
        sampler.sample(lambda x, t, m: x, torch.zeros(SHAPE), torch.zeros(SHAPE), torch.zeros(2, 5))
    with pytest.raises(ValueError):
        build_scheduler("ddim")


def test_respacing_keeps_improved_diffusions_steps():
    # improved-diffusion accumulates the stride and rounds: 21 of 1000 keeps 499 (not 500).
    kept = space_timesteps(1000, "21")
    assert 499 in kept and 500 not in kept and kept[0] == 0 and kept[-1] == 999


def test_the_first_call_sees_the_references_in_the_condition_frames():
    """Open-Sora 1.1 writes the reference latents into the starting latent (apply_mask_strategy
    on z) before sampling: frames not generated from the first step start as their reference."""
    steps = 10
    diffusion = GaussianDiffusion.spaced(str(steps), 1000)
    reference = torch.full(SHAPE, 0.5)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    edit = torch.tensor([[0.0, 0.5, 1.0, 1.0, 1.0]] * 2)
    seen = []

    def model(x, timesteps, x_mask):
        seen.append(x.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    diffusion.sample(model, noise, reference, edit, torch.Generator().manual_seed(1))
    first = seen[0]
    assert torch.equal(first[:, :, :2], reference[:, :, :2])  # edit 0 and 0.5: held, as the reference
    assert torch.equal(first[:, :, 2:], noise[:, :, 2:])  # generated frames start from the noise


def test_edit_ratio_starts_on_open_soras_step():
    """10 steps, edit 0.5: held until step 5, noised there (still a condition for that call), then generated."""
    steps = 10
    diffusion = GaussianDiffusion.spaced(str(steps), 1000)
    calls: list = []
    reference = torch.full(SHAPE, 0.5)
    edit = torch.tensor([[0.0, 0.5, 1.0, 1.0, 1.0]] * 2)
    diffusion.sample(oracle(diffusion, torch.zeros(SHAPE), calls), torch.randn(SHAPE), reference, edit,
                     torch.Generator().manual_seed(0))  # fmt: skip
    active = [bool(call[0, 1]) for call in calls]  # frame 1 of the first sample, steps 9 .. 0
    assert active == [False] * 5 + [True] * 5


# --------------------------------------------------------------------------- iddpm-speed (SpeeDiT)


def speedit_reference():
    """Open-Sora's SpeeDiffusion from its definition, on the linear schedule 1e-4 .. 0.02 over 1000 steps."""
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    slope = np.gradient(np.sqrt(1.0 - alpha_bar))
    p = np.tanh(1e6 * (slope - 1e-4)) + 1.5
    snr = 1.0 / (1.0 - alpha_bar) - 1.0
    return int(np.argmax(slope < 5e-5)) + 1, p / p.sum(), 1.0 / (1.0 + snr)


def test_iddpm_speed_draws_weights_and_mirrors_steps_as_speedit():
    from sora_model.diffusion import IDDPMSpeed, build_scheduler

    speed = build_scheduler("iddpm-speed")
    assert isinstance(speed, IDDPMSpeed)
    meaningful, probabilities, weights = speedit_reference()
    assert speed.meaningful_steps == meaningful == 700
    np.testing.assert_allclose(speed.probabilities.numpy(), probabilities, rtol=1e-9)
    np.testing.assert_allclose(speed.weights, weights, rtol=1e-9)
    np.testing.assert_allclose(speed.weights, 1.0 - speed.train_diffusion.alphas_cumprod, rtol=1e-9)
    assert probabilities[0] / probabilities[-1] == pytest.approx(5.0)  # 2.5 against 0.5
    # n // 2 + 1 draws, then their mirrors about meaningful_steps, cut to n.
    t = speed.sample_timesteps(7, torch.Generator().manual_seed(0))
    drawn, mirrored = t[:4], t[4:]
    assert t.shape == (7,)
    expected = torch.where(drawn < 700, 700 - drawn, drawn - 700)[:3]
    assert torch.equal(mirrored, expected)
    # The draws follow the probabilities: the share of steps below 640.
    many = speed.sample_timesteps(400_000, torch.Generator().manual_seed(1))[:200_001]
    assert float((many < 640).double().mean()) == pytest.approx(probabilities[:640].sum(), abs=0.005)


def test_iddpm_speed_weights_the_mse_only_and_samples_as_iddpm():
    from sora_model.diffusion import build_scheduler

    plain, speed = build_scheduler("iddpm", num_sampling_steps=5), build_scheduler("iddpm-speed", num_sampling_steps=5)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)

    def model(xt, timesteps, x_mask):  # any fixed function of its input
        return torch.cat([0.5 * xt, 0.1 * xt.tanh()], dim=1)

    t = torch.tensor([10, 900])
    a, b = plain.training_losses(model, x0, t, noise), speed.training_losses(model, x0, t, noise)
    weight = torch.from_numpy(1.0 - speed.train_diffusion.alphas_cumprod[t.numpy()]).float()
    torch.testing.assert_close(b["mse"], a["mse"] * weight)
    torch.testing.assert_close(b["vb"], a["vb"])
    torch.testing.assert_close(b["loss"], a["mse"] * weight + a["vb"])

    def guided(x, timesteps, x_mask):  # the doubled batch [conditional; unconditional]
        return model(x, timesteps, x_mask)

    start = torch.randn(SHAPE, generator=generator)
    first = plain.sample(guided, start, generator=torch.Generator().manual_seed(3))
    second = speed.sample(guided, start, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second)
