"""What every sampler shares: input checks, seeded noise, the ancestral split and the step loop's
callback. Samplers work in the VE view (x = x0 + sigma eps) over a denoiser D(x, sigma, cond) -> x0.

A flow model's samples are x_t = (1 - t) x0 + t eps, walked with sigma = t (diffusion/denoiser.py's
FlowDenoiser): its ODE dx/dt = (x - D) / t has the VE ODE's form, so the deterministic samplers integrate it
unchanged. Where a sampler injects noise, it needs the data's scale in x, ``signal(sigma)`` (1 - t for a flow
model; None: 1, the VE view): it takes its stochastic step on the VE sample x / signal at sigma / signal and
scales the result back (``to_ve`` and ``from_ve``), which leaves VE models' arithmetic exactly as it was."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[dict[str, Any]], None] | None
Signal = Callable[[float], float] | None  # the data's scale in x at noise level sigma; None: 1 (VE)


def to_ve(x: torch.Tensor, sigma: float, signal: Signal) -> tuple[torch.Tensor, float]:
    """(x / a, sigma / a) with a = signal(sigma): the VE sample and noise level of the same point (exactly x
    and sigma when a = 1)."""
    a = 1.0 if signal is None else signal(sigma)
    return x / a, sigma / a


def ve_sigmas(sigmas: list[float], signal: Signal) -> list[float]:
    """Each noise level as the VE one of the same point, sigma / signal(sigma) (the same list when signal is None)."""
    return [s / (1.0 if signal is None else signal(s)) for s in sigmas]


def from_ve(x_ve: torch.Tensor, sigma: float, signal: Signal) -> torch.Tensor:
    """The model's sample at noise level sigma from the VE one: x_ve * signal(sigma)."""
    return x_ve * (1.0 if signal is None else signal(sigma))


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Refuse a sigma sequence no sampler can walk: it must be 1-D, finite, non-negative, at least two
    long (one step), and strictly decreasing."""
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 noise levels (1 step), got shape "
                         f"{tuple(sigmas.shape)}; build them with imagine.diffusion.schedules.sampling_sigmas")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError(f"sigmas must be finite and >= 0, got {sigmas.tolist()}")
    if not (sigmas[1:] < sigmas[:-1]).all():
        bad = int(torch.nonzero(sigmas[1:] >= sigmas[:-1])[0])
        raise ValueError(
            f"sigmas must strictly decrease (noise is removed at every step), but sigmas[{bad}] = "
            f"{float(sigmas[bad]):.6g} is followed by {float(sigmas[bad + 1]):.6g}"
        )
    return sigmas


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (CPU for a seed) and moved,
    so a seed gives the same noise on any device. A list of generators gives one per batch row, so
    row i depends only on its own generator, whatever the batch size (diffusers' randn_tensor)."""
    if isinstance(generator, Sequence):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype) for g in generator]
        return torch.cat(rows).to(x.device)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part down to sigma_down and fresh noise
    of std sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2 (DDIM eq. 16 with eta; k-diffusion's
    get_ancestral_step). eta = 1 is the DDPM posterior, eta = 0 the deterministic DDIM step."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def report(callback: Callback, i: int, x: torch.Tensor, sigma: float, denoised: torch.Tensor, total: int) -> None:
    if callback is not None:
        callback({"i": i, "total": total, "x": x, "sigma": sigma, "denoised": denoised})
