"""Multi-head attention through torch's scaled_dot_product_attention.

Module and parameter names follow diffusers' ``Attention`` (to_q, to_k, to_v, to_out.0), so Stable
Diffusion checkpoints load unchanged (STYLE rule 11).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V over ``heads`` heads of ``dim_head`` (Vaswani et al. 2017).

    Self-attention when ``context`` is None, cross-attention (Q from x, K and V from context) otherwise.
    x: (B, N, query_dim); context: (B, M, cross_attention_dim); mask: (B, M) True where a token counts.

    ``streams``: extra key/value streams swapped in for a call (``swapped_streams``; IP-Adapter), each
    (to_k_ip, to_v_ip, tokens (B, K, D), scale), added as decoupled cross-attention (Ye et al. 2023, eq. 5):
    Z = Attn(Q, K_text, V_text) + sum_i scale_i Attn(Q, to_k_ip_i(tokens_i), to_v_ip_i(tokens_i)).
    With none, or a scale of 0, the layer runs exactly as without them.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 bias: bool = False, out_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.streams: tuple = ()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b = x.shape[0]

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, inner) -> (B, heads, N, d)
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = (heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, x.shape[1], -1)
        for to_k_ip, to_v_ip, tokens, scale in self.streams:
            if scale == 0:
                continue
            tokens = tokens.to(x.dtype)
            extra = F.scaled_dot_product_attention(q, heads(to_k_ip(tokens)), heads(to_v_ip(tokens)))
            out = out + scale * extra.transpose(1, 2).reshape(b, x.shape[1], -1)
        return self.to_out[1](self.to_out[0](out))


class JointAttention(nn.Module):
    """MMDiT's joint attention (Esser et al. 2024, Fig. 2): image and text tokens each get their own Q, K, V
    projections, attend together as one sequence, and are split back, each through its own output projection.
    Names follow diffusers' Attention with added_kv_proj_dim (to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out;
    norm_q, norm_k, norm_added_q, norm_added_k with qk_norm "rms_norm", SD3.5's). ``context_pre_only``: the last
    block's text path stops here (no to_add_out; the text tokens are not returned)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_pre_only: bool = False,
                 qk_norm: str | None = None, eps: float = 1e-6):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.context_pre_only = heads, context_pre_only
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = None if context_pre_only else nn.Linear(inner, dim)
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {qk_norm!r} unknown; imagine implements none and rms_norm (SD3.5)")
        norms = [nn.RMSNorm(dim_head, eps=eps) if qk_norm else None for _ in range(4)]
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = norms

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, dim), context (B, M, dim), mask (B, M) True where a text token counts (None: all; SD3
        attends to its padding) -> (x's output (B, N, dim), context's (B, M, dim) or None)."""
        b, n = x.shape[0], x.shape[1]

        def heads(t: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:  # (B, L, inner) -> (B, heads, L, d)
            t = t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)
            return norm(t.float()).to(t.dtype) if norm is not None else t  # RMS in fp32 (fused under autocast)

        q = torch.cat([heads(self.to_q(x), self.norm_q), heads(self.add_q_proj(context), self.norm_added_q)], dim=2)
        k = torch.cat([heads(self.to_k(x), self.norm_k), heads(self.add_k_proj(context), self.norm_added_k)], dim=2)
        v = torch.cat([heads(self.to_v(x), None), heads(self.add_v_proj(context), None)], dim=2)
        keep = None
        if mask is not None:  # every image token is a key; text keys only where they count
            keep = torch.cat([mask.new_ones(b, n, dtype=torch.bool), mask.bool()], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, q.shape[2], -1)
        image, text = out[:, :n], out[:, n:]
        image = self.to_out[1](self.to_out[0](image))
        return image, (None if self.to_add_out is None else self.to_add_out(text))


@contextmanager
def swapped_streams(streams: Mapping[Attention, Sequence] | None):
    """Each attention layer of ``streams`` reads its extra key/value streams for the block; none after it."""
    layers = list(streams or ())
    for attn in layers:
        attn.streams = tuple(streams[attn])
    try:
        yield
    finally:
        for attn in layers:
            attn.streams = ()


class SpatialSelfAttention(nn.Module):
    """GroupNorm, single-block self-attention over the H x W positions and a residual: the attention
    of the VAE's mid-block and of diffusers' AttnDownBlock2D (parameter names group_norm, to_q, ...)."""

    def __init__(self, channels: int, heads: int = 1, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.heads = heads
        dim_head = channels // heads
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self._dim_head = dim_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = (t.reshape(b, h * w, self.heads, self._dim_head).transpose(1, 2)
                   for t in (self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = self.to_out[1](self.to_out[0](out))
        return x + out.transpose(1, 2).reshape(b, c, h, w)
