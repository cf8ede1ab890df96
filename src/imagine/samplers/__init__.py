"""Samplers by name: pure functions ``(denoiser, x, sigmas, *, cond, generator, callback, **options)``.

The registry is explicit (STYLE rule 6). ``resolve`` also takes AUTOMATIC1111's display names
("DPM++ 2M Karras", "Euler a"), which name a sampler and a sigma schedule together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from imagine.a1111 import A1111_NAMES, A1111_SCHEDULE_TYPES
from imagine.diffusion.schedules import lcm_timesteps
from imagine.samplers.multistep import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_lms, sample_unipc
from imagine.samplers.single_step import (
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
)

SigmaSchedule = Literal["default", "karras"]
SIGMA_SCHEDULES: tuple[str, ...] = ("default", "karras")


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable[..., torch.Tensor]
    stochastic: bool
    calls_per_step: int  # denoiser calls per step (Heun: 2, its last step 1)
    description: str
    # the sampler's own timesteps (num_train_timesteps, steps) -> descending integer timesteps, which each
    # parametrization places (diffusion/model_sampling.py); None: the common spaced schedule
    timesteps: Callable[[int, int], torch.Tensor] | None = None
    consistency: bool = False  # walks a consistency model (an LCM); other models give blurry images


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(sample_ddpm, True, 1, "DDPM ancestral sampling (Ho et al. 2020); fixed or learned variance"),
    "ddim": SamplerInfo(sample_ddim, False, 1, "DDIM (Song et al. 2020); eta > 0 adds noise"),
    "euler": SamplerInfo(sample_euler, False, 1, "Euler's method on the probability-flow ODE (Karras et al. 2022)"),
    "euler_a": SamplerInfo(sample_euler_ancestral, True, 1, "Euler ancestral"),
    "heun": SamplerInfo(sample_heun, False, 2, "Heun's 2nd-order method (Karras et al. 2022, Algorithm 1)"),
    "lms": SamplerInfo(sample_lms, False, 1, "Linear multistep, order 4"),
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m, False, 1, "DPM-Solver++(2M) (Lu et al. 2022)"),
    "dpmpp_2m_sde": SamplerInfo(sample_dpmpp_2m_sde, True, 1, "SDE-DPM-Solver++(2M), midpoint (Lu et al. 2022)"),
    "unipc": SamplerInfo(sample_unipc, False, 1, "UniPC bh2 predictor-corrector, order 2 (Zhao et al. 2023)"),
    "lcm": SamplerInfo(sample_lcm, True, 1, "Multistep consistency sampling for LCMs, 1 to 8 steps (Luo et al. 2023)",
                       timesteps=lcm_timesteps, consistency=True),
}

def resolve(name: str) -> tuple[str, SigmaSchedule]:
    """Our name or an A1111 display name (case-insensitive) -> (sampler, sigma schedule).

    Raises ValueError listing every valid name."""
    if name in SAMPLERS:
        return name, "default"
    for alias, pair in A1111_NAMES.items():
        if alias.lower() == name.strip().lower():
            return pair
    lowered = name.strip().lower().replace("-", "_").replace(" ", "_")
    if lowered in SAMPLERS:
        return lowered, "default"
    raise ValueError(
        f"sampler {name!r} unknown; choose one of: {', '.join(SAMPLERS)} "
        f"(or an A1111 name: {', '.join(A1111_NAMES)})"
    )


def check_schedule(name: str) -> SigmaSchedule:
    """A sigma-schedule name, ours or A1111's "Schedule type", checked."""
    if name in SIGMA_SCHEDULES:
        return name  # type: ignore[return-value]
    if name in A1111_SCHEDULE_TYPES:
        return A1111_SCHEDULE_TYPES[name]
    raise ValueError(
        f"sigma schedule {name!r} unknown; choose one of: {', '.join(SIGMA_SCHEDULES)} "
        f"(or an A1111 schedule type: {', '.join(A1111_SCHEDULE_TYPES)})"
    )


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function for our name or an A1111 name."""
    return SAMPLERS[resolve(name)[0]].fn


__all__ = [
    "A1111_NAMES",
    "SAMPLERS",
    "SamplerInfo",
    "a1111_aliases",
    "check_schedule",
    "get_sampler",
    "resolve",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_lms",
    "sample_unipc",
]
