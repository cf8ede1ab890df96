"""The eps, x0 and v parametrizations and SNR, written once (STYLE rule 1).

A noisy sample is x_t = alpha x_0 + sigma eps. In the variance-preserving (VP) view alpha^2 + sigma^2 = 1;
the VE view used by the samplers has alpha = 1. Velocity (Salimans & Ho 2022, eq. 6 of
"Progressive Distillation") is v = alpha eps - sigma x_0, defined for VP.

Shapes: ``alpha`` and ``sigma`` are broadcastable to the sample, e.g. (B, 1, 1, 1).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

Prediction = Literal["eps", "v", "x0"]
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
