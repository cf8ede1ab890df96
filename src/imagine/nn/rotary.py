"""Rotary position embeddings (Su et al. 2021) over several axes, as Flux uses them: each token's position is
(axis_0, axis_1, axis_2) ids, each axis rotating its own slice of every head's features."""

from __future__ import annotations

import torch


def rope_1d(dim: int, positions: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) positions -> (cos, sin), each (S, dim), every frequency repeated for its pair of features."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)[: dim // 2] / dim)
    angles = torch.outer(positions.double(), freqs)  # (S, dim/2)
    return angles.cos().repeat_interleave(2, dim=1).float(), angles.sin().repeat_interleave(2, dim=1).float()


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, axes) position ids -> (cos, sin), each (S, sum(axes_dim)): one block of features per axis."""
    parts = [rope_1d(d, ids[:, i].float(), theta) for i, d in enumerate(axes_dim)]
    return torch.cat([c for c, _ in parts], dim=-1), torch.cat([s for _, s in parts], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, S, D) by the per-position angles: each feature pair (a, b) -> (a cos - b sin,
    b cos + a sin), computed in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos[None, None] + rotated * sin[None, None]).to(x.dtype)
