"""Our samplers against diffusers' schedulers, driven by the same noise-prediction network.

Deterministic samplers: final samples within 1e-4 (float32) over linear and scaled_linear schedules,
every spacing, Karras on and off, eps and v prediction. Stochastic samplers: exact where diffusers'
order of noise draws is reproducible from the same generator (it is for all four).

"Configured like its diffusers scheduler" means the inference schedule conventions each scheduler uses:
- Euler, Heun, LMS: N timesteps, fractional under linspace and mapped to sigma linearly in sigma;
- DPM-Solver++ and UniPC: N + 1 points with t = 0 dropped, rounded; under Karras they ignore spacing,
  use the full training range and round the timestep they feed the network (our quantize=True);
- DDIM and DDPM step to t - T // N whatever the spacing, so they are self-consistent only where that is
  the next scheduled timestep: leading spacing, and trailing when N divides T. Elsewhere diffusers
  evaluates the network at one noise level and steps to another; we step to the next scheduled level,
  and check DDIM there against diffusers' Euler, which it equals in exact arithmetic (eta = 0).
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from imagine.diffusion.schedules import sampling_sigmas
from imagine.samplers import SAMPLERS

from .harness import BETAS, DIFFUSERS_PRED, T, TinyNoiseNet, run_diffusers, run_ours

TOL = 1e-4
SCHEDULES = ["linear", "scaled_linear"]
SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["eps", "v"]
STEPS = [7, 20]


def _noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _config(schedule: str, spacing: str, prediction: str) -> dict:
    start, end = BETAS[schedule]
    return dict(
        num_train_timesteps=T, beta_schedule=schedule, beta_start=start, beta_end=end,
        prediction_type=DIFFUSERS_PRED[prediction], timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
    )


def _compare(name, scheduler, spacing, karras, prediction, steps, *, family, seed=None, options=None,
             diffusers_eta=None):
    net = TinyNoiseNet(scheduler.alphas_cumprod)
    ac = scheduler.alphas_cumprod.double()
    gen = (lambda: torch.Generator().manual_seed(seed)) if seed is not None else (lambda: None)
    start, ref, scheduler = run_diffusers(scheduler, net, _noise(), steps, generator=gen(), eta=diffusers_eta)
    offset = scheduler.config.steps_offset
    if family == "euler":  # Euler, Heun, LMS, Euler ancestral
        interp = "log" if karras else "linear"
        sigmas = sampling_sigmas(ac, steps, spacing, karras=karras, steps_offset=offset, interpolation=interp)
        ours = run_ours(SAMPLERS[name].fn, net, ac, prediction, start, sigmas, vp_input=False,
                        interpolation=interp, generator=gen(), **(options or {}))
    elif family == "dpm":  # DPM-Solver++, UniPC
        if karras:
            sigmas = sampling_sigmas(ac, steps, "linspace", karras=True)
        else:
            sigmas = sampling_sigmas(ac, steps, spacing, steps_offset=offset, exclude_t0=True)
        ours = run_ours(SAMPLERS[name].fn, net, ac, prediction, start, sigmas, vp_input=True, quantize=karras,
                        generator=gen(), **(options or {}))
    else:  # DDIM, DDPM: integer timesteps
        sigmas = sampling_sigmas(ac, steps, spacing, steps_offset=offset, integer=True)
        ours = run_ours(SAMPLERS[name].fn, net, ac, prediction, start, sigmas, vp_input=True, generator=gen(),
                        **(options or {}))
    # the diffusers run and ours must have walked the same sigmas
    diffusers_sigmas = getattr(scheduler, "sigmas", None)
    if diffusers_sigmas is not None and name != "heun":
        torch.testing.assert_close(sigmas, diffusers_sigmas.float(), rtol=1e-5, atol=1e-6)
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"{name} {spacing} karras={karras} {prediction} {steps} steps: max abs diff {err:.3g}"
    return ours, ref


GRID = list(itertools.product(SCHEDULES, SPACINGS, [False, True], PREDICTIONS, STEPS))


@pytest.mark.parametrize(
    "name,cls",
    [("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler), ("lms", LMSDiscreteScheduler)],
)
@pytest.mark.parametrize("schedule,spacing,karras,prediction,steps", GRID)
def test_euler_family_matches_diffusers(name, cls, schedule, spacing, karras, prediction, steps):
    scheduler = cls(**_config(schedule, spacing, prediction), use_karras_sigmas=karras)
    _compare(name, scheduler, spacing, karras, prediction, steps, family="euler")


@pytest.mark.parametrize("schedule,spacing,karras,prediction,steps", GRID)
def test_dpmpp_2m_matches_diffusers(schedule, spacing, karras, prediction, steps):
    scheduler = DPMSolverMultistepScheduler(
        **_config(schedule, spacing, prediction), algorithm_type="dpmsolver++", solver_order=2,
        use_karras_sigmas=karras,
    )
    _compare("dpmpp_2m", scheduler, spacing, karras, prediction, steps, family="dpm")


@pytest.mark.parametrize("schedule,spacing,karras,prediction,steps", GRID)
def test_unipc_matches_diffusers(schedule, spacing, karras, prediction, steps):
    scheduler = UniPCMultistepScheduler(**_config(schedule, spacing, prediction), use_karras_sigmas=karras)
    _compare("unipc", scheduler, spacing, karras, prediction, steps, family="dpm")


DDIM_GRID = [
    (schedule, spacing, prediction, steps)
    for schedule, spacing, prediction, steps in itertools.product(SCHEDULES, ["leading", "trailing"], PREDICTIONS,
                                                                  [8, 20])
    if spacing == "leading" or T % steps == 0
]


@pytest.mark.parametrize("schedule,spacing,prediction,steps", DDIM_GRID)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_matches_diffusers(schedule, spacing, prediction, steps, set_alpha_to_one):
    scheduler = DDIMScheduler(**_config(schedule, spacing, prediction), clip_sample=False,
                              set_alpha_to_one=set_alpha_to_one)
    net = TinyNoiseNet(scheduler.alphas_cumprod)
    ac = scheduler.alphas_cumprod.double()
    start, ref, scheduler = run_diffusers(scheduler, net, _noise(), steps)
    final = "zero" if set_alpha_to_one else "sigma_min"
    sigmas = sampling_sigmas(ac, steps, spacing, steps_offset=scheduler.config.steps_offset, integer=True,
                             final_sigma=final)
    ours = run_ours(SAMPLERS["ddim"].fn, net, ac, prediction, start, sigmas, vp_input=True)
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("schedule,karras,prediction", list(itertools.product(SCHEDULES, [False, True], PREDICTIONS)))
def test_ddim_equals_diffusers_euler_where_diffusers_ddim_is_inconsistent(schedule, karras, prediction):
    """linspace and Karras: DDIM (eta = 0) is Euler's method in the VE view; diffusers' DDIMScheduler
    cannot run these configurations consistently, its Euler scheduler can."""
    scheduler = EulerDiscreteScheduler(**_config(schedule, "linspace", prediction), use_karras_sigmas=karras)
    _compare("ddim", scheduler, "linspace", karras, prediction, 13, family="euler")


# ---- stochastic samplers: the same generator, the same draws, the same result ----

@pytest.mark.parametrize("schedule,prediction", list(itertools.product(SCHEDULES, PREDICTIONS)))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_ancestral_matches_diffusers_exactly(schedule, prediction, spacing):
    scheduler = EulerAncestralDiscreteScheduler(**_config(schedule, spacing, prediction))
    ours, _ = _compare("euler_a", scheduler, spacing, False, prediction, 12, family="euler", seed=7)
    assert ours.std() > 0.1  # a real sample, not a degenerate one


@pytest.mark.parametrize("schedule,prediction,karras", list(itertools.product(SCHEDULES, PREDICTIONS, [False, True])))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpmpp_2m_sde_matches_diffusers_exactly(schedule, prediction, karras, spacing):
    scheduler = DPMSolverMultistepScheduler(
        **_config(schedule, spacing, prediction), algorithm_type="sde-dpmsolver++", solver_order=2,
        use_karras_sigmas=karras,
    )
    _compare("dpmpp_2m_sde", scheduler, spacing, karras, prediction, 12, family="dpm", seed=3)


@pytest.mark.parametrize("schedule,prediction", list(itertools.product(SCHEDULES, PREDICTIONS)))
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers_exactly(schedule, prediction, variance):
    """steps_offset = 0: with an offset the last timestep is 1, and diffusers' `t > 0` rule then adds
    fixed_large noise on the final step to the clean sample; Ho et al. (Algorithm 2) and we add none."""
    config = {**_config(schedule, "leading", prediction), "steps_offset": 0}
    scheduler = DDPMScheduler(**config, clip_sample=False, variance_type=variance)
    _compare("ddpm", scheduler, "leading", False, prediction, 25, family="ddim", seed=11,
             options={"variance": variance})


def test_ddpm_all_1000_steps_matches_diffusers():
    scheduler = DDPMScheduler(**{**_config("linear", "leading", "eps"), "steps_offset": 0}, clip_sample=False)
    _compare("ddpm", scheduler, "leading", False, "eps", 1000, family="ddim", seed=5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_with_eta_matches_diffusers_exactly(schedule):
    scheduler = DDIMScheduler(**_config(schedule, "leading", "eps"), clip_sample=False, set_alpha_to_one=True)
    _compare("ddim", scheduler, "leading", False, "eps", 15, family="ddim", seed=2, options={"eta": 0.6},
             diffusers_eta=0.6)


def test_ddpm_learned_variance_matches_diffusers_exactly():
    """improved DDPM's learned_range: the network's second half of channels interpolates log variance."""
    config = {**_config("linear", "leading", "eps"), "steps_offset": 0}  # see test_ddpm_matches_diffusers_exactly
    scheduler = DDPMScheduler(**config, clip_sample=False, variance_type="learned_range")
    base = TinyNoiseNet(scheduler.alphas_cumprod)

    class WithVariance(torch.nn.Module):
        def forward(self, x, t):
            v = torch.tanh(x.mean(dim=1, keepdim=True) + torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / T)
            return torch.cat([base(x, t), v.expand_as(x)], dim=1)

    net = WithVariance()
    ac = scheduler.alphas_cumprod.double()
    start, ref, scheduler = run_diffusers(scheduler, net, _noise(), 20, generator=torch.Generator().manual_seed(4))
    from imagine.diffusion.denoiser import Denoiser

    den = Denoiser(net, ac, "eps", learned_variance=True)
    sigmas = sampling_sigmas(ac, 20, "leading", integer=True)
    x = start * (1 + sigmas[0] ** 2).sqrt()
    ours = SAMPLERS["ddpm"].fn(den, x, sigmas, generator=torch.Generator().manual_seed(4), variance="learned")
    assert (ours - ref).abs().max().item() <= TOL


def test_parity_network_tells_samplers_apart():
    """The oracle network is sensitive enough: two different samplers differ by far more than TOL, so
    the parity assertions above could fail."""
    scheduler = UniPCMultistepScheduler(**_config("scaled_linear", "leading", "eps"))
    net = TinyNoiseNet(scheduler.alphas_cumprod)
    ac = scheduler.alphas_cumprod.double()
    start, ref, _ = run_diffusers(scheduler, net, _noise(), 7)
    sigmas = sampling_sigmas(ac, 7, "leading", steps_offset=1, exclude_t0=True)
    other = run_ours(SAMPLERS["dpmpp_2m"].fn, net, ac, "eps", start, sigmas, vp_input=True)
    assert (other - ref).abs().max().item() > 100 * TOL


def test_batch_of_generators_gives_each_row_its_own_stream():
    """A list of generators (one per image) makes row i independent of the batch it sits in."""
    scheduler = EulerAncestralDiscreteScheduler(**_config("scaled_linear", "leading", "eps"))
    net = TinyNoiseNet(scheduler.alphas_cumprod)
    ac = scheduler.alphas_cumprod.double()
    sigmas = sampling_sigmas(ac, 10, "leading", steps_offset=1)
    x = _noise() * sigmas[0]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(2)]
    batch = run_ours(SAMPLERS["euler_a"].fn, net, ac, "eps", x, sigmas, vp_input=False, generator=gens)
    single = run_ours(SAMPLERS["euler_a"].fn, net, ac, "eps", x[1:], sigmas, vp_input=False,
                      generator=[torch.Generator().manual_seed(101)])
    assert torch.equal(batch[1:], single)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers_exactly(schedule, prediction, steps):
    """Multistep consistency sampling on its own timesteps, boundary scalings included, with the same noise
    draws as diffusers' LCMScheduler (one generator for the batch)."""
    from imagine.diffusion.schedules import lcm_sigmas, lcm_timesteps

    config = _config(schedule, "leading", prediction)
    del config["timestep_spacing"], config["steps_offset"]
    scheduler = LCMScheduler(**config)
    net = TinyNoiseNet(scheduler.alphas_cumprod)
    start, ref, scheduler = run_diffusers(scheduler, net, _noise(), steps, generator=torch.Generator().manual_seed(3))
    assert scheduler.timesteps.tolist() == lcm_timesteps(T, steps).tolist()
    ac = scheduler.alphas_cumprod.double()
    ours = run_ours(SAMPLERS["lcm"].fn, net, ac, prediction, start, lcm_sigmas(ac, steps), vp_input=True,
                    quantize=True, consistency=True, generator=torch.Generator().manual_seed(3))
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"lcm {schedule} {prediction} {steps} steps: max abs diff {err:.3g}"
