"""One-step samplers: DDPM, DDIM, Euler, Euler ancestral and Heun.

In the VE view these share one skeleton: DDIM with eta = 0 is Euler's method on the probability-flow
ODE, and DDPM with its fixed-small variance is the ancestral (eta = 1) step (Karras et al. 2022,
section 3; Song et al. 2020, eq. 12 and 16). Signature: ``(denoiser, x, sigmas, *, cond, generator,
callback, **options) -> x`` with x at noise level sigmas[0] and the result at sigmas[-1].
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from imagine.diffusion.denoiser import Cond, DenoiserFn, broadcast_sigma
from imagine.samplers.common import (
    Callback,
    Generator,
    Signal,
    ancestral_split,
    check_sigmas,
    from_ve,
    randn_like,
    report,
    to_d,
    to_ve,
)

DDPMVariance = Literal["fixed_small", "fixed_large", "learned"]


@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    generator: Generator = None, callback: Callback = None, signal: Signal = None,
) -> torch.Tensor:
    """Algorithm 2 of Karras et al. 2022 without churn, first order: x += d (sigma_next - sigma)."""
    sigmas = check_sigmas(sigmas).tolist()
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, broadcast_sigma(sigmas[i], x), cond)
        report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    generator: Generator = None, callback: Callback = None, signal: Signal = None, eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2020, eq. 12), VE form: x_next = x0 + sqrt(s_next^2 - s_up^2) eps + s_up z,
    with s_up from eta (eq. 16). eta = 0 is deterministic; eta = 1 is the DDPM posterior."""
    if not 0.0 <= eta or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    sigmas = check_sigmas(sigmas).tolist()
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, broadcast_sigma(sigmas[i], x), cond)
        report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        x, sigma = to_ve(x, sigmas[i], signal)
        sigma_next = sigmas[i + 1] / (1.0 if signal is None else signal(sigmas[i + 1]))
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        eps = to_d(x, sigma, denoised)
        x = denoised + eps * sigma_down
        if sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
        x = from_ve(x, sigmas[i + 1], signal)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    generator: Generator = None, callback: Callback = None, signal: Signal = None, eta: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral ("Euler a"): an Euler step down to sigma_down, then fresh noise of std sigma_up.
    Identical to DDIM with the same eta; kept under its own name because users ask for it by name."""
    return sample_ddim(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, eta=eta,
                       signal=signal)


@torch.no_grad()
def sample_heun(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    generator: Generator = None, callback: Callback = None, signal: Signal = None,
) -> torch.Tensor:
    """Algorithm 1 of Karras et al. 2022 (Heun's second-order method); the last step to sigma = 0 is an
    Euler step, so N steps cost 2N - 1 denoiser calls."""
    sigmas = check_sigmas(sigmas).tolist()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, broadcast_sigma(sigma, x), cond)
        report(callback, i, x, sigma, denoised, len(sigmas) - 1)
        d = to_d(x, sigma, denoised)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = to_d(x_euler, sigma_next, denoiser(x_euler, broadcast_sigma(sigma_next, x), cond))
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    generator: Generator = None, callback: Callback = None, signal: Signal = None,
    variance: DDPMVariance = "fixed_small",
) -> torch.Tensor:
    """Ancestral sampling from the DDPM reverse process (Ho et al. 2020, Algorithm 2), between any two
    noise levels s > t of the schedule: mean x0 + (t^2 / s^2)(x - x0) (the posterior mean, eq. 7), and
    in the VE view the variances
      fixed_small: beta-tilde, t^2 (s^2 - t^2) / s^2,
      fixed_large: beta, (s^2 - t^2) (1 + t^2) / (1 + s^2),
      learned: exp(v' log beta + (1 - v') log beta-tilde), v' = (v + 1) / 2, the model's v
        (Nichol & Dhariwal 2021, eq. 15; needs a denoiser with ``denoise_with_variance``)."""
    if variance not in ("fixed_small", "fixed_large", "learned"):
        raise ValueError(f"DDPM variance {variance!r} unknown; choose one of: fixed_small, fixed_large, learned")
    sigmas = check_sigmas(sigmas).tolist()
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        if variance == "learned":
            denoised, v = denoiser.denoise_with_variance(x, broadcast_sigma(s, x), cond)  # type: ignore[attr-defined]
        else:
            denoised = denoiser(x, broadcast_sigma(s, x), cond)
        report(callback, i, x, s, denoised, len(sigmas) - 1)
        x, s = to_ve(x, s, signal)
        t_model, t = t, t / (1.0 if signal is None else signal(t))
        x = denoised + (t**2 / s**2) * (x - denoised)
        if t == 0:
            x = from_ve(x, t_model, signal)
            continue
        small = max(t**2 * (s**2 - t**2) / s**2, 1e-20)
        large = (s**2 - t**2) * (1 + t**2) / (1 + s**2)
        if variance == "fixed_small":
            std = torch.tensor(math.sqrt(small), dtype=x.dtype)
        elif variance == "fixed_large":
            std = torch.tensor(math.sqrt(large), dtype=x.dtype)
        else:
            frac = (v + 1) / 2
            std = torch.exp(0.5 * (frac * math.log(large) + (1 - frac) * math.log(small)))
        x = from_ve(x + std * randn_like(x, generator), t_model, signal)
    return x


@torch.no_grad()
def sample_lcm(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    generator: Generator = None, callback: Callback = None, signal: Signal = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023, Algorithm 3): the
    consistency function maps x straight to x0, which is noised afresh to the next level, x = x0 + s_next z.
    Walk it over its own timesteps (schedules.lcm_sigmas); the denoiser must be the consistency model's."""
    sigmas = check_sigmas(sigmas).tolist()
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, broadcast_sigma(sigmas[i], x), cond)
        report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        if sigmas[i + 1] > 0:  # x0 noised afresh to the next level: x0 + s z in the VE view
            _, sigma_next = to_ve(x, sigmas[i + 1], signal)
            x = from_ve(denoised + sigma_next * randn_like(x, generator), sigmas[i + 1], signal)
        else:
            x = denoised
    return x
