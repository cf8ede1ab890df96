"""A Gaussian mixture whose exact denoiser is closed-form: ground truth for samplers.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I). In the VE view x = x0 + sigma eps, so x | k ~ N(mu_k, (s_k^2 + sigma^2) I),
and the ideal denoiser is the posterior mean
    D*(x, sigma) = E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
with responsibilities r_k proportional to w_k N(x; mu_k, (s_k^2 + sigma^2) I). Fed D*, a sampler that
integrates the probability-flow ODE or reverse SDE correctly transports N(0, sigma_max^2)-ish noise
(exactly: the mixture convolved with it) to the mixture itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixture:
    means: torch.Tensor  # (K, D)
    stds: torch.Tensor  # (K,) isotropic
    weights: torch.Tensor  # (K,) summing to 1

    @classmethod
    def ring(cls, modes: int = 8, dim: int = 2, radius: float = 4.0, std: float = 0.3,
             uneven: bool = True) -> GaussianMixture:
        """``modes`` components on a circle in the first two coordinates, unequal weights by default."""
        angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        means = torch.zeros(modes, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * angles.cos(), radius * angles.sin()
        weights = torch.arange(1, modes + 1, dtype=torch.float64) if uneven else torch.ones(modes, dtype=torch.float64)
        return cls(means, torch.full((modes,), std, dtype=torch.float64), weights / weights.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, sigma: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples of x0 + sigma eps (float64) and their component labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x0 = self.means[k] + self.stds[k, None] * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        if sigma:
            x0 = x0 + sigma * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return x0, k

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """r_k(x) at noise level sigma; x (N, D), sigma (N,) -> (N, K)."""
        var = self.stds[None, :] ** 2 + sigma.double()[:, None] ** 2  # (N, K)
        sq = ((x.double()[:, None, :] - self.means[None]) ** 2).sum(-1)  # (N, K)
        logp = self.weights.log()[None] - 0.5 * sq / var - 0.5 * self.dim * var.log()
        return torch.softmax(logp, dim=1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """The exact D*(x, sigma) = E[x0 | x]; x (N, D), sigma (N,) or scalar. Same dtype as x."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        r = self.responsibilities(x, sigma)  # (N, K)
        shrink = self.stds[None, :] ** 2 / (self.stds[None, :] ** 2 + sigma[:, None] ** 2)  # (N, K)
        xd = x.double()[:, None, :]
        per_k = self.means[None] + shrink[..., None] * (xd - self.means[None])  # (N, K, D)
        return (r[..., None] * per_k).sum(1).to(x.dtype)

    def nearest_mode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.double(), self.means).argmin(dim=1)


def _projected_quantiles(gm: GaussianMixture, dirs: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantiles of the mixture projected on unit directions: (P,) levels x (D, P) dirs -> (L, P).
    A projection of an isotropic mixture is the 1-D mixture sum_k w_k N(mu_k . u, s_k^2); its CDF is
    inverted by bisection (56 halvings of a bracket < 2^8 wide: float64 precision)."""
    means = gm.means @ dirs  # (K, P)
    lo = (means - 12 * gm.stds[:, None]).min(0).values.expand(len(levels), -1).clone()
    hi = (means + 12 * gm.stds[:, None]).max(0).values.expand(len(levels), -1).clone()
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    for _ in range(56):
        mid = (lo + hi) / 2
        cdf = (gm.weights[:, None, None] * normal.cdf((mid[None] - means[:, None, :]) / gm.stds[:, None, None])).sum(0)
        below = cdf < levels[:, None]
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


class SlicedW2ToMixture:
    """Sliced Wasserstein-2 distance between point clouds of N points and the mixture itself: for each
    random unit direction, sorted projections are matched with the mixture's exact quantiles at levels
    (i + 1/2) / N. The quantile table is computed once, so scoring many clouds is cheap. Only the
    samples' own finite-size noise remains: a perfect sampler scores the mean over true samples."""

    def __init__(self, gm: GaussianMixture, n: int, projections: int = 256, generator: torch.Generator | None = None):
        dirs = torch.randn(gm.dim, projections, generator=generator, dtype=torch.float64)
        self.dirs = dirs / dirs.norm(dim=0, keepdim=True)
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        self.quantiles = _projected_quantiles(gm, self.dirs, levels)  # (N, P)

    def __call__(self, samples: torch.Tensor) -> float:
        if samples.shape[0] != self.quantiles.shape[0]:
            raise ValueError(f"expected {self.quantiles.shape[0]} samples, got {samples.shape[0]}")
        proj = (samples.double() @ self.dirs).sort(dim=0).values
        return float(((proj - self.quantiles) ** 2).mean().sqrt())

