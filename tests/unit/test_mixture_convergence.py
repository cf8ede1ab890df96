"""Every sampler, fed the exact denoiser of a Gaussian mixture, lands on the mixture.

Bounds come from sampling theory, not tuning: with n samples, a mode's observed fraction has standard
error sqrt(w (1 - w) / n); a component's coordinate mean sqrt(s^2 / n_k); a pooled variance estimate over
n D coordinates s^2 sqrt(2 / (n D)). Each statistic must lie within Z = 5 standard errors of its true
value (a false alarm per check below 6e-7). The step counts are where each solver's discretization
error is small against that: ~100 for high-order ODE solvers, more for first-order and ancestral ones.
"""

from __future__ import annotations

import math

import pytest
import torch

from imagine.diffusion.schedules import karras_sigmas, make_alphas_cumprod, sampling_sigmas
from imagine.evaluation.gaussian_mixture import GaussianMixture
from imagine.samplers import SAMPLERS

Z = 5.0
N = 4000
STEPS = {"ddpm": 500, "euler_a": 500, "ddim": 200, "euler": 200, "heun": 100, "lms": 100, "dpmpp_2m": 100,
         "dpmpp_2m_sde": 100, "unipc": 100}


def _edm_sigmas(steps: int) -> torch.Tensor:
    """EDM's range (sigma_min = 0.002): the final step's shrink s^2 / (s^2 + sigma_min^2) is negligible."""
    return torch.cat([karras_sigmas(0.002, 80.0, steps), torch.zeros(1, dtype=torch.float64)])


def _check_lands_on_mixture(gm: GaussianMixture, out: torch.Tensor, expected_var_ratio: float = 1.0) -> None:
    n, dim = out.shape
    assert torch.isfinite(out).all()
    k = gm.nearest_mode(out)
    frac = torch.bincount(k, minlength=len(gm.weights)).double() / n
    se_w = (gm.weights * (1 - gm.weights) / n).sqrt()
    assert ((frac - gm.weights).abs() <= Z * se_w).all(), f"mode weights {frac.tolist()} vs {gm.weights.tolist()}"
    resid = out.double() - gm.means[k]
    s = float(gm.stds[0])
    for j in range(len(gm.weights)):
        rj = resid[k == j]
        assert (rj.mean(0).abs() <= Z * s / math.sqrt(len(rj))).all(), f"mode {j} mean off by {rj.mean(0).tolist()}"
    var_ratio = float((resid**2).mean()) / s**2
    se_var = math.sqrt(2 / (n * dim))
    assert abs(var_ratio - expected_var_ratio) <= Z * se_var, f"variance ratio {var_ratio:.4f}"


@pytest.mark.parametrize("name", [n for n, info in SAMPLERS.items() if not info.consistency])
def test_sampler_with_exact_denoiser_lands_on_mixture(name):
    gm = GaussianMixture.ring()
    sigmas = _edm_sigmas(STEPS[name])
    g = torch.Generator().manual_seed(0)
    x_T, _ = gm.sample(N, g, sigma=float(sigmas[0]))  # the exact marginal at sigma_max
    out = SAMPLERS[name].fn(gm.denoise, x_T, sigmas, generator=torch.Generator().manual_seed(1))
    _check_lands_on_mixture(gm, out)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "unipc"])
def test_training_schedule_sigmas_land_on_the_shrunk_mixture(name, spacing, karras):
    """On SD's discrete schedule the last step goes from sigma_last = sigmas[-2] (large under trailing
    spacing) straight to 0, returning E[x0 | x], whose per-component variance is s^4 / (s^2 + sigma_last^2):
    the expected variance ratio is s^2 / (s^2 + sigma_last^2), not 1. 250 steps: linspace spacing leaves
    one long log-sigma jump at the low-noise end (0.07 -> 0.029), which multistep solvers need steps to tame."""
    gm = GaussianMixture.ring()
    ac = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    sigmas = sampling_sigmas(ac, 250, spacing, karras=karras, steps_offset=1 if spacing == "leading" else 0).double()
    g = torch.Generator().manual_seed(0)
    x_T, _ = gm.sample(N, g, sigma=float(sigmas[0]))
    out = SAMPLERS[name].fn(gm.denoise, x_T, sigmas)
    s2, last2 = float(gm.stds[0]) ** 2, float(sigmas[-2]) ** 2
    _check_lands_on_mixture(gm, out, expected_var_ratio=s2 / (s2 + last2))


def _exact_consistency_function(gm: GaussianMixture, steps: int = 80):
    """The mixture's PF-ODE solution map f(x, sigma) -> x at 0, by Heun on its exact denoiser: what a perfectly
    distilled consistency model computes."""

    def f(x, sigma, cond=None):
        top = float(sigma.reshape(-1)[0])
        if top <= 0.002:
            return x
        return SAMPLERS["heun"].fn(gm.denoise, x, torch.cat([karras_sigmas(0.002, top, steps),
                                                             torch.zeros(1, dtype=torch.float64)]))

    return f


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_with_the_exact_consistency_function_lands_on_the_mixture(steps):
    """Multistep consistency sampling is exact given the exact consistency function: each step maps an exact
    marginal sample to an exact data sample, and re-noising it to the next level gives that level's exact
    marginal again. So at 1, 2 and 4 steps (on its own timesteps) the samples are the mixture's."""
    from imagine.diffusion.schedules import lcm_sigmas

    gm = GaussianMixture.ring()
    ac = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    sigmas = lcm_sigmas(ac, steps).double()
    x_T, _ = gm.sample(N, torch.Generator().manual_seed(0), sigma=float(sigmas[0]))
    out = SAMPLERS["lcm"].fn(_exact_consistency_function(gm), x_T, sigmas, generator=torch.Generator().manual_seed(1))
    _check_lands_on_mixture(gm, out)


def test_lcm_fed_a_denoiser_is_not_a_consistency_model():
    """The check has teeth for LCM too: one step with the denoiser (E[x0 | x], not the ODE's map) collapses."""
    from imagine.diffusion.schedules import lcm_sigmas

    gm = GaussianMixture.ring()
    sigmas = lcm_sigmas(make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012), 1).double()
    x_T, _ = gm.sample(N, torch.Generator().manual_seed(0), sigma=float(sigmas[0]))
    with pytest.raises(AssertionError):
        _check_lands_on_mixture(gm, SAMPLERS["lcm"].fn(gm.denoise, x_T, sigmas))


def test_a_wrong_sampler_fails_the_check():
    """The check has teeth: skipping the noise of an ancestral step (a classic bug) is caught."""
    gm = GaussianMixture.ring()
    sigmas = _edm_sigmas(100)
    x_T, _ = gm.sample(N, torch.Generator().manual_seed(0), sigma=float(sigmas[0]))
    out = SAMPLERS["ddim"].fn(gm.denoise, x_T, sigmas, eta=0.0)
    out_broken = out * 0 + gm.denoise(x_T, torch.tensor(float(sigmas[0])))  # one-shot denoise: collapses modes
    with pytest.raises(AssertionError):
        _check_lands_on_mixture(gm, out_broken)
