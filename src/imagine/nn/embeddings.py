"""Timestep embeddings: sinusoidal features (Vaswani et al. 2017, as used by Ho et al. 2020) and the MLP
that turns them into the UNet's conditioning vector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imagine.nn.linear import RowwiseLinear


def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """(B,) possibly fractional timesteps -> (B, dim) features [sin, cos] (or [cos, sin] when flipped) at
    frequencies max_period^(-i / (dim/2 - freq_shift)), i < dim/2."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * exponent.exp()[None]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) guidance weights w -> (B, dim) features of 1000 w, [sin, cos] at frequencies
    10000^(-i / (dim/2 - 1)): the guidance-scale embedding of Latent Consistency Models (Luo et al. 2023,
    section 4.2). By convention w = cfg scale - 1. The arguments reach ~10^4, where float32 rounding of the
    frequencies shows, so they are formed in diffusers' order (get_guidance_scale_embedding) to match LCMs
    distilled there."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * 1000.0
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    args = w[:, None] * torch.exp(torch.arange(half, dtype=torch.float32) * -step)[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """Linear-SiLU-Linear (diffusers' names linear_1, linear_2). ``cond_proj_dim``: a further input (an LCM's
    guidance embedding) projected without bias and added to the features before linear_1 (diffusers'
    cond_proj)."""

    def __init__(self, in_channels: int, dim: int, cond_proj_dim: int | None = None):
        super().__init__()
        # row by row: their row count is the batch (nn/linear.py)
        self.cond_proj = RowwiseLinear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim else None
        self.linear_1 = RowwiseLinear(in_channels, dim)
        self.linear_2 = RowwiseLinear(dim, dim)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("this network takes no timestep condition (it has no cond_proj)")
            x = x + self.cond_proj(condition.to(x.dtype))
        return self.linear_2(F.silu(self.linear_1(x)))


class AttentionPooling(nn.Module):
    """DeepFloyd IF's attention pooling (diffusers' AttentionPooling, same parameter names): a query made of
    the tokens' mean plus a learned position attends, per head, over itself and every token; (B, L, D) ->
    (B, D). The query's projection runs row by row (its row count is the batch, nn/linear.py)."""

    def __init__(self, num_heads: int, embed_dim: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"pooling width {embed_dim} is not divisible by {num_heads} heads")
        self.positional_embedding = nn.Parameter(torch.randn(1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = RowwiseLinear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, width = x.shape
        d = width // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, heads, N, d)
            return t.reshape(b, -1, self.num_heads, d).transpose(1, 2)

        query = x.mean(dim=1) + self.positional_embedding.to(x.dtype)  # (B, D)
        tokens = torch.cat([query[:, None], x], dim=1)  # (B, 1 + L, D)
        q, k, v = heads(self.q_proj(query)[:, None]), heads(self.k_proj(tokens)), heads(self.v_proj(tokens))
        scale = d ** -0.25  # on both sides, as IF does (steadier in fp16 than dividing afterwards)
        # one query: products summed elementwise rather than a batched matmul, whose CPU kernel rounds a row
        # differently with the batch size (generation is batch-invariant, tests/unit/test_models.py)
        logits = ((q * scale) * (k * scale)).sum(-1)  # (B, heads, 1 + L)
        weight = torch.softmax(logits.float(), dim=-1).to(q.dtype)
        return (weight[..., None] * v).sum(-2).reshape(b, width)


class TextTimeEmbedding(nn.Module):
    """diffusers' addition_embed_type "text": the text-encoder states, layer-normed and attention-pooled into
    one sentence vector, projected to the timestep embedding's width and layer-normed, join the timestep
    embedding (the pooled-text conditioning SDXL and IF add beside cross-attention). (B, L, D) -> (B, E)."""

    def __init__(self, encoder_dim: int, time_embed_dim: int, num_heads: int = 64):
        super().__init__()
        self.norm1 = nn.LayerNorm(encoder_dim)
        self.pool = AttentionPooling(num_heads, encoder_dim)
        self.proj = RowwiseLinear(encoder_dim, time_embed_dim)
        self.norm2 = nn.LayerNorm(time_embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(hidden_states))))
