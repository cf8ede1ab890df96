"""SD3's MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
Fig. 2): image patches and text tokens each keep their own weights but attend jointly in every block, both
modulated (adaLN-Zero) by one vector of the timestep and the pooled text; trained with flow matching.

State-dict keys are diffusers' ``SD3Transformer2DModel`` (pos_embed, time_text_embed, context_embedder,
transformer_blocks.N.{norm1, norm1_context, attn, ff, ff_context}, norm_out, proj_out), so SD3 checkpoints load
unchanged. The last block is "context pre-only": its text path ends at the attention. SD3.5 Medium's dual
attention layers (MMDiT-X: in the blocks ``dual_attention_layers`` names, a second, image-only self-attention
with its own modulation after the joint one) are built too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from imagine.nn.attention import JointAttention
from imagine.nn.config import config_from_dict
from imagine.nn.embeddings import TimestepEmbedding, timestep_embedding
from imagine.nn.patches import (
    AdaLayerNormContinuous,
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
class MMDiTConfig:
    sample_size: int = 128  # latent side at training (the positions' base grid)
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # the text states' width (T5's, or CLIP's concatenated)
    caption_projection_dim: int = 1152  # = heads x head dim
    pooled_projection_dim: int = 2048  # the pooled text vector's width
    out_channels: int = 16
    pos_embed_max_size: int = 96  # positions for grids up to this many patches a side
    qk_norm: str | None = None  # "rms_norm" (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 Medium's MMDiT-X blocks: a second, image-only attention

    def __post_init__(self):
        if any(not 0 <= i < self.num_layers for i in self.dual_attention_layers):
            raise ValueError(f"dual_attention_layers {self.dual_attention_layers} name blocks outside 0 to "
                             f"{self.num_layers - 1}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim ({self.caption_projection_dim}) must equal heads x head dim "
                             f"({self.inner_dim}): text and image tokens attend in one sequence")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, data: dict) -> MMDiTConfig:
        return config_from_dict(cls, data, "MMDiT config")


class TimestepTextEmbedding(nn.Module):
    """The blocks' conditioning vector: the timestep's 256 sinusoidal features through an MLP plus the pooled
    text through another (diffusers' CombinedTimestepTextProjEmbeddings)."""

    FREQUENCIES = 256

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(self.FREQUENCIES, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # linear_1, SiLU, linear_2: the same shape

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(timestep, self.FREQUENCIES, flip_sin_to_cos=True, freq_shift=0)
        return self.timestep_embedder(features.to(pooled.dtype)) + self.text_embedder(pooled)


class AdaLayerNormZeroX(nn.Module):
    """SD3.5's adaLN-Zero for a dual-attention block: nine vectors, the usual six and a shift, scale and gate
    for the second attention, both attentions reading the same normed input (diffusers' SD35AdaLayerNormZeroX)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 9 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(modulated x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x modulated for attention 2, its gate)."""
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate2 = \
            self.linear(F.silu(emb)).chunk(9, dim=1)
        normed = self.norm(x)
        return (modulate(normed, shift, scale), gate, shift_mlp, scale_mlp, gate_mlp, modulate(normed, shift2, scale2),
                gate2)


class SelfAttention(nn.Module):
    """Image-only self-attention with optional RMS-normed queries and keys (diffusers' Attention names: to_q,
    to_k, to_v, norm_q, norm_k, to_out.0)."""

    def __init__(self, dim: int, heads: int, dim_head: int, qk_norm: str | None = None, eps: float = 1e-6):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q = nn.RMSNorm(dim_head, eps=eps) if qk_norm else None
        self.norm_k = nn.RMSNorm(dim_head, eps=eps) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]

        def heads(t: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
            t = t.reshape(b, n, self.heads, -1).transpose(1, 2)
            return norm(t.float()).to(t.dtype) if norm is not None else t  # RMS in fp32 (fused under autocast)

        q, k, v = heads(self.to_q(x), self.norm_q), heads(self.to_k(x), self.norm_k), heads(self.to_v(x), None)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out[1](self.to_out[0](out))


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, context_pre_only: bool, dual: bool = False):
        super().__init__()
        dim = cfg.inner_dim
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = AdaLayerNormZeroX(dim) if dual else AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim, dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, context_pre_only,
                                   cfg.qk_norm)
        if dual:
            self.attn2 = SelfAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = GeluFeedForward(dim)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = GeluFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.dual:
            h, gate_msa, shift_mlp, scale_mlp, gate_mlp, h2, gate_msa2 = self.norm1(x, emb=temb)
        else:
            h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)
        if self.context_pre_only:
            c = self.norm1_context(context, temb)
        else:
            c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, emb=temb)
        attn, context_attn = self.attn(h, c, mask)
        x = x + gate_msa[:, None] * attn
        if self.dual:
            x = x + gate_msa2[:, None] * self.attn2(h2)
        x = x + gate_mlp[:, None] * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa[:, None] * context_attn
        context = context + c_gate_mlp[:, None] * self.ff_context(modulate(self.norm2_context(context), c_shift_mlp,
                                                                            c_scale_mlp))
        return x, context


def _embeddings(module: nn.Module, cfg: MMDiTConfig) -> None:
    """An MMDiT's (and its ControlNet's) inputs: the patch embedding with its positions, the timestep and
    pooled-text vector, the text states' projection."""
    module.pos_embed = PatchEmbed(cfg.sample_size, cfg.patch_size, cfg.in_channels, cfg.inner_dim,
                                  pos_embed_max_size=cfg.pos_embed_max_size)
    module.time_text_embed = TimestepTextEmbedding(cfg.inner_dim, cfg.pooled_projection_dim)
    module.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)


class SD3Transformer2DModel(nn.Module):
    """mmdit(sample (B, C, H, W), timestep (B,), encoder_hidden_states (B, M, joint_attention_dim),
    pooled_projections (B, pooled_projection_dim), encoder_attention_mask (B, M) or None: SD3 attends to every
    text token) -> (B, C_out, H, W). Timesteps are diffusers' flow convention, 1000 t."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.inner_dim
        _embeddings(self, cfg)
        self.transformer_blocks = nn.ModuleList([JointBlock(cfg, context_pre_only=i == cfg.num_layers - 1,
                                                            dual=i in cfg.dual_attention_layers)
                                                 for i in range(cfg.num_layers)])
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier projections, and every modulation and the output projection zero (adaLN-Zero)."""
        xavier_projections_(self, self.pos_embed)
        for block in self.transformer_blocks:
            zero_(block.norm1.linear)
            zero_(block.norm1_context.linear)
        zero_(self.norm_out.linear)
        zero_(self.proj_out)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None,
                block_controlnet_hidden_states: Sequence[torch.Tensor] | None = None, **unused) -> torch.Tensor:
        """block_controlnet_hidden_states: a ControlNet's outputs (SD3ControlNetModel), added to the image tokens
        after the blocks they align with (block i takes output i / (blocks / outputs), as diffusers spreads them)."""
        cfg = self.config
        timestep, h, w = patch_grid(sample, timestep, cfg.in_channels, cfg.patch_size)
        x = self.pos_embed(sample)  # (B, h w, dim)
        temb = self.time_text_embed(timestep, pooled_projections.to(x.dtype))
        context = self.context_embedder(encoder_hidden_states.to(x.dtype))
        controls = list(block_controlnet_hidden_states or ())
        for i, block in enumerate(self.transformer_blocks):
            x, context = block(x, context, temb, encoder_attention_mask)
            if controls and not block.context_pre_only:
                x = x + controls[int(i / (len(self.transformer_blocks) / len(controls)))].to(x.dtype)
        x = self.proj_out(self.norm_out(x, temb))
        return unpatchify(x, h, w, cfg.patch_size, cfg.out_channels)


@dataclass(frozen=True)
class MMDiTControlNetConfig(MMDiTConfig):
    """An SD3 ControlNet's config (diffusers' SD3ControlNetModel): the MMDiT's, num_layers its own blocks."""

    extra_conditioning_channels: int = 0
    pos_embed_type: str | None = "sincos"
    use_pos_embed: bool = True
    force_zeros_for_pooled_projection: bool = True  # the pipeline hands it zeros for the pooled text

    def __post_init__(self):
        super().__post_init__()
        if not self.use_pos_embed or self.pos_embed_type != "sincos":
            raise ValueError("this SD3 ControlNet reads the transformer's own positions (SD3.5 Large's kind); "
                             "imagine builds the kind with its own patch embedding (SD3, SD3.5 Medium, its own)")

    @classmethod
    def from_dict(cls, data: dict) -> MMDiTControlNetConfig:
        return config_from_dict(cls, data, "SD3 ControlNet config")


class SD3ControlNetModel(nn.Module):
    """A ControlNet for the MMDiT (Zhang et al. 2023 as PixArt-delta and SD3 carry it to transformers): a
    trainable copy of the first blocks reads the image tokens plus the condition's latent patches (through a
    zero-initialized patch embedding), and each block's image tokens leave through a zero-initialized linear
    layer, to be added after the base's blocks (SD3Transformer2DModel's block_controlnet_hidden_states). A fresh
    one changes nothing. Keys are diffusers' SD3ControlNetModel's, so InstantX's and Stability's SD3 ControlNets
    load; controlnet(sample, timestep, encoder_hidden_states, pooled_projections, controlnet_cond (B, C, H, W):
    the condition image's latents) -> [(B, N, dim)] per block."""

    def __init__(self, config: MMDiTControlNetConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.inner_dim
        _embeddings(self, cfg)
        self.transformer_blocks = nn.ModuleList([JointBlock(cfg, context_pre_only=False,
                                                            dual=i in cfg.dual_attention_layers)
                                                 for i in range(cfg.num_layers)])
        self.controlnet_blocks = nn.ModuleList([zero_(nn.Linear(dim, dim)) for _ in range(cfg.num_layers)])
        self.pos_embed_input = PatchEmbed(cfg.sample_size, cfg.patch_size,
                                          cfg.in_channels + cfg.extra_conditioning_channels, dim, positions=False)
        zero_(self.pos_embed_input.proj)

    @classmethod
    def from_transformer(cls, transformer: SD3Transformer2DModel, num_layers: int | None = None
                         ) -> SD3ControlNetModel:
        """A fresh ControlNet for ``transformer``: its first ``num_layers`` blocks (half by default) and its
        embeddings copied, the output layers and the condition's embedding at zero (the base exactly)."""
        base = transformer.config
        n = num_layers or max(1, base.num_layers // 2)
        if not 1 <= n < base.num_layers:
            raise ValueError(f"a ControlNet copies 1 to {base.num_layers - 1} of the transformer's blocks, not {n}")
        kept = {f.name: getattr(base, f.name) for f in fields(MMDiTConfig)}
        net = cls(MMDiTControlNetConfig(**{**kept, "num_layers": n}, force_zeros_for_pooled_projection=False))
        own = transformer.state_dict()
        state = {k: v for k, v in own.items() if k.split(".")[0] in ("pos_embed", "time_text_embed", "context_embedder")
                 or (k.startswith("transformer_blocks.") and int(k.split(".")[1]) < n)}
        missing, unexpected = net.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith(("controlnet_blocks.", "pos_embed_input.")) for k in missing), \
            (missing, unexpected)
        return net.to(next(transformer.parameters()).dtype)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, controlnet_cond: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, conditioning_scale: float = 1.0
                ) -> list[torch.Tensor]:
        cfg = self.config
        timestep, _, _ = patch_grid(sample, timestep, cfg.in_channels, cfg.patch_size)
        if controlnet_cond.shape[-2:] != sample.shape[-2:]:
            raise ValueError(f"the condition's latents {tuple(controlnet_cond.shape)} must match the sample's "
                             f"{tuple(sample.shape)}")
        x = self.pos_embed(sample)
        temb = self.time_text_embed(timestep, pooled_projections.to(x.dtype))
        context = self.context_embedder(encoder_hidden_states.to(x.dtype))
        x = x + self.pos_embed_input(controlnet_cond.to(x.dtype))
        outs = []
        for block, out in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            x, context = block(x, context, temb, encoder_attention_mask)
            outs.append(out(x) * conditioning_scale)
        return outs
