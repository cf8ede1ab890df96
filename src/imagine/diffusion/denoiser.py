"""A network trained on a discrete VP schedule, presented as a VE denoiser D(x, sigma, cond) -> x0.

k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser, in one class: the input is scaled by
c_in = 1 / sqrt(1 + sigma^2) (the VE sample becomes the VP one), sigma becomes the fractional
timestep the network was trained on, and its output is read through ``parametrization``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from imagine.diffusion import parametrization as P
from imagine.diffusion.schedules import Interpolation, sigma_to_t, sigmas_from_alphas_cumprod

Cond = Mapping[str, Any] | None


class DenoiserFn(Protocol):
    """The one contract every sampler calls: x (B, ...), sigma (B,) -> x0 estimate (B, ...)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor: ...


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dimensions in all."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def broadcast_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) sigma as a (B,) tensor on x's device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


class Denoiser:
    """Wraps ``network(x_t, t, **cond) -> output`` trained on ``alphas_cumprod`` (T,).

    prediction: what the network outputs (eps, v or x0).
    quantize: round the timestep handed to the network to an integer (diffusers' DPM-Solver and
        UniPC do this under Karras sigmas; k-diffusion's ``quantize``). Off by default: fractional.
    interpolation: how a sigma between two training steps becomes a fractional timestep; "log" (k-diffusion)
        unless the sigmas were made with linear interpolation (see schedules.t_to_sigma).
    learned_variance: the network outputs 2C channels, the second half being the improved-DDPM
        variance interpolation v in [-1, 1] (Nichol & Dhariwal 2021, eq. 15).
    consistency: the network is a consistency model (an LCM): D returns f(x_t, t) = c_skip x_t + c_out x0_hat,
        its boundary parametrization (parametrization.consistency_output), which is exact at t = 0.
    """

    def __init__(
        self,
        network: Callable[..., torch.Tensor],
        alphas_cumprod: torch.Tensor,
        prediction: P.Prediction = "eps",
        *,
        quantize: bool = False,
        interpolation: Interpolation = "log",
        learned_variance: bool = False,
        consistency: bool = False,
    ):
        self.network = network
        self.alphas_cumprod = alphas_cumprod.double()
        self.prediction = P.check_prediction(prediction)
        if self.prediction == "flow":
            raise ValueError("a flow model has no VP schedule: present it with FlowDenoiser")
        self.quantize = quantize
        self.interpolation = interpolation
        self.learned_variance = learned_variance
        self.consistency = consistency
        sig = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = float(sig[0]), float(sig[-1])

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _alphas(self, device: torch.device) -> torch.Tensor:
        """The schedule on ``device`` (copied there once)."""
        if self.alphas_cumprod.device != device:
            cache = self.__dict__.setdefault("_on", {})
            if device not in cache:
                cache[device] = self.alphas_cumprod.to(device)
            return cache[device]
        return self.alphas_cumprod

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor | None]:
        sigma = broadcast_sigma(sigma, x)
        alpha, sigma_vp = (append_dims(s, x.ndim) for s in P.vp_alpha_sigma(sigma))
        # the timestep on the sample's own device (no round trip to the CPU per step); MPS has no float64
        where = torch.device("cpu") if sigma.device.type == "mps" else sigma.device
        t = sigma_to_t(sigma.detach().to(where), self._alphas(where), self.quantize, self.interpolation)
        t = t.to(x.device, torch.float32)
        x_t = x * alpha  # c_in: VE -> VP sample
        out = self.network(x_t, t, **(cond or {}))
        var = None
        if self.learned_variance:
            out, var = out.chunk(2, dim=1)
        x0 = P.predict_x0(out, x_t, alpha, sigma_vp, self.prediction)
        if self.consistency:
            x0 = P.consistency_output(x0, x_t, t)
        return x0, var

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return self._run(x, sigma, cond)[0]

    def denoise_with_variance(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, v): the x0 estimate and the learned variance interpolation, for the DDPM sampler."""
        if not self.learned_variance:
            raise ValueError("this model does not learn its variance; use variance='fixed_small' or 'fixed_large'")
        x0, var = self._run(x, sigma, cond)
        assert var is not None
        return x0, var


class FlowDenoiser:
    """A rectified-flow network ``network(x_t, 1000 t, **cond) -> v`` presented as D(x, sigma, cond) -> x0 with
    sigma = t in [0, 1] and x = x_t = (1 - t) x0 + t eps (ComfyUI's "CONST" model sampling; what diffusers'
    flow-matching schedulers walk). x0 = x_t - t v. The flow ODE dx/dt = v = (x - x0) / t has the form of the VE
    ODE dx/dsigma = (x - D) / sigma, so every deterministic sampler integrates it as it is; samplers that
    inject noise read ``signal`` (the data's scale in x_t, 1 - t: samplers/common.py).

    consistency: a flow consistency model (a flow LCM): D returns f(x_t, t) = c_skip x_t + c_out x0_hat, the
    scalings read at the network's timestep 1000 t (exact at t = 0), as diffusion/consistency.py trains it."""

    def __init__(self, network: Callable[..., torch.Tensor], num_train_timesteps: int = 1000,
                 consistency: bool = False):
        self.network = network
        self.num_train_timesteps = num_train_timesteps  # the network's timestep is t times this (diffusers')
        self.consistency = consistency

    @staticmethod
    def signal(sigma: float) -> float:
        return 1.0 - sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        t = broadcast_sigma(sigma, x)
        timestep = (t * self.num_train_timesteps).float()
        v = self.network(x, timestep, **(cond or {}))
        x0 = x - append_dims(t, x.ndim) * v.to(x.dtype)
        if self.consistency:
            x0 = P.consistency_output(x0, x, timestep)
        return x0
