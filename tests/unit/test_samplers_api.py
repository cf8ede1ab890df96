"""The sampler registry, A1111 names, bad input, callbacks and reproducibility across batch sizes."""

from __future__ import annotations

import pytest
import torch

from imagine.diffusion.schedules import karras_sigmas
from imagine.evaluation.gaussian_mixture import GaussianMixture
from imagine.samplers import SAMPLERS, check_schedule, resolve

REQUIRED = ["ddpm", "ddim", "euler", "euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]


def _sigmas(n=8):
    return torch.cat([karras_sigmas(0.01, 20.0, n), torch.zeros(1, dtype=torch.float64)]).float()


def test_every_required_sampler_is_registered():
    assert set(REQUIRED) <= set(SAMPLERS)


@pytest.mark.parametrize("alias,expected", [
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")), ("Euler a", ("euler_a", "default")),
    ("dpm++ 2m sde karras", ("dpmpp_2m_sde", "karras")), ("UniPC", ("unipc", "default")),
    ("LMS Karras", ("lms", "karras")), ("heun", ("heun", "default")), ("DDIM", ("ddim", "default")),
])
def test_a1111_names_resolve(alias, expected):
    assert resolve(alias) == expected


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as err:
        resolve("eulr")
    assert "sampler 'eulr' unknown" in str(err.value)
    for name in REQUIRED:
        assert name in str(err.value)
    assert "DPM++ 2M Karras" in str(err.value)


def test_unknown_sigma_schedule_lists_valid_names():
    assert check_schedule("Karras") == "karras"
    with pytest.raises(ValueError, match="choose one of: default, karras"):
        check_schedule("exponential")


@pytest.mark.parametrize("name", REQUIRED)
@pytest.mark.parametrize("bad", [[5.0, 5.0, 0.0], [1.0, 2.0, 0.0], [3.0], [3.0, float("nan"), 0.0], [2.0, -1.0]])
def test_sigmas_that_do_not_decrease_are_refused(name, bad):
    gm = GaussianMixture.ring()
    with pytest.raises(ValueError, match="sigmas must"):
        SAMPLERS[name].fn(gm.denoise, torch.zeros(2, 2), torch.tensor(bad))


@pytest.mark.parametrize("name", REQUIRED)
def test_callback_sees_every_step_and_input_is_not_mutated(name):
    gm = GaussianMixture.ring()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * 20
    x_copy = x.clone()
    seen = []
    SAMPLERS[name].fn(gm.denoise, x, _sigmas(), generator=torch.Generator().manual_seed(0),
                      callback=lambda info: seen.append((info["i"], info["total"])))
    assert [i for i, _ in seen] == list(range(8)) and all(total == 8 for _, total in seen)
    assert torch.equal(x, x_copy)


@pytest.mark.parametrize("name", [n for n in REQUIRED if SAMPLERS[n].stochastic])
def test_stochastic_samplers_are_batch_size_invariant_with_per_image_generators(name):
    """Image i of a batch, seeded with its own generator, equals the same image sampled alone."""
    gm = GaussianMixture.ring()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)).double() * 20
    batch = SAMPLERS[name].fn(gm.denoise, x, _sigmas(), generator=[torch.Generator().manual_seed(10 + i)
                                                                      for i in range(4)])
    alone = SAMPLERS[name].fn(gm.denoise, x[2:3], _sigmas(), generator=[torch.Generator().manual_seed(12)])
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=1e-12)
    again = SAMPLERS[name].fn(gm.denoise, x, _sigmas(), generator=[torch.Generator().manual_seed(10 + i)
                                                                      for i in range(4)])
    assert torch.equal(batch, again)


def test_ddpm_learned_variance_needs_a_model_that_learns_it():
    from imagine.diffusion.denoiser import Denoiser
    from imagine.diffusion.schedules import make_alphas_cumprod

    den = Denoiser(lambda x, t: torch.zeros_like(x), make_alphas_cumprod())
    with pytest.raises(ValueError, match="does not learn its variance"):
        SAMPLERS["ddpm"].fn(den, torch.zeros(1, 1, 2, 2), _sigmas(), variance="learned")
    with pytest.raises(ValueError, match="DDPM variance 'huge' unknown"):
        SAMPLERS["ddpm"].fn(den, torch.zeros(1, 1, 2, 2), _sigmas(), variance="huge")
