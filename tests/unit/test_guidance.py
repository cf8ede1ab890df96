from __future__ import annotations

import math

import pytest
import torch

from imagine.guidance import ClassifierFreeGuidance, DynamicThresholding


class CountingDenoiser:
    """x0 = x * scale(label): a conditional model with a visible dependence on its label."""

    def __init__(self):
        self.calls, self.batch_sizes = 0, []

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        label = cond["class_labels"].float().reshape(-1, 1, 1, 1)
        return x * (0.5 + label) / (1 + sigma.reshape(-1, 1, 1, 1))


def _x():
    return torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def test_cfg_is_one_batched_call_and_follows_the_formula():
    den = CountingDenoiser()
    cond, uncond = {"class_labels": torch.tensor([1, 2, 3])}, {"class_labels": torch.zeros(3, dtype=torch.long)}
    cfg = ClassifierFreeGuidance(den, uncond, scale=7.5)
    x, sigma = _x(), torch.full((3,), 2.0)
    out = cfg(x, sigma, cond)
    assert den.calls == 1 and den.batch_sizes == [6]
    d_c, d_u = den(x, sigma, cond), den(x, sigma, uncond)
    torch.testing.assert_close(out, d_u + 7.5 * (d_c - d_u))


def test_cfg_scale_one_is_the_conditional_model_alone():
    den = CountingDenoiser()
    cond = {"class_labels": torch.tensor([1, 2, 3])}
    cfg = ClassifierFreeGuidance(den, {"class_labels": torch.zeros(3, dtype=torch.long)}, scale=1.0)
    out = cfg(_x(), torch.ones(3), cond)
    assert den.batch_sizes == [3]
    torch.testing.assert_close(out, den(_x(), torch.ones(3), cond))


def test_guidance_rescale_restores_the_conditional_noise_std():
    den = CountingDenoiser()
    cond, uncond = {"class_labels": torch.tensor([1, 2, 3])}, {"class_labels": torch.zeros(3, dtype=torch.long)}
    x, sigma = _x(), torch.full((3,), 3.0)
    out = ClassifierFreeGuidance(den, uncond, scale=9.0, rescale=1.0)(x, sigma, cond)
    eps_c = (x - den(x, sigma, cond)) / 3.0
    eps = (x - out) / 3.0
    torch.testing.assert_close(eps.std(dim=(1, 2, 3)), eps_c.std(dim=(1, 2, 3)))
    plain = ClassifierFreeGuidance(den, uncond, scale=9.0, rescale=0.0)(x, sigma, cond)
    assert not torch.allclose(out, plain)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "7"])
def test_non_finite_guidance_scale_is_refused(bad):
    with pytest.raises(ValueError, match="guidance scale must be a finite number"):
        ClassifierFreeGuidance(CountingDenoiser(), None, scale=bad)


def test_rescale_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ClassifierFreeGuidance(CountingDenoiser(), None, scale=5.0, rescale=1.5)


def test_dynamic_thresholding_clips_to_unit_range_and_leaves_small_values():
    big = lambda x, sigma, cond=None: x * 10  # noqa: E731
    out = DynamicThresholding(big, percentile=0.9)(_x(), torch.ones(3))
    assert out.abs().max() <= 1.0 + 1e-6
    small = lambda x, sigma, cond=None: x.clamp(-0.5, 0.5)  # noqa: E731
    torch.testing.assert_close(DynamicThresholding(small)(_x(), torch.ones(3)), _x().clamp(-0.5, 0.5))
