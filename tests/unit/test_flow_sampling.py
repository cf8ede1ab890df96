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
    with pytest.raises(ValueError, match="flow model"):
        plan.sigmas(4, own=lambda ac, n: ac)
    assert model_sampling(DiffusionSpec()).signal is None  # VP models keep the VE view
