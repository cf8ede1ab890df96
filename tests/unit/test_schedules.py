from __future__ import annotations

import math

import pytest
import torch

from imagine.diffusion.schedules import (
    karras_sigmas,
    make_alphas_cumprod,
    sampling_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    t_to_sigma,
)


def test_cosine_schedule_follows_its_closed_form():
    """Nichol & Dhariwal eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi / 2)."""
    ac = make_alphas_cumprod("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 10, 500, 900]:
        assert ac[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


@pytest.mark.parametrize("interpolation", ["log", "linear"])
def test_sigma_to_t_inverts_t_to_sigma(interpolation):
    ac = make_alphas_cumprod()
    t = torch.tensor([0.0, 0.25, 1.5, 10.0, 333.3, 998.9, 999.0], dtype=torch.float64)
    back = sigma_to_t(t_to_sigma(t, ac, interpolation), ac, interpolation=interpolation)
    torch.testing.assert_close(back, t, atol=1e-7, rtol=0)
    assert torch.equal(sigma_to_t(t_to_sigma(t, ac), ac, quantize=True), t.round())


def test_zero_terminal_snr_keeps_sigma_max_finite():
    ac = make_alphas_cumprod(zero_terminal_snr=True)
    assert ac[-1] == 0
    sig = sigmas_from_alphas_cumprod(ac)
    assert torch.isfinite(sig).all() and sig[-1] > 1000
    s = sampling_sigmas(ac, 10, "trailing")
    assert (s[1:] < s[:-1]).all()


def test_karras_sigmas_follow_eq5():
    s = karras_sigmas(0.1, 10.0, 5, rho=7.0)
    assert s[0].item() == pytest.approx(10.0) and s[-1].item() == pytest.approx(0.1)
    inv = s ** (1 / 7)  # uniform in sigma^(1/rho)
    torch.testing.assert_close(inv[1:] - inv[:-1], (inv[1] - inv[0]).expand(4))


def test_spacings_cover_the_documented_ranges():
    assert spaced_timesteps(1000, 10, "trailing").tolist()[0] == 999
    assert spaced_timesteps(1000, 10, "leading", steps_offset=1).tolist() == [901 - 100 * i for i in range(10)]
    assert spaced_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_steps_below_one_are_refused(bad):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        spaced_timesteps(1000, bad, "leading")


def test_unknown_schedule_and_spacing_list_valid_names():
    with pytest.raises(ValueError, match="choose one of: linear, scaled_linear, cosine, sigmoid"):
        make_alphas_cumprod("quadratic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="choose one of: leading, trailing, linspace"):
        spaced_timesteps(1000, 10, "uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot exceed"):
        spaced_timesteps(1000, 1001, "leading")
