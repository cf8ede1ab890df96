"""Flux.1's transformer (Black Forest Labs 2024): MMDiT-style double-stream blocks (image and text each with
their own weights, attending jointly), then single-stream blocks over the concatenated tokens (attention and an
MLP in parallel, one output projection), rotary positions over (axis, row, column) ids, and a guidance-scale
embedding for the guidance-distilled models (Flux.1-dev).

State-dict keys are diffusers' ``FluxTransformer2DModel`` (x_embedder, context_embedder, time_text_embed,
transformer_blocks, single_transformer_blocks, norm_out, proj_out), so Flux checkpoints load unchanged. The
network takes packed tokens, as diffusers' does: ``pack_latents`` turns (B, C, H, W) latents into (B, H/2 W/2,
4C) tokens of 2 x 2 patches, ``latent_ids`` makes their position ids, ``unpack_latents`` undoes the packing.
Timesteps are then given in [0, 1] (x 1000 inside), diffusers' convention for Flux.

Given latents (B, C, H, W) instead, it is a denoiser like imagine's others: it packs them, makes the ids, reads
the timestep on the 0-1000 scale every other network here takes, and returns latents; the pipeline, the
trainers and the samplers call it so, with no Flux branch of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imagine.nn.attention import JointAttention
from imagine.nn.config import config_from_dict
from imagine.nn.embeddings import TimestepEmbedding, timestep_embedding
from imagine.nn.patches import AdaLayerNormContinuous, AdaLayerNormZero, GeluFeedForward, gelu_tanh, modulate, zero_
from imagine.nn.rotary import apply_rope, rope


@dataclass(frozen=True)
class FluxConfig:
    patch_size: int = 1  # the packing does the patching (2 x 2)
    in_channels: int = 64  # packed: 16 latent channels x 2 x 2
    out_channels: int | None = None
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5's width
    pooled_projection_dim: int = 768  # CLIP's pooled width
    guidance_embeds: bool = False  # Flux.1-dev embeds the guidance scale
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # rotary features per position axis; they sum to the head dim

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to the head dim {self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, data: dict) -> FluxConfig:
        return config_from_dict(cls, data, "Flux config")


class TimestepGuidanceTextEmbedding(nn.Module):
    """The conditioning vector: MLPs of the timestep, of the guidance scale (when embedded) and of the pooled
    text, summed (diffusers' CombinedTimestep[Guidance]TextProjEmbeddings)."""

    FREQUENCIES = 256

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(self.FREQUENCIES, dim)
        self.guidance_embedder = TimestepEmbedding(self.FREQUENCIES, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def _embed(self, mlp: nn.Module, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return mlp(timestep_embedding(values, self.FREQUENCIES, flip_sin_to_cos=True, freq_shift=0).to(dtype))

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        emb = self._embed(self.timestep_embedder, timestep, pooled.dtype)
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this Flux embeds the guidance scale (a guidance-distilled model): pass guidance")
            emb = emb + self._embed(self.guidance_embedder, guidance, pooled.dtype)
        return emb + self.text_embedder(pooled)


class RotaryJointAttention(JointAttention):
    """Joint attention with RMS-normed queries and keys and rotary positions; text tokens come first."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, rotary: tuple[torch.Tensor, torch.Tensor],
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """keep: (B, 1, 1, keys) True where a key counts (None: all; Flux attends to its T5 padding)."""
        b, n = x.shape[0], x.shape[1]

        def heads(t: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:  # (B, L, inner) -> (B, heads, L, d)
            t = t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)
            return norm(t.float()).to(t.dtype) if norm is not None else t  # RMS in fp32 (fused under autocast)

        q, k, v = heads(self.to_q(x), self.norm_q), heads(self.to_k(x), self.norm_k), heads(self.to_v(x), None)
        m = 0
        if context is not None:
            m = context.shape[1]
            q = torch.cat([heads(self.add_q_proj(context), self.norm_added_q), q], dim=2)
            k = torch.cat([heads(self.add_k_proj(context), self.norm_added_k), k], dim=2)
            v = torch.cat([heads(self.add_v_proj(context), None), v], dim=2)
        cos, sin = rotary
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, m + n, -1).to(q.dtype)
        if context is None:
            return out, None
        text, image = out[:, :m], out[:, m:]
        return self.to_out[1](self.to_out[0](image)), self.to_add_out(text)


class SingleAttention(RotaryJointAttention):
    """A single-stream block's attention: Q, K, V of the concatenated tokens, no output projection of its own."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__(dim, heads, dim_head, context_pre_only=True, qk_norm="rms_norm")
        del self.add_q_proj, self.add_k_proj, self.add_v_proj, self.to_out, self.norm_added_q, self.norm_added_k


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = RotaryJointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, qk_norm="rms_norm")
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = GeluFeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = GeluFeedForward(dim)

    def forward(self, x, context, temb, rotary, keep=None):
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)
        c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, emb=temb)
        attn, context_attn = self.attn(h, c, rotary, keep)
        x = x + gate_msa[:, None] * attn
        x = x + gate_mlp[:, None] * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        context = context + c_gate_msa[:, None] * context_attn
        context = context + c_gate_mlp[:, None] * self.ff_context(modulate(self.norm2_context(context), c_shift_mlp,
                                                                            c_scale_mlp))
        return x, context


class AdaLayerNormZeroSingle(nn.Module):
    """Three modulation vectors (shift, scale, gate) for a single-stream block."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.linear(F.silu(emb)).chunk(3, dim=1)
        return modulate(self.norm(x), shift, scale), gate


class SingleStreamBlock(nn.Module):
    """x + gate proj_out([attention(h), gelu(proj_mlp(h))]), h the modulated norm of the joint tokens."""

    def __init__(self, cfg: FluxConfig, mlp_ratio: float = 4.0):
        super().__init__()
        dim = cfg.inner_dim
        hidden = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, hidden)
        self.attn = SingleAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.proj_out = nn.Linear(dim + hidden, dim)

    def forward(self, x, temb, rotary, keep=None):
        h, gate = self.norm(x, temb)
        attn, _ = self.attn(h, None, rotary, keep)
        return x + gate[:, None] * self.proj_out(torch.cat([attn, gelu_tanh(self.proj_mlp(h))], dim=2))


class FluxTransformer2DModel(nn.Module):
    """flux(tokens (B, N, in_channels), timestep (B,) in [0, 1], encoder_hidden_states (B, M, joint_attention_dim),
    pooled_projections (B, pooled_projection_dim), img_ids (N, 3), txt_ids (M, 3), guidance (B,)) -> (B, N, out);
    or flux(latents (B, in_channels / 4, H, W), timestep (B,) in [0, 1000], ...) -> latents (see the module).
    guidance is the scale itself (Flux.1-dev: 3.5); encoder_attention_mask (B, M), True where a text token
    counts, is optional (None: every text token is a key, as Flux was trained)."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.inner_dim
        self.time_text_embed = TimestepGuidanceTextEmbedding(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)])
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.output_channels)
        for block in self.transformer_blocks:  # adaLN-Zero: every block starts as the identity
            zero_(block.norm1.linear)
            zero_(block.norm1_context.linear)
        for block in self.single_transformer_blocks:
            zero_(block.norm.linear)
        zero_(self.norm_out.linear)
        zero_(self.proj_out)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, img_ids: torch.Tensor | None = None,
                txt_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, **unused) -> torch.Tensor:
        cfg = self.config
        if hidden_states.ndim == 4:  # latents: a denoiser like the others
            b, c, h, w = hidden_states.shape
            if c * 4 != cfg.in_channels or h % 2 or w % 2:
                raise ValueError(f"this Flux takes latents of {cfg.in_channels // 4} channels and an even height "
                                 f"and width (2 x 2 patches), got {tuple(hidden_states.shape)}")
            ids = latent_ids(h, w).to(hidden_states.device)
            text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=hidden_states.device)
            t = torch.as_tensor(timestep, device=hidden_states.device) / 1000
            out = self.forward(pack_latents(hidden_states), t, encoder_hidden_states, pooled_projections, ids,
                               text_ids, guidance, encoder_attention_mask)
            return unpack_latents(out, h, w)
        if img_ids is None or txt_ids is None:
            raise ValueError("packed Flux tokens need their img_ids and txt_ids (models.flux.latent_ids)")
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(f"expected packed tokens (B, N, {cfg.in_channels}) (models.flux.pack_latents), got "
                             f"{tuple(hidden_states.shape)}")
        b = hidden_states.shape[0]
        x = self.x_embedder(hidden_states)
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b).to(x.dtype) * 1000
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(b).to(x.dtype) * 1000
        temb = self.time_text_embed(timestep, guidance, pooled_projections.to(x.dtype))
        context = self.context_embedder(encoder_hidden_states.to(x.dtype))
        rotary = rope(torch.cat([txt_ids, img_ids], dim=0), cfg.axes_dims_rope)
        m = context.shape[1]
        keep = None
        if encoder_attention_mask is not None:  # text keys only where they count; every image token is a key
            keep = torch.cat([encoder_attention_mask.bool().to(x.device),
                              torch.ones(b, x.shape[1], dtype=torch.bool, device=x.device)], dim=1)[:, None, None]
        for block in self.transformer_blocks:
            x, context = block(x, context, temb, rotary, keep)
        joint = torch.cat([context, x], dim=1)
        for block in self.single_transformer_blocks:
            joint = block(joint, temb, rotary, keep)
        x = joint[:, m:]
        return self.proj_out(self.norm_out(x, temb))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 W/2, 4C): 2 x 2 patches as tokens, rows first (diffusers' FluxPipeline)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 W/2, 4C) -> (B, C, H, W), height and width in latent positions."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_ids(height: int, width: int) -> torch.Tensor:
    """(H/2 W/2, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """A Flux head's rotary features per position axis (index, row, column), even and summing to the head:
    an eighth for the index axis, the rest split between rows and columns (Flux.1's 128: 16, 56, 56)."""
    if head_dim % 8:
        raise ValueError(f"a Flux head's width must be a multiple of 8 (rotary pairs on three axes), got {head_dim}")
    index = 2 * max(1, head_dim // 16)
    rows = 2 * ((head_dim - index) // 4)
    return index, rows, head_dim - index - rows
