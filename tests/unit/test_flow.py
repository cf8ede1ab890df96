"""Flow matching's math (diffusion/flow.py): the interpolation and its velocity, the bridge to VE noise
levels, the training densities, and the sampling grid and shifts checked against diffusers'
FlowMatchEulerDiscreteScheduler and Flux's shift (test-only oracles)."""

from __future__ import annotations

import math

import pytest
import torch

from imagine.diffusion import flow as F


def _draws(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g), \
        torch.rand(4, 1, 1, 1, generator=g) * 0.98 + 0.01


def test_velocity_recovers_the_clean_sample_and_the_noise():
    x0, eps, t = _draws()
    x_t = F.flow_noisy(x0, eps, t)
    v = F.flow_velocity(x0, eps)
    assert torch.allclose(F.flow_x0(v, x_t, t), x0, atol=1e-5)
    assert torch.allclose(F.flow_eps(v, x_t, t), eps, atol=1e-5)
    # the path is straight: x_t moves at v
    dt = 1e-3
    assert torch.allclose((F.flow_noisy(x0, eps, t + dt) - x_t) / dt, v, atol=1e-2)
    assert torch.equal(F.flow_noisy(x0, eps, torch.zeros_like(t)), x0)


def test_a_flow_sample_is_a_ve_sample_scaled():
    x0, eps, t = _draws(1)
    sigma = F.flow_sigma(t)
    assert torch.allclose(F.flow_noisy(x0, eps, t) / (1 - t), x0 + sigma * eps, atol=1e-5)
    assert torch.allclose(F.flow_t(sigma), t, atol=1e-6)


def test_shift_moves_towards_noise_and_keeps_the_ends():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = F.shift_t(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:-1] > t[1:-1]).all())
    assert torch.equal(F.shift_t(t, 1.0), t)


def test_flux_shift_is_diffusers_calculate_shift():
    calculate_shift = pytest.importorskip("diffusers.pipelines.flux.pipeline_flux").calculate_shift
    for tokens in (256, 1024, 4096, 6000):
        assert F.flux_mu(tokens) == pytest.approx(calculate_shift(tokens))


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_the_sampling_grid_is_diffusers_flow_match_euler(steps):
    diffusers = pytest.importorskip("diffusers")
    for shift in (1.0, 3.0):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(steps)
        assert torch.allclose(F.flow_timesteps(steps, shift=shift), scheduler.sigmas, atol=1e-6)
    mu = F.flux_mu(4096)
    dynamic = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(steps, mu=mu)
    assert torch.allclose(F.flow_timesteps(steps, mu=mu), dynamic.sigmas, atol=1e-6)
    flux = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    flux.set_timesteps(sigmas=[float(v) for v in torch.linspace(1, 1 / steps, steps)], mu=mu)  # FluxPipeline's grid
    assert torch.allclose(F.flow_timesteps(steps, mu=mu, last=1 / steps), flux.sigmas, atol=1e-6)


def test_an_euler_step_on_the_grid_is_the_schedulers_step():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    ts = F.flow_timesteps(6, shift=3.0)
    x0, eps, _ = _draws(2)
    x = eps.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        v = F.flow_velocity(x0, eps)  # the exact velocity of this straight path
        ours = x + (ts[i + 1] - ts[i]) * v
        x = scheduler.step(v, timestep, x).prev_sample
        assert torch.allclose(ours, x, atol=1e-5)
    assert torch.allclose(x, x0, atol=1e-5)  # Euler is exact on a straight path


def test_training_densities():
    g = torch.Generator().manual_seed(0)
    uniform = F.sample_t(20000, "uniform", generator=g)
    logit = F.sample_t(20000, "logit_normal", generator=g)
    mode = F.sample_t(20000, "mode", generator=g)
    flat_mode = F.sample_t(20000, "mode", generator=g, mode_scale=0.0)
    for t in (uniform, logit, mode, flat_mode):
        assert t.dtype == torch.float32 and bool(((t >= 0) & (t <= 1)).all())
    middle = lambda t: float(((t > 0.3) & (t < 0.7)).float().mean())  # noqa: E731
    assert middle(uniform) == pytest.approx(0.4, abs=0.02) and middle(flat_mode) == pytest.approx(0.4, abs=0.02)
    assert middle(logit) > 0.5 and middle(mode) > 0.45  # both weigh the middle more than uniform
    assert float(logit.median()) == pytest.approx(0.5, abs=0.02)
    shifted = F.sample_t(20000, "logit_normal", generator=g, mean=1.0)
    assert float(shifted.median()) == pytest.approx(1 / (1 + math.exp(-1)), abs=0.02)
    with pytest.raises(ValueError, match="density 'cosine' unknown"):
        F.sample_t(4, "cosine")
    with pytest.raises(ValueError, match="mode_scale"):
        F.sample_t(4, "mode", mode_scale=3.0)
