"""The spatial transformer of the SD UNet: image features attend to themselves and to the text
(Rombach et al. 2022, Fig. 3). Parameter names follow diffusers' Transformer2DModel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagine.nn.attention import Attention


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj to 2 x inner, value * gelu(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """(B, C, H, W) -> GroupNorm, proj_in, ``layers`` transformer blocks over the H x W tokens, proj_out,
    plus the input. proj_in/out are 1x1 convs (SD 1.x) or linear layers (SD 2.x: use_linear_projection)."""

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, layers: int = 1, groups: int = 32,
                 use_linear_projection: bool = False, dropout: float = 0.0):
        super().__init__()
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim, dropout)
             for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if self.use_linear_projection:
            hidden = self.proj_in(hidden.permute(0, 2, 3, 1).reshape(b, h * w, c))
        else:
            hidden = self.proj_in(hidden).permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, mask)
        if self.use_linear_projection:
            hidden = self.proj_out(hidden).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            hidden = self.proj_out(hidden.reshape(b, h, w, c).permute(0, 3, 1, 2))
        return hidden + x
