"""Drive a diffusers scheduler and one of our samplers from the same noise-prediction network.

Test-only: diffusers is the oracle here and is never imported by imagine itself."""

from __future__ import annotations

import torch

from imagine.diffusion.denoiser import Denoiser
from imagine.diffusion.schedules import make_alphas_cumprod

T = 1000
BETAS = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012)}
DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


class TinyNoiseNet(torch.nn.Module):
    """A fixed random network that behaves like a trained one: near the exact noise predictor for
    N(0, I) data (eps = sigma_t x_t), plus a nonlinear, t-dependent perturbation, so x0 estimates stay
    O(1) as a real model's do, and samplers that differ in any step still give different results."""

    def __init__(self, alphas_cumprod: torch.Tensor, channels: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(channels, channels, generator=g) * 0.5, requires_grad=False)
        self.b = torch.nn.Parameter(torch.randn(channels, generator=g) * 0.1, requires_grad=False)
        self.register_buffer("sigmas_vp", (1 - alphas_cumprod.double()).sqrt().float())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        low = t.floor().long().clamp(0, len(self.sigmas_vp) - 2)
        w = (t - low).reshape(-1, 1, 1, 1)
        sigma = ((1 - w.flatten()) * self.sigmas_vp[low] + w.flatten() * self.sigmas_vp[low + 1]).reshape(-1, 1, 1, 1)
        phase = (t / T).reshape(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", self.w, x) + self.b.reshape(1, -1, 1, 1)
        return sigma * x + 0.3 * torch.tanh(h) * (1 + 0.5 * torch.sin(3 * phase))


def alphas_cumprod(schedule: str) -> torch.Tensor:
    start, end = BETAS[schedule]
    return make_alphas_cumprod(schedule, T, start, end)


def run_diffusers(scheduler, net, noise, steps, generator=None, eta=None):
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    start = x.clone()
    extra = {} if eta is None else {"eta": eta}
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        out = net(inp, t.reshape(1).expand(x.shape[0]))
        kwargs = dict(extra)
        if generator is not None:
            kwargs["generator"] = generator
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return start, x, scheduler


def run_ours(sampler, net, ac, prediction, x_start, sigmas, *, vp_input, quantize=False, interpolation="log",
             generator=None, consistency=False, **options):
    """``ac``: the training schedule; pass diffusers' own (float32) so rounding in the schedule is shared."""
    den = Denoiser(net, ac, prediction, quantize=quantize, interpolation=interpolation, consistency=consistency)
    x = x_start * (1 + sigmas[0] ** 2).sqrt() if vp_input else x_start
    out = sampler(den, x, sigmas, generator=generator, **options)
    if vp_input:  # back to the VP sample diffusers returns
        out = out / (1 + sigmas[-1] ** 2).sqrt()
    return out


__all__ = ["BETAS", "DIFFUSERS_PRED", "T", "TinyNoiseNet", "alphas_cumprod", "run_diffusers", "run_ours"]
