"""Consistency distillation's schedule math, once per parametrization (Luo et al. 2023, Algorithm 1): where a
grid timestep puts a sample, the teacher's one-step solver of the (guidance-augmented) PF-ODE, and the
student's boundary parametrization f(x, t) = c_skip x + c_out x0_hat (parametrization.consistency_output).

The distillation grid is integer timesteps k - 1, 2k - 1, ..., T - 1 (schedules.lcm_grid); a step runs the
teacher from grid timestep s to s - k.
- VP (eps, v, x0): timestep s is the training schedule's, x_s = sqrt(ab) x0 + sqrt(1 - ab) eps, the solver is
  DDIM (diffusers' DDIMSolver), s - k clamped at 0.
- flow: timestep s is flow time t = shift((s + 1) / T) (so the grid's top is pure noise and s - k = -1 is t = 0,
  where f is the identity), x_t = (1 - t) x0 + t eps, the solver is DDIM on the straight path, which is Euler's
  step of the flow ODE: x_t' = (1 - t') x0_hat + t' eps_hat.
``consistency_schedule(spec)`` picks one; model_sampling walks a distilled model over the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imagine.diffusion import parametrization as P
from imagine.diffusion.flow import flow_eps, flow_x0, shift_t


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class VPConsistency:
    alphas_cumprod: torch.Tensor
    prediction: str

    def previous(self, s: torch.Tensor, k: int) -> torch.Tensor:
        return (s - k).clamp(min=0)

    def network_t(self, s: torch.Tensor) -> torch.Tensor:
        return s

    def _ab(self, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _col(self.alphas_cumprod.float()[s], like)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        ab = self._ab(s, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def x0_eps(self, out: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self._ab(s, x)
        a, sd = ab.sqrt(), (1 - ab).sqrt()
        return P.predict_x0(out, x, a, sd, self.prediction), P.predict_eps(out, x, a, sd, self.prediction)

    def step(self, x0: torch.Tensor, eps: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
        ab = self._ab(s_prev, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def f(self, out: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return P.consistency_output(self.x0_eps(out, x, s)[0], x, s)


@dataclass(frozen=True)
class FlowConsistency:
    num_train_timesteps: int = 1000
    shift: float = 1.0

    def previous(self, s: torch.Tensor, k: int) -> torch.Tensor:
        return s - k  # the grid's bottom goes to -1: t = 0

    def time(self, s: torch.Tensor) -> torch.Tensor:
        return flow_grid_t(s, self.num_train_timesteps, self.shift)

    def network_t(self, s: torch.Tensor) -> torch.Tensor:
        return self.time(s) * self.num_train_timesteps

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        t = _col(self.time(s), x0)
        return (1 - t) * x0 + t * noise

    def x0_eps(self, out: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _col(self.time(s), x)
        return flow_x0(out, x, t), flow_eps(out, x, t)

    def step(self, x0: torch.Tensor, eps: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
        t = _col(self.time(s_prev), x0)
        return (1 - t) * x0 + t * eps

    def f(self, out: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return P.consistency_output(self.x0_eps(out, x, s)[0], x, self.network_t(s))


def flow_grid_t(s: torch.Tensor, num_train_timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """Flow time of integer grid timesteps: shift((s + 1) / T), float32 (T - 1 -> 1, -1 -> 0)."""
    return shift_t((torch.as_tensor(s).double() + 1) / num_train_timesteps, shift).float()


ConsistencySchedule = VPConsistency | FlowConsistency


def consistency_schedule(spec) -> ConsistencySchedule:
    """The distillation math of a model with this spec (io/model_folder.DiffusionSpec)."""
    if spec.prediction == "flow":
        return FlowConsistency(spec.num_train_timesteps, spec.flow_shift)
    return VPConsistency(spec.alphas_cumprod(), spec.prediction)
