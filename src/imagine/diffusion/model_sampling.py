"""How a model is sampled, by its parametrization: its noise levels, its denoiser, where the walk starts, and
the data's scale in x that stochastic samplers need (ComfyUI's model_sampling.py holds the same idea).

``model_sampling(spec)`` is the one place that reads a model's parametrization at sampling time:
- eps, v and x0 on a VP schedule (Denoiser): VE noise levels from the training schedule, the walk starting
  from the VP prior (noise x sqrt(1 + sigma_max^2)), signal 1;
- flow (FlowDenoiser): sigma = t in [0, 1], the grid of diffusers' FlowMatchEulerDiscreteScheduler shifted by
  the model's shift, the walk starting from noise, signal 1 - t.
A sampler with its own timesteps (the LCM's: integer picks from its distillation grid) gets them as each
parametrization places them (diffusion/consistency.py says where).
The pipeline asks it and never tests for a parametrization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from imagine.diffusion.consistency import flow_grid_t
from imagine.diffusion.denoiser import Denoiser, FlowDenoiser
from imagine.diffusion.flow import flow_timesteps, flux_mu
from imagine.diffusion.schedules import karras_sigmas, sampling_sigmas, sigma_to_t, sigmas_from_alphas_cumprod

# a sampler's own timesteps: (num_train_timesteps, steps) -> descending integer timesteps (schedules.lcm_timesteps)
OwnTimesteps = Callable[[int, int], torch.Tensor]

# A flow walk starts just below t = 1: a sampler that injects noise takes its step on the VE sample
# x / (1 - t), which is infinite at t = 1 (the network sees 999.9999 instead of 1000: no visible difference)
FLOW_T_MAX = 1.0 - 2**-23


@dataclass(frozen=True)
class VPSampling:
    """A network trained on a discrete VP schedule (eps, v or x0), walked in the VE view."""

    alphas_cumprod: torch.Tensor
    prediction: str
    learned_variance: bool = False
    consistency: bool = False
    signal: Callable[[float], float] | None = None  # the VE view: x = x0 + sigma eps

    def sigmas(self, steps: int, karras: bool = False, own: OwnTimesteps | None = None) -> torch.Tensor:
        """(steps + 1,) noise levels ending at 0; ``own``: a sampler's own timesteps (an LCM's)."""
        if own is not None:
            sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)[own(len(self.alphas_cumprod), steps)]
            return torch.cat([sigmas, sigmas.new_zeros(1)]).float()
        return sampling_sigmas(self.alphas_cumprod, steps, "trailing", karras=karras)

    def denoiser(self, network, *, consistency: bool = False, quantize: bool = False) -> Denoiser:
        return Denoiser(network, self.alphas_cumprod, self.prediction, learned_variance=self.learned_variance,
                        consistency=self.consistency or consistency, quantize=quantize)

    def timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The network timestep at each noise level."""
        return sigma_to_t(sigmas, self.alphas_cumprod)

    def prior(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The start of a walk from noise: the VP prior at sigma, in the VE view."""
        return noise * float((1 + sigma**2).sqrt())

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 noised to sigma (img2img's start)."""
        return x0 + noise * float(sigma)

    def relabel(self, x: torch.Tensor, sigma, to) -> torch.Tensor:
        """x at level ``sigma`` as the x at level ``to`` that gives the network the same input (the VP latent
        x / sqrt(1 + sigma^2)): DDIM inversion shows the network the current latent at the next level."""
        return x * float(((1 + torch.as_tensor(to, dtype=torch.float64) ** 2) /
                          (1 + torch.as_tensor(sigma, dtype=torch.float64) ** 2)).sqrt())


@dataclass(frozen=True)
class FlowSampling:
    """A rectified-flow network (diffusion/flow.py), walked in flow time: sigma = t."""

    shift: float = 1.0
    num_train_timesteps: int = 1000
    consistency: bool = False
    mu: float | None = None  # Flux's resolution-dependent shift e^mu, in place of shift
    grid_end: str = "train"  # the unshifted grid ends at the last training time, or at 1 / steps (Flux)
    signal: Callable[[float], float] | None = FlowDenoiser.signal

    def sigmas(self, steps: int, karras: bool = False, own: OwnTimesteps | None = None) -> torch.Tensor:
        if own is not None:  # integer grid timesteps -> flow times (diffusion/consistency.py)
            shift = math.exp(self.mu) if self.mu is not None else self.shift
            t = flow_grid_t(own(self.num_train_timesteps, steps), self.num_train_timesteps, shift)
            return torch.cat([t.clamp(max=FLOW_T_MAX), t.new_zeros(1)])
        t = flow_timesteps(steps, shift=self.shift, mu=self.mu, num_train_timesteps=self.num_train_timesteps,
                           last=1 / steps if self.grid_end == "steps" else None)
        if karras:  # Karras et al.'s spacing over the same range of t
            t = torch.cat([karras_sigmas(float(t[-2]), float(t[0]), steps).float(), t.new_zeros(1)])
        return t.clamp(max=FLOW_T_MAX)

    def denoiser(self, network, *, consistency: bool = False, quantize: bool = False) -> FlowDenoiser:
        return FlowDenoiser(network, self.num_train_timesteps, consistency=self.consistency or consistency)

    def timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas.double() * self.num_train_timesteps

    def prior(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_t at t near 1 is noise (its data part, (1 - t) x0, vanishes)."""
        return noise

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = float(sigma)
        return (1 - t) * x0 + t * noise

    def relabel(self, x: torch.Tensor, sigma, to) -> torch.Tensor:
        """The network reads x_t itself at every t."""
        return x


ModelSampling = VPSampling | FlowSampling


def model_sampling(spec, latent_hw: tuple[int, int] | None = None) -> ModelSampling:
    """How a model with this spec (io/model_folder.DiffusionSpec) is sampled; ``latent_hw``: the latent's
    size, which a resolution-dependent shift (Flux's) reads (its tokens: 2 x 2 latent patches)."""
    if spec.prediction == "flow":
        mu = None
        if spec.flow_dynamic_shift:
            h, w = latent_hw or (spec.image_size // 8, spec.image_size // 8)
            mu = flux_mu((h // 2) * (w // 2), tuple(spec.flow_shift_range), tuple(spec.flow_token_range))
        return FlowSampling(shift=spec.flow_shift, num_train_timesteps=spec.num_train_timesteps,
                            consistency=spec.consistency, mu=mu, grid_end=spec.flow_grid_end)
    return VPSampling(spec.alphas_cumprod(), spec.prediction, spec.learned_variance, spec.consistency)
