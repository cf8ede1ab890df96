"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): the latent cut into p x p patches,
denoised as tokens by transformer blocks conditioned through adaLN-Zero on the timestep and the class.

State-dict keys are diffusers' ``DiTTransformer2DModel`` (pos_embed.proj, transformer_blocks.N.norm1.emb...,
attn1, ff.net, proj_out_1, proj_out_2), so its checkpoints load unchanged; its config.json keys are this
config's. Each block carries its own copy of the timestep and class embedders, as diffusers converts DiT's
one shared embedder; the final layer reads block 0's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from imagine.nn.attention import Attention
from imagine.nn.config import config_from_dict
from imagine.nn.patches import (
    AdaLayerNormZero,
    GeluFeedForward,
    PatchEmbed,
    modulate,
    patch_grid,
    unpatchify,
    xavier_projections_,
    zero_,
)


@dataclass(frozen=True)
class DiTConfig:
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None  # None: in_channels; 2 x in_channels for a learned variance (DiT-XL/2)
    num_layers: int = 28
    sample_size: int = 32  # latent side at training (the positions' base grid)
    patch_size: int = 2
    num_embeds_ada_norm: int = 1000  # classes (one more row for the dropped label)
    dropout: float = 0.0
    attention_bias: bool = True
    norm_eps: float = 1e-5
    activation_fn: Literal["gelu-approximate"] = "gelu-approximate"
    norm_type: Literal["ada_norm_zero"] = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    upcast_attention: bool = False  # SDPA runs in the input's precision either way
    norm_num_groups: int = 32  # unused by the transformer (diffusers keeps it in DiT configs)

    def __post_init__(self):
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}")
        if self.norm_elementwise_affine:
            raise ValueError("DiT's norms have no affine parameters (adaLN supplies them); leave "
                             "norm_elementwise_affine false")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_class_embeds(self) -> int:
        """Rows of the class table: the classes and the dropped label (as a UNet's num_class_embeds counts)."""
        return self.num_embeds_ada_norm + 1

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, data: dict) -> DiTConfig:
        return config_from_dict(cls, data, "DiT config")


class DiTBlock(nn.Module):
    """x + gate_msa Attn(adaLN(x)), then x + gate_mlp MLP(LN(x) (1 + scale) + shift)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = AdaLayerNormZero(dim, cfg.num_embeds_ada_norm)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.attention_head_dim, bias=cfg.attention_bias,
                               dropout=cfg.dropout)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.ff = GeluFeedForward(dim, dropout=cfg.dropout)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, timestep, labels)
        x = x + gate_msa[:, None] * self.attn1(h)
        return x + gate_mlp[:, None] * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))


class DiTTransformer2DModel(nn.Module):
    """dit(sample (B, C, H, W), timestep (B,), class_labels (B,)) -> (B, C_out, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg.sample_size, cfg.patch_size, cfg.in_channels, dim)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, cfg.patch_size**2 * cfg.output_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialization: Xavier projections, N(0, 0.02) embeddings, and adaLN-Zero: every modulation
        and the output projection zero, so the network starts as the identity of its residual path."""
        xavier_projections_(self, self.pos_embed)
        for block in self.transformer_blocks:
            nn.init.normal_(block.norm1.emb.class_embedder.embedding_table.weight, std=0.02)
            for layer in (block.norm1.emb.timestep_embedder.linear_1, block.norm1.emb.timestep_embedder.linear_2):
                nn.init.normal_(layer.weight, std=0.02)
            zero_(block.norm1.linear)
        zero_(self.proj_out_1)
        zero_(self.proj_out_2)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                **unused) -> torch.Tensor:
        cfg = self.config
        if class_labels is None:
            raise ValueError(f"a DiT is class-conditional: pass class_labels (B,), {cfg.num_embeds_ada_norm} for "
                             "the dropped label of guidance")
        timestep, h, w = patch_grid(sample, timestep, cfg.in_channels, cfg.patch_size)
        x = self.pos_embed(sample)  # (B, h w, dim)
        for block in self.transformer_blocks:
            x = block(x, timestep, class_labels)
        conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, x.dtype)
        shift, scale = self.proj_out_1(nn.functional.silu(conditioning)).chunk(2, dim=1)
        x = self.proj_out_2(modulate(self.norm_out(x), shift, scale))
        return unpatchify(x, h, w, cfg.patch_size, cfg.output_channels)
