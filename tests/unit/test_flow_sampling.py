"""Flow models through the one denoiser contract: FlowDenoiser walks sigma = t, so diffusers' flow-matching
schedulers are matched step for step by our Euler and Heun, and every sampler, deterministic or not, lands a
flow model built on a Gaussian mixture's exact denoiser on that mixture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imagine.diffusion.denoiser import FlowDenoiser
from imagine.diffusion.model_sampling import FLOW_T_MAX, FlowSampling, model_sampling
from imagine.evaluation.gaussian_mixture import GaussianMixture
from imagine.io.model_folder import DiffusionSpec
from imagine.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")


class TinyVelocity(nn.Module):
    """A small network v(x, timestep): a conv stack with the timestep added as a feature."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Conv2d(5, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2

    def forward(self, x, timestep, **cond):
        t = (timestep.float() / 1000).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.b(torch.tanh(self.a(torch.cat([x, t], 1))))


@pytest.mark.parametrize("scheduler, sampler", [("FlowMatchEulerDiscreteScheduler", "euler"),
                                                ("FlowMatchHeunDiscreteScheduler", "heun")])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_and_heun_match_diffusers_flow_matching_schedulers(scheduler, sampler, shift):
    net = TinyVelocity()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = 6
    sched = getattr(diffusers, scheduler)(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x, t.expand(2)), t, x).prev_sample
    plan = FlowSampling(shift=shift)
    sigmas = plan.sigmas(steps)
    assert torch.allclose(sigmas[1:], sched.sigmas.unique_consecutive()[1:].float(), atol=1e-6)
    ours = SAMPLERS[sampler].fn(plan.denoiser(net), plan.prior(noise, sigmas[0]), sigmas, signal=plan.signal)
    assert (ours - x).abs().max() < 1e-5


def _flow_network(gm: GaussianMixture):
    """The exact velocity of a mixture under x_t = (1 - t) x0 + t eps: v = (x_t - E[x0 | x_t]) / t, the posterior
    mean found by the VE denoiser at x_t / (1 - t), sigma = t / (1 - t)."""

    def v(x, timestep, **cond):
        t = (timestep.double() / 1000).reshape(-1, 1)
        x0 = gm.denoise((x.double() / (1 - t)).float(), (t / (1 - t)).squeeze(1).float()).double()
        return ((x.double() - x0) / t).float()

    return v


STEPS = {"ddpm": 500, "euler_a": 500, "ddim": 300, "euler": 300, "heun": 100, "lms": 100, "dpmpp_2m": 100,
         "dpmpp_2m_sde": 150, "unipc": 100}


@pytest.mark.parametrize("name", [n for n, info in SAMPLERS.items() if not info.consistency])
def test_every_sampler_lands_a_flow_model_on_its_mixture(name):
    from tests.unit.test_mixture_convergence import N, _check_lands_on_mixture

    gm = GaussianMixture.ring()
    plan = FlowSampling(shift=3.0)
    # Karras et al.'s spacing over the flow range: the mixture's modes resolve at small t, where the
    # uniform grid's steps are too coarse for a 2-D mixture this sharp (std 0.3)
    sigmas = plan.sigmas(STEPS[name], karras=True)
    t0 = float(sigmas[0])
    x_ve, _ = gm.sample(N, torch.Generator().manual_seed(0), sigma=t0 / (1 - t0))  # the exact marginal at t0
    x = x_ve * (1 - t0)
    out = SAMPLERS[name].fn(FlowDenoiser(_flow_network(gm)), x, sigmas, signal=plan.signal,
                            generator=torch.Generator().manual_seed(1))
    _check_lands_on_mixture(gm, out)


def test_a_flow_spec_is_sampled_as_a_flow_model():
    plan = model_sampling(DiffusionSpec(prediction="flow", flow_shift=3.0))
    assert isinstance(plan, FlowSampling) and plan.shift == 3.0 and plan.signal(0.25) == 0.75
    sigmas = plan.sigmas(4)
    assert float(sigmas[0]) == pytest.approx(FLOW_T_MAX) and float(sigmas[-1]) == 0
    # a sampler's own integer timesteps (the LCM's grid picks 999, 759, 499, 259) as shifted flow times
    from imagine.diffusion.flow import shift_t
    from imagine.diffusion.schedules import lcm_timesteps

    own = plan.sigmas(4, own=lcm_timesteps)
    want = shift_t(torch.tensor([1.0, 0.76, 0.5, 0.26], dtype=torch.float64), 3.0).clamp(max=FLOW_T_MAX)
    assert torch.allclose(own[:-1].double(), want, atol=1e-6) and float(own[-1]) == 0
    assert model_sampling(DiffusionSpec()).signal is None  # VP models keep the VE view


def test_flow_consistency_math_is_exact_on_the_straight_path():
    """With the true velocity, the distillation's pieces are exact: x0 and eps recovered, the teacher's solver
    step lands on x_t' = (1 - t') x0 + t' eps, and at the grid's bottom (t = 0) f is the identity."""
    from imagine.diffusion.consistency import FlowConsistency, flow_grid_t

    sched = FlowConsistency(1000, 1.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    s = torch.tensor([999, 499, 19])
    x = sched.noisy(x0, eps, s)
    got_x0, got_eps = sched.x0_eps(eps - x0, x, s)
    assert torch.allclose(got_x0, x0, atol=1e-5) and torch.allclose(got_eps, eps, atol=1e-5)
    prev = sched.previous(s, 20)
    t_prev = flow_grid_t(prev).reshape(-1, 1, 1, 1)
    assert torch.allclose(sched.step(got_x0, got_eps, prev), (1 - t_prev) * x0 + t_prev * eps, atol=1e-5)
    assert prev[-1] == -1 and float(flow_grid_t(prev)[-1]) == 0.0
    bottom = sched.f(torch.randn(3, 2, 4, 4, generator=g), x, torch.full((3,), -1))
    assert torch.equal(bottom, x)  # c_skip = 1, c_out = 0 at t = 0, whatever the network


def test_lcm_sampler_walks_a_flow_consistency_model():
    """A flow consistency model whose every estimate is the point c: multistep consistency sampling over the flow
    grid (noising afresh between steps on the straight path) ends at c."""
    from imagine.diffusion.schedules import lcm_timesteps

    c = torch.full((2, 2, 4, 4), 0.7)
    plan = FlowSampling(consistency=True)

    def network(x, timestep, **_):  # v with x - t v = c
        t = (timestep / 1000).reshape(-1, 1, 1, 1)
        return (x - c) / t

    sigmas = plan.sigmas(4, own=lcm_timesteps)
    out = SAMPLERS["lcm"].fn(plan.denoiser(network), torch.randn(2, 2, 4, 4), sigmas, signal=plan.signal,
                             generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, c, atol=1e-5)
