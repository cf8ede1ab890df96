"""PixArt-alpha's transformer (Chen et al. 2023, "PixArt-alpha: Fast Training of Diffusion Transformer"): a DiT
whose blocks cross-attend to the text (a T5 encoder's states, projected) and share one adaLN ("adaLN-single":
one MLP of the timestep gives six modulation vectors for all blocks, each block adding its own learned table).

State-dict keys are diffusers' ``PixArtTransformer2DModel`` (pos_embed, adaln_single, caption_projection,
transformer_blocks.N.{scale_shift_table, attn1, attn2, ff}, scale_shift_table, proj_out), so PixArt-alpha and
PixArt-Sigma checkpoints load unchanged. The 1024 px alpha models also embed the resolution and aspect ratio
(``use_additional_conditions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagine.nn.attention import Attention
from imagine.nn.config import config_from_dict
from imagine.nn.embeddings import TimestepEmbedding, timestep_embedding
from imagine.nn.patches import (
    GeluFeedForward,
    PatchEmbed,
    gelu_tanh,
    patch_grid,
    unpatchify,
    xavier_projections_,
    zero_,
)


@dataclass(frozen=True)
class PixArtConfig:
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None  # None: in_channels; 2 x in_channels with a learned variance (PixArt's 8)
    num_layers: int = 28
    cross_attention_dim: int | None = None  # the blocks' width (diffusers keeps it equal to heads x head dim)
    sample_size: int = 128
    patch_size: int = 2
    caption_channels: int = 4096  # the text encoder's width (T5-XXL's)
    interpolation_scale: float | None = None  # None: sample_size // 64, at least 1
    use_additional_conditions: bool | None = None  # None: at sample_size 128 (PixArt-alpha 1024 px)
    dropout: float = 0.0
    attention_bias: bool = True
    norm_eps: float = 1e-6
    num_embeds_ada_norm: int = 1000
    activation_fn: Literal["gelu-approximate"] = "gelu-approximate"
    norm_type: Literal["ada_norm_single"] = "ada_norm_single"
    norm_elementwise_affine: bool = False
    upcast_attention: bool = False
    attention_type: Literal["default"] = "default"
    norm_num_groups: int = 32  # unused (diffusers keeps it in PixArt configs)

    def __post_init__(self):
        if self.cross_attention_dim not in (None, self.inner_dim):
            raise ValueError(f"cross_attention_dim ({self.cross_attention_dim}) must equal heads x head dim "
                             f"({self.inner_dim}): the caption projection maps the text to the blocks' width")
        if self.norm_elementwise_affine:
            raise ValueError("PixArt's norms have no affine parameters; leave norm_elementwise_affine false")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def positions_scale(self) -> float:
        return self.interpolation_scale if self.interpolation_scale is not None else max(self.sample_size // 64, 1)

    @property
    def additional_conditions(self) -> bool:
        return self.use_additional_conditions if self.use_additional_conditions is not None else \
            self.sample_size == 128

    @classmethod
    def from_dict(cls, data: dict) -> PixArtConfig:
        return config_from_dict(cls, data, "PixArt config")


class TimestepSizeEmbedding(nn.Module):
    """The timestep's MLP embedding, plus (PixArt-alpha at 1024 px) the resolution's and aspect ratio's, each a
    third of the width (diffusers' PixArtAlphaCombinedTimestepSizeEmbeddings)."""

    FREQUENCIES = 256

    def __init__(self, dim: int, additional: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(self.FREQUENCIES, dim)
        if additional:
            self.resolution_embedder = TimestepEmbedding(self.FREQUENCIES, dim // 3)
            self.aspect_ratio_embedder = TimestepEmbedding(self.FREQUENCIES, dim // 3)
        self.additional = additional

    def _features(self, values: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(values.flatten(), self.FREQUENCIES, flip_sin_to_cos=True, freq_shift=0)

    def forward(self, timestep: torch.Tensor, resolution: torch.Tensor | None, aspect_ratio: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        emb = self.timestep_embedder(self._features(timestep).to(dtype))
        if not self.additional:
            return emb
        if resolution is None or aspect_ratio is None:
            raise ValueError("this PixArt (1024 px alpha) embeds the image's resolution (B, 2) and aspect ratio "
                             "(B, 1): pass both")
        b = timestep.shape[0]
        size = self.resolution_embedder(self._features(resolution).to(dtype)).reshape(b, -1)
        ratio = self.aspect_ratio_embedder(self._features(aspect_ratio).to(dtype)).reshape(b, -1)
        return emb + torch.cat([size, ratio], dim=1)


class AdaLayerNormSingle(nn.Module):
    """adaLN-single: the six modulation vectors of every block from one MLP of the timestep embedding."""

    def __init__(self, dim: int, additional: bool):
        super().__init__()
        self.emb = TimestepSizeEmbedding(dim, additional)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep, resolution, aspect_ratio, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(the blocks' (B, 6 dim) modulation, the timestep embedding (B, dim))."""
        embedded = self.emb(timestep, resolution, aspect_ratio, dtype)
        return self.linear(F.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    """The text states to the blocks' width: Linear, tanh GELU, Linear (diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(gelu_tanh(self.linear_1(x)))


class PixArtBlock(nn.Module):
    """Self-attention and MLP modulated by the shared adaLN plus this block's table; cross-attention to the text
    in between, unmodulated (PixArt's design: the text enters only there)."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.attention_head_dim, bias=cfg.attention_bias,
                               dropout=cfg.dropout)
        self.attn2 = Attention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cross_attention_dim=dim,
                               bias=cfg.attention_bias, dropout=cfg.dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.ff = GeluFeedForward(dim, dropout=cfg.dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
                modulation: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + modulation.reshape(b, 6, -1)).chunk(6, dim=1)  # (B, 1, dim) each
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(x, context, mask)
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class PixArtTransformer2DModel(nn.Module):
    """pixart(sample (B, C, H, W), timestep (B,), encoder_hidden_states (B, M, caption_channels),
    encoder_attention_mask (B, M) with 1 where a token counts) -> (B, C_out, H, W)."""

    def __init__(self, config: PixArtConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg.sample_size, cfg.patch_size, cfg.in_channels, dim,
                                    interpolation_scale=cfg.positions_scale)
        self.transformer_blocks = nn.ModuleList([PixArtBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.output_channels)
        self.adaln_single = AdaLayerNormSingle(dim, cfg.additional_conditions)
        self.caption_projection = CaptionProjection(cfg.caption_channels, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier projections, N(0, 0.02) timestep MLPs and caption projection, and the output projection zero."""
        xavier_projections_(self, self.pos_embed)
        for layer in (self.adaln_single.emb.timestep_embedder.linear_1,
                      self.adaln_single.emb.timestep_embedder.linear_2, self.adaln_single.linear,
                      self.caption_projection.linear_1, self.caption_projection.linear_2):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.transformer_blocks:  # the cross-attention starts closed, as PixArt initializes it
            zero_(block.attn2.to_out[0])
        zero_(self.proj_out)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, resolution: torch.Tensor | None = None,
                aspect_ratio: torch.Tensor | None = None, **unused) -> torch.Tensor:
        cfg = self.config
        timestep, h, w = patch_grid(sample, timestep, cfg.in_channels, cfg.patch_size)
        x = self.pos_embed(sample)  # (B, h w, dim)
        modulation, embedded = self.adaln_single(timestep, resolution, aspect_ratio, x.dtype)
        context = self.caption_projection(encoder_hidden_states.to(x.dtype))
        mask = encoder_attention_mask.bool() if encoder_attention_mask is not None else None
        for block in self.transformer_blocks:
            x = block(x, context, mask, modulation)
        shift, scale = (self.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        return unpatchify(x, h, w, cfg.patch_size, cfg.output_channels)
