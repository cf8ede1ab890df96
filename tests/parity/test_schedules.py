"""Our schedules, spacings and Karras sigmas against diffusers' (test-only oracle)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from imagine.diffusion.schedules import (
    make_betas,
    rescale_zero_terminal_snr,
    sampling_sigmas,
    spaced_timesteps,
)

DIFFUSERS_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                   "sigmoid": "sigmoid"}


@pytest.mark.parametrize("name", list(DIFFUSERS_NAMES))
def test_betas_match_diffusers(name):
    ref = DDPMScheduler(beta_schedule=DIFFUSERS_NAMES[name], beta_start=0.00085, beta_end=0.012).betas
    ours = make_betas(name, 1000, 0.00085, 0.012)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_matches_diffusers(name):
    betas = make_betas(name, 1000, 0.00085, 0.012)
    ours = rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(ours.float(), diffusers_rescale(betas.float()), rtol=1e-4, atol=1e-6)
    assert torch.cumprod(1 - ours, 0)[-1] == 0  # SNR(T-1) = 0 exactly
    assert torch.equal(betas, make_betas(name, 1000, 0.00085, 0.012))  # the input is untouched


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_euler_family_timesteps_and_sigmas_match_diffusers(spacing, steps):
    offset = 1 if spacing == "leading" else 0
    s = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                               timestep_spacing=spacing, steps_offset=offset)
    s.set_timesteps(steps)
    ts = spaced_timesteps(1000, steps, spacing, steps_offset=offset)
    torch.testing.assert_close(ts.float(), s.timesteps.float())
    sig = sampling_sigmas(s.alphas_cumprod.double(), steps, spacing, steps_offset=offset, interpolation="linear")
    torch.testing.assert_close(sig, s.sigmas.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [5, 20])
def test_dpm_family_timesteps_and_sigmas_match_diffusers(spacing, karras, steps):
    offset = 1 if spacing == "leading" else 0
    s = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras)
    s.set_timesteps(steps)
    ac = s.alphas_cumprod.double()
    if karras:
        sig = sampling_sigmas(ac, steps, "linspace", karras=True)
    else:
        sig = sampling_sigmas(ac, steps, spacing, steps_offset=offset, exclude_t0=True)
        torch.testing.assert_close(spaced_timesteps(1000, steps, spacing, steps_offset=offset, exclude_t0=True).long(),
                                   s.timesteps)
    torch.testing.assert_close(sig, s.sigmas.float(), rtol=1e-5, atol=1e-6)
