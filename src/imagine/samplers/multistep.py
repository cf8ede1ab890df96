"""Multistep samplers: LMS, DPM-Solver++(2M), DPM-Solver++(2M) SDE and UniPC.

History (earlier denoiser outputs) lives in local variables (STYLE rule 2). The exponential
integrators work in lambda = -log(sigma) (the VE form of log(alpha / sigma)); at the final step to
sigma = 0 every one of them falls back to first order, whose result there is the denoised sample.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from imagine.diffusion.denoiser import Cond, DenoiserFn, broadcast_sigma
from imagine.samplers.common import (
    Callback,
    Generator,
    Signal,
    check_sigmas,
    from_ve,
    randn_like,
    report,
    to_d,
    to_ve,
    ve_sigmas,
)


def lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through the last ``order``
    noise levels that is 1 at sigma_{i-j}: the weight of the j-th most recent derivative. Exact
    (the polynomial is integrated in closed form, where k-diffusion and diffusers call scipy.quad)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly *= np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    integral = poly.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


@torch.no_grad()
def sample_lms(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    generator: Generator = None, callback: Callback = None, signal: Signal = None, order: int = 4,
) -> torch.Tensor:
    """Linear multistep method of ``order`` on the probability-flow ODE in sigma (Karras et al. 2022's
    k-diffusion sample_lms; diffusers' LMSDiscreteScheduler)."""
    if order < 1:
        raise ValueError(f"LMS order must be >= 1, got {order}")
    sigmas_list = check_sigmas(sigmas).tolist()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas_list) - 1):
        denoised = denoiser(x, broadcast_sigma(sigmas_list[i], x), cond)
        report(callback, i, x, sigmas_list[i], denoised, len(sigmas_list) - 1)
        ds = [*ds, to_d(x, sigmas_list[i], denoised)][-order:]
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigmas_list, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    generator: Generator = None, callback: Callback = None, signal: Signal = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022b (arXiv 2211.01095), data prediction:
    x_next = (s_next / s) x - expm1(-h) D, with D the second-order (midpoint) combination
    D0 + (D0 - D_prev) / (2 r), r = h_prev / h. An exponential integrator in the log noise-to-signal ratio:
    it walks the VE sample (samplers/common.py), whatever the model's own time."""
    model_sigmas = check_sigmas(sigmas).tolist()
    sigmas_list = ve_sigmas(model_sigmas, signal)
    x, _ = to_ve(x, model_sigmas[0], signal)
    old_denoised, h_last = None, None
    for i in range(len(sigmas_list) - 1):
        sigma, sigma_next = sigmas_list[i], sigmas_list[i + 1]
        x_model = from_ve(x, model_sigmas[i], signal)
        denoised = denoiser(x_model, broadcast_sigma(model_sigmas[i], x), cond)
        report(callback, i, x_model, model_sigmas[i], denoised, len(sigmas_list) - 1)
        if sigma_next == 0:
            x = denoised
            break
        h = math.log(sigma / sigma_next)
        d = denoised
        if old_denoised is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return from_ve(x, model_sigmas[-1], signal)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    generator: Generator = None, callback: Callback = None, signal: Signal = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), midpoint variant (Lu et al. 2022b, eq. 18 and Appendix), VE form:
    x_next = (s_next/s) e^-h x + (1 - e^-2h)(D0 + D1/2) + s_next sqrt(1 - e^-2h) z, D1 = (D0 - D_prev)/r.
    One noise draw per step, as diffusers' sde-dpmsolver++ does."""
    sigmas_list = check_sigmas(sigmas).tolist()
    old_denoised, h_last = None, None
    for i in range(len(sigmas_list) - 1):
        sigma, sigma_next = sigmas_list[i], sigmas_list[i + 1]
        denoised = denoiser(x, broadcast_sigma(sigma, x), cond)
        report(callback, i, x, sigma, denoised, len(sigmas_list) - 1)
        noise = randn_like(x, generator)
        if sigma_next == 0:
            x = denoised
            break
        sigma_model_next = sigma_next
        x, sigma = to_ve(x, sigma, signal)  # the step is taken on the VE sample (samplers/common.py)
        sigma_next = sigma_next / (1.0 if signal is None else signal(sigma_next))
        h = math.log(sigma / sigma_next)
        d = denoised
        if old_denoised is not None:
            r = h_last / h
            d = denoised + 0.5 * (denoised - old_denoised) / r
        x = (sigma_next / sigma) * math.exp(-h) * x + (-math.expm1(-2 * h)) * d
        x = x + sigma_next * math.sqrt(-math.expm1(-2 * h)) * noise
        x = from_ve(x, sigma_model_next, signal)
        old_denoised, h_last = denoised, h
    return x


def _unipc_b(h: float, order: int) -> list[float]:
    """UniPC's right-hand side b_k = k! phi_{k+1}(-h) / B(h) for k = 1..order, with B(h) = expm1(-h)
    (the "bh2" variant; Zhao et al. 2023, eq. 9 and Appendix), data prediction so hh = -h."""
    hh = -h
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial, out = 1, []
    for k in range(1, order + 1):
        out.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return out


@torch.no_grad()
def sample_unipc(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    generator: Generator = None, callback: Callback = None, signal: Signal = None, order: int = 2,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, arXiv 2302.04867): the UniP predictor of ``order`` (bh2, data prediction)
    and the UniC corrector, which reuses the denoiser call at the new point, so one call per step.
    Warm-up from first order, first order on the last step (diffusers' lower_order_final)."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    model_sigmas = check_sigmas(sigmas).tolist()
    sigmas_list = ve_sigmas(model_sigmas, signal)  # an exponential integrator: it walks the VE sample
    x, _ = to_ve(x, model_sigmas[0], signal)
    n = len(sigmas_list) - 1
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas_list]
    history: list[torch.Tensor] = []  # denoised outputs, most recent last
    last_x, last_order = None, 0
    for i in range(n):
        x_model = from_ve(x, model_sigmas[i], signal)
        denoised = denoiser(x_model, broadcast_sigma(model_sigmas[i], x), cond)
        report(callback, i, x_model, model_sigmas[i], denoised, n)
        if last_x is not None:  # UniC: correct x at sigma_i using the new evaluation
            x = _unipc_update(last_x, history, sigmas_list, lambdas, i - 1, last_order, corrector=denoised)
        history = [*history, denoised][-order:]
        this_order = min(order, n - i, len(history))
        last_x, last_order = x, this_order
        x = _unipc_update(x, history, sigmas_list, lambdas, i, this_order, corrector=None)
    return from_ve(x, model_sigmas[-1], signal)


def _unipc_update(
    x: torch.Tensor, history: list[torch.Tensor], sigmas: list[float], lambdas: list[float], i: int,
    order: int, corrector: torch.Tensor | None,
) -> torch.Tensor:
    """One UniP (corrector=None) or UniC step from sigma_i to sigma_{i+1}; history[-1] is D(x, sigma_i)."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    m0 = history[-1]
    if sigma_next == 0:  # h = inf: every order reduces to the denoised sample
        return m0 if corrector is None else corrector
    h = lambdas[i + 1] - lambdas[i]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lambdas[i - k] - lambdas[i]) / h
        rks.append(rk)
        d1s.append((history[-(k + 1)] - m0) / rk)
    x_base = (sigma_next / sigma) * x - math.expm1(-h) * m0
    b_h = math.expm1(-h)
    b = _unipc_b(h, order)
    if corrector is None:
        if not d1s:
            return x_base
        if order == 2:
            rhos = [0.5]
        else:
            r_mat = np.array([[rk ** (p - 1) for rk in [*rks, 1.0]] for p in range(1, order + 1)])
            rhos = np.linalg.solve(r_mat[:-1, :-1], np.array(b[:-1])).tolist()
        res = sum(r * d for r, d in zip(rhos, d1s, strict=True))
        return x_base - b_h * res
    if order == 1:
        rhos_c = [0.5]
    else:
        r_mat = np.array([[rk ** (p - 1) for rk in [*rks, 1.0]] for p in range(1, order + 1)])
        rhos_c = np.linalg.solve(r_mat, np.array(b)).tolist()
    res = sum((r * d for r, d in zip(rhos_c[:-1], d1s, strict=True)), torch.zeros_like(x))
    return x_base - b_h * (res + rhos_c[-1] * (corrector - m0))
