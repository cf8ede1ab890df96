from __future__ import annotations

import pytest
import torch

from imagine.diffusion import parametrization as P
from imagine.diffusion.losses import Posterior, diffusion_loss, hybrid_vlb_term, min_snr_weight, offset_noise, q_sample
from imagine.diffusion.schedules import make_alphas_cumprod

AC = make_alphas_cumprod("linear", 1000, 0.0001, 0.02)


def _batch(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(b, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    ab = AC[t].float().reshape(-1, 1, 1, 1)
    return x0, noise, t, ab.sqrt(), (1 - ab).sqrt()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_targets_and_predictions_round_trip(prediction):
    x0, noise, t, alpha, sigma = _batch()
    x_t = q_sample(x0, t, noise, AC)
    torch.testing.assert_close(x_t, alpha * x0 + sigma * noise)
    target = P.training_target(x0, noise, alpha, sigma, prediction)
    torch.testing.assert_close(P.predict_x0(target, x_t, alpha, sigma, prediction), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(P.predict_eps(target, x_t, alpha, sigma, prediction), noise, atol=2e-3, rtol=1e-3)


def test_snr_is_inverse_sigma_squared_in_ve():
    s = torch.tensor([0.1, 1.0, 14.6])
    alpha, sigma = P.vp_alpha_sigma(s)
    torch.testing.assert_close(P.snr(alpha, sigma), 1 / s**2)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weights_make_every_parametrization_the_same_x0_loss(prediction):
    """Hang et al. 2023: with min-SNR-gamma, each objective equals min(SNR, gamma) ||x0 - x0_hat||^2."""
    x0, noise, t, alpha, sigma = _batch(1)
    x_t = alpha * x0 + sigma * noise
    output = torch.randn_like(x0)
    x0_hat = P.predict_x0(output, x_t, alpha, sigma, prediction)
    snr = P.snr(alpha, sigma).flatten()
    expected = (torch.clamp(snr, max=5.0) * (x0 - x0_hat).pow(2).flatten(1).mean(1)).mean()
    loss = diffusion_loss(output, x0, noise, x_t, t, AC, prediction, min_snr_gamma=5.0)
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=1e-5)
    assert min_snr_weight(torch.tensor([100.0]), 5.0, "eps").item() == pytest.approx(0.05)


def test_offset_noise_adds_per_channel_shift():
    g = torch.Generator().manual_seed(0)
    n = offset_noise((4000, 3, 4, 4), 0.5, generator=g)
    channel_means = n.mean(dim=(2, 3))
    # i.i.d. part contributes 1/16 to the variance of a 4x4 mean, the offset 0.25
    assert channel_means.var().item() == pytest.approx(1 / 16 + 0.25, rel=0.1)
    assert torch.equal(offset_noise((2, 3, 4, 4), 0.0, generator=torch.Generator().manual_seed(1)),
                       torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(1)))


def test_hybrid_vlb_vanishes_for_the_true_reverse_step():
    """Perfect eps and variance = beta-tilde (v = -1): KL(q || p) = 0 for t >= 1 (improved DDPM)."""
    x0, noise, _, _, _ = _batch(2)
    t = torch.tensor([1, 5, 50, 200, 700, 999])
    x_t = q_sample(x0, t, noise, AC)
    v_perfect = -torch.ones_like(x0)
    vlb = hybrid_vlb_term(noise, v_perfect, x0, x_t, t, AC, "eps")
    assert vlb.abs().max().item() < 1e-3
    # variance = beta_t instead: costly at small t, where beta_t and beta-tilde_t differ most
    # (Nichol & Dhariwal Fig. 1), nearly free at large t, where they coincide
    vlb_wrong = hybrid_vlb_term(noise, torch.ones_like(x0), x0, x_t, t, AC, "eps")
    assert (vlb_wrong[:3] > 1e-5).all() and (vlb_wrong >= vlb - 1e-6).all()
    assert (vlb_wrong[:-1] >= vlb_wrong[1:]).all()


def test_hybrid_loss_trains_variance_through_vlb_only():
    x0, noise, t, alpha, sigma = _batch(3)
    x_t = alpha * x0 + sigma * noise
    out = torch.zeros(6, 6, 8, 8, requires_grad=True)
    diffusion_loss(out, x0, noise, x_t, t, AC, "eps", learned_variance=True).backward()
    assert out.grad[:, 3:].abs().sum() > 0  # variance channels get gradient from L_vlb
    out2 = torch.zeros(6, 6, 8, 8, requires_grad=True)
    hybrid_vlb_term(out2[:, :3], out2[:, 3:], x0, x_t, t, AC, "eps").sum().backward()
    assert out2.grad[:, :3].abs().sum() == 0  # stop-gradient on the mean


def test_posterior_variance_is_beta_tilde():
    post = Posterior(AC)
    betas = post.betas
    assert post.variance[0] == 0
    t = 10
    expected = betas[t] * (1 - AC[t - 1]) / (1 - AC[t])
    assert post.variance[t].item() == pytest.approx(expected.item())


def test_loss_refuses_mismatched_shapes():
    x0, noise, t, _, _ = _batch()
    with pytest.raises(ValueError, match="does not match"):
        diffusion_loss(torch.zeros(6, 4, 8, 8), x0, noise, x0, t, AC)
