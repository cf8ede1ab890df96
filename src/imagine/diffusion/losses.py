"""The forward process and the training objectives.

- q(x_t | x_0) in closed form (Ho et al. 2020, eq. 4), with optional offset noise;
- eps, v and x0 regression (STYLE rule 1: targets come from parametrization.py);
- min-SNR-gamma weighting (Hang et al. 2023, arXiv 2303.09556), expressed for each parametrization;
- the improved-DDPM hybrid loss L_simple + lambda L_vlb with learned variance (Nichol & Dhariwal 2021,
  section 3.1), L_vlb taken with a stop-gradient on the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from imagine.diffusion import parametrization as P
from imagine.diffusion.denoiser import append_dims


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps; x0, noise (B, ...), t (B,) integer."""
    ab = append_dims(alphas_cumprod.to(x0.device)[t].to(x0.dtype), x0.ndim)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def offset_noise(
    shape: torch.Size | tuple[int, ...], strength: float, *, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """eps + strength * per-channel constant (Guttenberg 2023, "Diffusion with offset noise"): lets a
    model learn to shift an image's mean brightness, which pure i.i.d. noise hides at high SNR."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if strength:
        noise = noise + strength * torch.randn((*shape[:2], *([1] * (len(shape) - 2))), generator=generator,
                                               device=device, dtype=dtype)
    return noise


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: P.Prediction) -> torch.Tensor:
    """Per-sample loss weight of min-SNR-gamma: min(SNR, gamma) on the x0 loss, which is
    min(SNR, gamma) / SNR on the eps loss and min(SNR, gamma) / (SNR + 1) on the v loss."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantized to 256 bins under N(mean, e^(2 log_scale)) (Ho et al. 2020,
    eq. 13: the decoder term L_0). Elementwise, in nats."""
    centered = x - mean
    inv_stdv = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


@dataclass(frozen=True)
class Posterior:
    """q(x_{t-1} | x_t, x_0) of the discrete chain: the true reverse step DDPM learns (eq. 6-7)."""

    alphas_cumprod: torch.Tensor  # (T,) float64

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return append_dims(values.to(like.device)[t].to(like.dtype), like.ndim)

    @property
    def betas(self) -> torch.Tensor:
        ab = self.alphas_cumprod
        return 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])

    @property
    def variance(self) -> torch.Tensor:
        """beta-tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t), zero at t = 0."""
        ab = self.alphas_cumprod
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return self.betas * (1 - ab_prev) / (1 - ab)

    @property
    def log_variance_clipped(self) -> torch.Tensor:
        """log beta-tilde with the t = 0 entry (zero) replaced by t = 1's, as improved DDPM does."""
        v = self.variance
        return torch.cat([v[1:2], v[1:]]).log()

    def mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        coef_x0 = self.betas * ab_prev.sqrt() / (1 - ab)
        coef_xt = (1 - ab_prev) * (1 - self.betas).sqrt() / (1 - ab)
        return self._at(coef_x0, t, x0) * x0 + self._at(coef_xt, t, x_t) * x_t


def hybrid_vlb_term(
    model_output_mean: torch.Tensor, model_var_values: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
    t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: P.Prediction,
) -> torch.Tensor:
    """L_vlb per sample (bits per dim) for a model that learns its variance (improved DDPM, eq. 15):
    log Sigma = v' log beta_t + (1 - v') log beta-tilde_t, v' = (v + 1) / 2. The mean comes from the
    prediction with its gradient stopped, so L_vlb trains only the variance (section 3.1).

    model_output_mean: the first C channels of the network output; model_var_values: the last C."""
    post = Posterior(alphas_cumprod)
    ab = append_dims(alphas_cumprod.to(x_t.device)[t].to(x_t.dtype), x_t.ndim)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    x0_pred = P.predict_x0(model_output_mean.detach(), x_t, alpha, sigma, prediction).clamp(-1, 1)
    model_mean = post.mean(x0_pred, x_t, t)
    min_log = post._at(post.log_variance_clipped, t, x_t)
    max_log = post._at(post.betas.log(), t, x_t)
    frac = (model_var_values + 1) / 2
    model_log_var = frac * max_log + (1 - frac) * min_log
    true_mean = post.mean(x0, x_t, t)
    kl = normal_kl(true_mean, min_log, model_mean, model_log_var)
    kl = kl.flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    nll = nll.flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def diffusion_loss(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: P.Prediction = "eps",
    *,
    min_snr_gamma: float | None = None,
    learned_variance: bool = False,
    vlb_weight: float = 0.001,
) -> torch.Tensor:
    """The training loss for one batch, a scalar.

    model_output: (B, C, ...) or (B, 2C, ...) when ``learned_variance``; x0, noise, x_t: (B, C, ...);
    t: (B,) integer timesteps. L = mean over the batch of w(t) * ||target - output||^2 (mean over
    elements), plus ``vlb_weight`` * L_vlb * T / 1000 when the variance is learned (L_hybrid, with
    improved-diffusion's rescaling of the vlb term by the number of steps)."""
    P.check_prediction(prediction)
    var_values = None
    if learned_variance:
        model_output, var_values = model_output.chunk(2, dim=1)
    if model_output.shape != x0.shape:
        raise ValueError(f"model output {tuple(model_output.shape)} does not match the data {tuple(x0.shape)}")
    ab = append_dims(alphas_cumprod.to(x0.device)[t].to(x0.dtype), x0.ndim)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    target = P.training_target(x0, noise, alpha, sigma, prediction)
    mse = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if min_snr_gamma is not None:
        snr = P.snr(alpha, sigma).flatten()
        mse = mse * min_snr_weight(snr.float(), min_snr_gamma, prediction)
    loss = mse.mean()
    if learned_variance:
        assert var_values is not None
        vlb = hybrid_vlb_term(model_output, var_values, x0, x_t, t, alphas_cumprod, prediction)
        loss = loss + vlb_weight * vlb.mean() * len(alphas_cumprod) / 1000.0
    return loss
