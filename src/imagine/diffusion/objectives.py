"""What a training step draws and regresses, by parametrization: the training-side twin of
model_sampling.py, so the training loop never tests for one.

- VP (eps, v, x0): an integer timestep uniform over the schedule, x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, the
  loss of losses.diffusion_loss (min-SNR weighting, improved DDPM's hybrid loss);
- flow: t in (0, 1) from one of SD3's densities (flow.sample_t), x_t = (1 - t) x0 + t eps, the network
  called at 1000 t, the loss ||v - (eps - x0)||^2 (Esser et al. 2024, eq. 1 to 3, the conditional flow
  matching objective with their weighting folded into the density).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imagine.diffusion.denoiser import append_dims
from imagine.diffusion.flow import Density, flow_noisy, flow_velocity, sample_t
from imagine.diffusion.losses import diffusion_loss


@dataclass(frozen=True)
class VPObjective:
    alphas_cumprod: torch.Tensor  # (T,)
    prediction: str
    min_snr_gamma: float | None = None
    learned_variance: bool = False

    def draw_t(self, generator: torch.Generator) -> int:
        return int(torch.randint(len(self.alphas_cumprod), (1,), generator=generator))

    def timesteps(self, t: list, device) -> torch.Tensor:
        return torch.tensor(t, device=device)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the network's timestep)."""
        ab = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t

    def loss(self, output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
        return diffusion_loss(output, x0, noise, x_t, t, self.alphas_cumprod, self.prediction,
                              min_snr_gamma=self.min_snr_gamma, learned_variance=self.learned_variance)


@dataclass(frozen=True)
class FlowObjective:
    density: Density = "logit_normal"
    num_train_timesteps: int = 1000

    def draw_t(self, generator: torch.Generator) -> float:
        return float(sample_t(1, self.density, generator=generator))

    def timesteps(self, t: list, device) -> torch.Tensor:
        return torch.tensor(t, dtype=torch.float32, device=device)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return flow_noisy(x0, noise, append_dims(t, x0.ndim)), t * self.num_train_timesteps

    def loss(self, output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
        if output.shape != x0.shape:
            raise ValueError(f"model output {tuple(output.shape)} does not match the data {tuple(x0.shape)}")
        return (output.float() - flow_velocity(x0, noise).float()).pow(2).flatten(1).mean(1).mean()


Objective = VPObjective | FlowObjective


def objective(prediction: str, alphas_cumprod: torch.Tensor, *, min_snr_gamma: float | None = None,
              learned_variance: bool = False, flow_density: Density = "logit_normal") -> Objective:
    if prediction == "flow":
        if min_snr_gamma is not None or learned_variance:
            raise ValueError("a flow model weights its loss by its training density (flow_density) and has no "
                             "learned variance: leave min_snr_gamma and learned_variance unset")
        return FlowObjective(flow_density, len(alphas_cumprod))
    return VPObjective(alphas_cumprod, prediction, min_snr_gamma, learned_variance)
