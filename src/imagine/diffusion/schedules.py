"""Noise schedules as pure functions (Ho et al. 2020; Nichol & Dhariwal 2021; Lin et al. 2023).

Everything here is computed in float64 and returned as float64 tensors; callers cast to float32
where they use them (STYLE rule 3). A published schedule is never changed in place.

Two views of one schedule:
- discrete, variance preserving (VP): ``alphas_cumprod[t]`` for t = 0 .. T-1, with
  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps;
- continuous, variance exploding (VE, Karras et al. 2022): ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``,
  x = x_0 + sigma eps, which is the VP sample divided by sqrt(alpha_bar). Samplers work in this view.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

BetaSchedule = Literal["linear", "scaled_linear", "cosine", "sigmoid"]
Spacing = Literal["leading", "trailing", "linspace"]

BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)
SPACINGS: tuple[str, ...] = get_args(Spacing)

# With zero terminal SNR alpha_bar[T-1] = 0 and sigma = inf; samplers need a finite sigma_max.
# diffusers clamps alpha_bar[T-1] to 2**-24 for the same reason (sigma_max ~ 4096).
ZERO_SNR_ALPHA_BAR = 2.0**-24


def _choose(name: str, valid: tuple[str, ...], what: str) -> str:
    if name not in valid:
        raise ValueError(f"{what} {name!r} unknown; choose one of: {', '.join(valid)}")
    return name


def betas_for_alpha_bar(alpha_bar, num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Discretize a continuous alpha_bar(t), t in [0, 1], into betas (Nichol & Dhariwal 2021, eq. 17)."""
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    a0 = alpha_bar(t / num_train_timesteps)
    a1 = alpha_bar((t + 1) / num_train_timesteps)
    return torch.clamp(1 - a1 / a0, max=max_beta)


def make_betas(
    schedule: BetaSchedule,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """Betas of a named schedule, (T,) float64.

    - linear: DDPM's linspace(beta_start, beta_end).
    - scaled_linear: Stable Diffusion's, linear in sqrt(beta) (use beta_start=0.00085, beta_end=0.012).
    - cosine: improved DDPM's alpha_bar(t) = cos^2(((t + s) / (1 + s)) pi / 2), s = 0.008, beta <= 0.999.
    - sigmoid: sigmoid(linspace(-6, 6)) rescaled to [beta_start, beta_end] (GeoDiff, as in diffusers).
    """
    _choose(schedule, BETA_SCHEDULES, "noise schedule")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    T = num_train_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        return betas_for_alpha_bar(lambda t: torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2, T)
    betas = torch.linspace(-6, 6, T, dtype=torch.float64)
    return torch.sigmoid(betas) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of Lin et al. 2023: shift and scale sqrt(alpha_bar) so that SNR(T-1) = 0 exactly,
    keeping sqrt(alpha_bar_0). Returns new betas; the input is untouched."""
    alphas_bar_sqrt = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), float64."""
    return torch.cumprod(1 - betas.double(), 0)


def make_alphas_cumprod(
    schedule: BetaSchedule = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """The training schedule as alpha_bar, (T,) float64; the one function models and samplers share."""
    betas = make_betas(schedule, num_train_timesteps, beta_start, beta_end)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return alphas_cumprod_from_betas(betas)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), (T,) float64 ascending in t.

    A zero alpha_bar (zero terminal SNR) is clamped to 2**-24 so that sigma_max is finite."""
    ab = alphas_cumprod.double().clamp(min=ZERO_SNR_ALPHA_BAR)
    return ((1 - ab) / ab).sqrt()


Interpolation = Literal["log", "linear"]


def t_to_sigma(t: torch.Tensor, alphas_cumprod: torch.Tensor, interpolation: Interpolation = "log") -> torch.Tensor:
    """sigma at possibly fractional timesteps, interpolating between integers linearly in log sigma
    (k-diffusion's DiscreteSchedule.t_to_sigma) or in sigma (diffusers' Euler, Heun and LMS
    schedulers for fractional linspace timesteps). Both agree at integer t."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    values = sigmas.log() if interpolation == "log" else sigmas
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(sigmas) - 1)
    low = t.floor().long().clamp(max=len(sigmas) - 2)
    w = t - low
    out = (1 - w) * values[low] + w * values[low + 1]
    return out.exp() if interpolation == "log" else out


def sigma_to_t(
    sigma: torch.Tensor, alphas_cumprod: torch.Tensor, quantize: bool = False, interpolation: Interpolation = "log"
) -> torch.Tensor:
    """The exact inverse of ``t_to_sigma`` with the same interpolation (log: k-diffusion's
    DiscreteSchedule.sigma_to_t and diffusers' _sigma_to_t). ``quantize`` rounds to the nearest step.

    sigma: any shape; returns float64 of that shape, clamped to [0, T-1]."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    values = sigmas.log() if interpolation == "log" else sigmas
    sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-30)
    query = (sigma.log() if interpolation == "log" else sigma).reshape(-1)
    low = (torch.searchsorted(values, query, right=True) - 1).clamp(0, len(values) - 2)
    w = (query - values[low]) / (values[low + 1] - values[low])
    t = (low + w.clamp(0, 1)).reshape(sigma.shape)
    return t.round() if quantize else t


def spaced_timesteps(
    num_train_timesteps: int,
    steps: int,
    spacing: Spacing = "leading",
    *,
    steps_offset: int = 0,
    exclude_t0: bool = False,
    integer: bool = False,
) -> torch.Tensor:
    """Descending inference timesteps, (steps,) float64 (Lin et al. 2023, Table 2).

    - leading: multiples of T // steps counted from 0, plus ``steps_offset`` (SD 1.x uses 1);
    - trailing: counted down from T - 1, so the first step sees the noisiest level;
    - linspace: evenly spaced over [0, T - 1], fractional unless ``integer``.

    ``exclude_t0``: space steps + 1 points and drop the last, so the model is never evaluated at t = 0;
    the convention of DPM-Solver and UniPC (their diffusers schedulers), which also round to integers.
    """
    _choose(spacing, SPACINGS, "timestep spacing")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the model's {num_train_timesteps} training timesteps")
    T, n = num_train_timesteps, steps + int(exclude_t0)
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).flip(0)
        if integer or exclude_t0:
            ts = ts.round()
    elif spacing == "leading":
        ts = (torch.arange(n, dtype=torch.float64) * (T // n)).flip(0) + steps_offset
    else:
        ts = (torch.arange(T, 0, -T / steps, dtype=torch.float64)).round() - 1
        return ts
    return ts[:steps]


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Eq. 5 of Karras et al. 2022: n noise levels from sigma_max down to sigma_min, uniform in
    sigma^(1/rho). Returns (n,) float64 without the final zero."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def sampling_sigmas(
    alphas_cumprod: torch.Tensor,
    steps: int,
    spacing: Spacing = "leading",
    *,
    karras: bool = False,
    rho: float = 7.0,
    steps_offset: int = 0,
    exclude_t0: bool = False,
    integer: bool = False,
    final_sigma: Literal["zero", "sigma_min"] = "zero",
    interpolation: Interpolation = "log",
) -> torch.Tensor:
    """The sigma sequence a sampler walks, (steps + 1,) float32, strictly decreasing, ending in 0 or
    in the schedule's smallest sigma.

    Karras sigmas span the same range as the spaced discrete sigmas they replace (as diffusers' Euler,
    Heun and LMS do; with spacing="linspace" that is the full training range, as its DPM-Solver and
    UniPC do whatever the spacing)."""
    ts = spaced_timesteps(
        len(alphas_cumprod), steps, spacing, steps_offset=steps_offset, exclude_t0=exclude_t0, integer=integer
    )
    sigmas = t_to_sigma(ts, alphas_cumprod, interpolation)
    if karras and steps > 1:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps, rho)
    _choose(final_sigma, ("zero", "sigma_min"), "final sigma")
    last = 0.0 if final_sigma == "zero" else float(sigmas_from_alphas_cumprod(alphas_cumprod)[0])
    out = torch.cat([sigmas, sigmas.new_tensor([last])]).float()
    return out



# Latent Consistency Models skip along a coarse grid of the teacher's timesteps (Luo et al. 2023, section 4.3)
LCM_ORIGINAL_STEPS = 50


def lcm_grid(num_train_timesteps: int, original_steps: int = LCM_ORIGINAL_STEPS) -> torch.Tensor:
    """The distillation grid, ascending: k - 1, 2k - 1, ..., T - 1 with k = T // original_steps (diffusers'
    DDIMSolver and LCMScheduler's lcm_origin_timesteps); (original_steps,) int64."""
    k = num_train_timesteps // original_steps
    if k < 1:
        raise ValueError(f"{original_steps} distillation steps exceed the model's {num_train_timesteps} timesteps")
    return torch.arange(1, original_steps + 1, dtype=torch.int64) * k - 1


def lcm_timesteps(num_train_timesteps: int, steps: int, original_steps: int = LCM_ORIGINAL_STEPS) -> torch.Tensor:
    """Descending timesteps of multistep consistency sampling: ``steps`` evenly spaced picks (floored indices)
    from the distillation grid, counted from its top (diffusers' LCMScheduler.set_timesteps); (steps,) int64."""
    if not isinstance(steps, int) or not 1 <= steps <= original_steps:
        raise ValueError(f"LCM sampling takes 1 to {original_steps} steps (its distillation grid), got {steps!r}; "
                         "4 is typical")
    grid = lcm_grid(num_train_timesteps, original_steps).flip(0)
    picks = torch.floor(torch.linspace(0, original_steps, steps + 1, dtype=torch.float64)[:-1]).long()
    return grid[picks]


def lcm_sigmas(alphas_cumprod: torch.Tensor, steps: int, original_steps: int = LCM_ORIGINAL_STEPS) -> torch.Tensor:
    """The VE noise levels at ``lcm_timesteps``, then 0: (steps + 1,) float32."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)[lcm_timesteps(len(alphas_cumprod), steps, original_steps)]
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()
