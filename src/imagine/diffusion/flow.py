"""Flow matching (rectified flow), written once: the interpolation, its velocity target, the training-time
densities and the resolution shifts of Esser et al. 2024 ("Scaling Rectified Flow Transformers", SD3) and
Flux.1, and the bridge to the VE noise levels that imagine's samplers integrate.

A noisy sample is x_t = (1 - t) x_0 + t eps for t in [0, 1] (Liu et al. 2022; Esser et al. 2024, eq. 1 with
a_t = 1 - t, b_t = t); the network predicts the velocity v = eps - x_0 = dx_t/dt. Dividing by (1 - t) gives
x_t / (1 - t) = x_0 + sigma eps with sigma = t / (1 - t): a VE sample, so every k-diffusion sampler drives a
flow model through ``flow_sigma`` and ``flow_t``.

Shapes: ``t`` is broadcastable to the sample, e.g. (B, 1, 1, 1).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

Density = Literal["uniform", "logit_normal", "mode"]
DENSITIES: tuple[str, ...] = get_args(Density)
# Flux.1's resolution-dependent shift: mu grows linearly in the number of image tokens (diffusers' FluxPipeline)
FLUX_BASE_SEQ_LEN, FLUX_MAX_SEQ_LEN, FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 256, 4096, 0.5, 1.15


def flow_noisy(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t eps."""
    return (1 - t) * x0 + t * eps


def flow_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The training target v = eps - x_0 (the straight path's constant velocity)."""
    return eps - x0


def flow_x0(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_0 from a predicted velocity: x_t - t v."""
    return x_t - t * v


def flow_eps(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps from a predicted velocity: x_t + (1 - t) v."""
    return x_t + (1 - t) * v


def flow_sigma(t: torch.Tensor) -> torch.Tensor:
    """The VE noise level of flow time t: sigma = t / (1 - t) (infinite at t = 1)."""
    return t / (1 - t)


def flow_t(sigma: torch.Tensor) -> torch.Tensor:
    """Flow time of a VE noise level: t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The resolution-dependent shift of Esser et al. 2024 (section 5.3.2): t' = s t / (1 + (s - 1) t), which
    moves timesteps towards noise for s > 1 (larger images keep more of their signal at a given t)."""
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(image_seq_len: int, shifts: tuple[float, float] = (FLUX_BASE_SHIFT, FLUX_MAX_SHIFT),
            tokens: tuple[int, int] = (FLUX_BASE_SEQ_LEN, FLUX_MAX_SEQ_LEN)) -> float:
    """Flux.1's log-shift for an image of this many latent tokens: linear from shifts[0] at tokens[0] to
    shifts[1] at tokens[1] (a scheduler config's base_shift, max_shift, base_image_seq_len, max_image_seq_len)."""
    m = (shifts[1] - shifts[0]) / (tokens[1] - tokens[0])
    return image_seq_len * m + shifts[0] - m * tokens[0]


def sample_t(n: int, density: Density = "logit_normal", *, generator: torch.Generator | None = None,
             mean: float = 0.0, std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """n training times in (0, 1) from the densities of Esser et al. 2024 (section 3.1): uniform;
    logit-normal (t = sigmoid(u), u ~ N(mean, std): more weight mid-way, their best, at mean 0, std 1); mode
    sampling with heavy tails (t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u uniform: s = 0 is uniform,
    their s = 1.29 favours the middle while keeping the ends)."""
    if density not in DENSITIES:
        raise ValueError(f"training density {density!r} unknown; choose one of: {', '.join(DENSITIES)}")
    if density == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64)).float()
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if density == "mode":
        if not -1 <= mode_scale <= 2 / (math.pi - 2):  # outside it, f leaves [0, 1] (the paper's bound)
            raise ValueError(f"mode_scale must lie in [-1, {2 / (math.pi - 2):.3f}], got {mode_scale}")
        u = 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    return u.float()


def flow_timesteps(steps: int, *, shift: float = 1.0, mu: float | None = None, num_train_timesteps: int = 1000,
                   last: float | None = None) -> torch.Tensor:
    """The (steps + 1,) sampling times from 1 down to 0, as diffusers' FlowMatchEulerDiscreteScheduler lays them
    out (what SD3 and Flux were tuned with): evenly spaced from 1 to the last training time, then shifted by
    ``shift`` (SD3: 3.0) or, given ``mu``, by e^mu (Flux's resolution-dependent shift), then 0. Computed in
    float64, returned in float32. Note the scheduler's quirk, kept for parity: with a fixed shift, the last
    training time is itself already shifted before the grid is shifted again. ``last``: where the grid ends
    before shifting instead (Flux's pipeline passes 1 / steps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if last is None:
        last_t = torch.tensor(1 / num_train_timesteps, dtype=torch.float64)
        last = float(shift_t(last_t, shift) if mu is None else last_t)
    t = torch.linspace(1.0, last, steps, dtype=torch.float64)
    t = shift_t(t, math.exp(mu) if mu is not None else shift)
    return torch.cat([t, t.new_zeros(1)]).float()
