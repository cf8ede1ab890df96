"""The eps, x0 and v parametrizations and SNR, written once (STYLE rule 1).

A noisy sample is x_t = alpha x_0 + sigma eps. In the variance-preserving (VP) view alpha^2 + sigma^2 = 1;
the VE view used by the samplers has alpha = 1. Velocity (Salimans & Ho 2022, eq. 6 of
"Progressive Distillation") is v = alpha eps - sigma x_0, defined for VP.

Shapes: ``alpha`` and ``sigma`` are broadcastable to the sample, e.g. (B, 1, 1, 1).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

# eps, v and x0 on a VP schedule; flow: the velocity eps - x0 of rectified flow (diffusion/flow.py)
Prediction = Literal["eps", "v", "x0", "flow"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)


def check_prediction(prediction: str) -> Prediction:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction type {prediction!r} unknown; choose one of: {', '.join(PREDICTIONS)}")
    return prediction  # type: ignore[return-value]


def vp_alpha_sigma(sigma_ve: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VE noise level -> VP (alpha, sigma): alpha = 1 / sqrt(1 + s^2), sigma = s alpha."""
    alpha = (1 + sigma_ve**2).rsqrt()
    return alpha, sigma_ve * alpha


def predict_x0(
    output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: Prediction
) -> torch.Tensor:
    """The network's output, read as ``prediction``, turned into an estimate of x_0 (VP x_t)."""
    if prediction == "eps":
        return (x_t - sigma * output) / alpha
    if prediction == "v":
        return alpha * x_t - sigma * output
    if prediction == "x0":
        return output
    raise ValueError(check_prediction(prediction))


def predict_eps(
    output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: Prediction
) -> torch.Tensor:
    """The network's output turned into an estimate of eps (VP x_t)."""
    if prediction == "eps":
        return output
    if prediction == "v":
        return sigma * x_t + alpha * output
    if prediction == "x0":
        return (x_t - alpha * output) / sigma
    raise ValueError(check_prediction(prediction))


def training_target(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: Prediction
) -> torch.Tensor:
    """What the network regresses onto for each parametrization."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "x0":
        return x0
    raise ValueError(check_prediction(prediction))


def snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SNR = alpha^2 / sigma^2."""
    return alpha**2 / sigma**2


# Latent Consistency Models' boundary parametrization (Luo et al. 2023, eq. 8; diffusers' LCMScheduler):
# sigma_data of the latents, and how integer timesteps are scaled before c_skip and c_out read them
CONSISTENCY_SIGMA_DATA = 0.5
CONSISTENCY_TIMESTEP_SCALING = 10.0


def consistency_scalings(t: torch.Tensor, sigma_data: float = CONSISTENCY_SIGMA_DATA,
                         timestep_scaling: float = CONSISTENCY_TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at training timesteps t: c_skip = s_d^2 / ((t k)^2 + s_d^2), c_out = t k / sqrt((t k)^2
    + s_d^2) with k the timestep scaling. At t = 0, c_skip = 1 and c_out = 0, so the consistency function
    f(x, 0) = x holds exactly (the boundary condition), whatever the network."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def consistency_output(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat (VP x_t, t (B,))."""
    c_skip, c_out = (c.to(x_t.device, x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
                     for c in consistency_scalings(t))
    return c_skip * x_t + c_out * x0
