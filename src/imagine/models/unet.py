"""The Stable Diffusion UNet (Rombach et al. 2022), one config from a 1M-parameter pixel model to SD 1.5.

State-dict keys are those of diffusers' UNet2DConditionModel for the same configuration, so real SD 1.x
and 2.x UNet weights load unchanged (STYLE rule 11). Config field names are diffusers' too, including
its legacy meaning of ``attention_head_dim``: for cross-attention blocks it is the number of heads
(unless ``num_attention_heads`` is given); for self-attention blocks it is the width of a head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from imagine.nn.attention import SpatialSelfAttention, swapped_streams
from imagine.nn.config import config_from_dict
from imagine.nn.embeddings import TextTimeEmbedding, TimestepEmbedding, timestep_embedding
from imagine.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from imagine.nn.transformer import Transformer2D

DownBlockType = Literal["CrossAttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
UpBlockType = Literal["CrossAttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"]
MidBlockType = Literal["UNetMidBlock2DCrossAttn"]


def _per_block(value: int | tuple[int, ...], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} blocks")
    return tuple(value)


@dataclass(frozen=True)
class UNetConfig:
    """Everything that shapes the network (nanoGPT-style: the constructor takes only this)."""

    sample_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[DownBlockType, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[UpBlockType, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    mid_block_type: MidBlockType | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    num_class_embeds: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    dropout: float = 0.0
    learned_variance: bool = False  # conv_out gives 2 x out_channels: the prediction, then the variance v
    # SDXL's micro-conditioning (Podell et al. 2023, section 2.2): the pooled text embedding and six size
    # numbers (original h, w; crop top, left; target h, w), each as addition_time_embed_dim sinusoidal
    # features, go through add_embedding and join the timestep embedding
    addition_embed_type: Literal["text_time", "text"] | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    # addition_embed_type "text" (diffusers' TextTimeEmbedding): the text states themselves, attention-pooled
    # into one sentence vector with this many heads, join the timestep embedding (no extra inputs)
    addition_embed_type_num_heads: int = 64
    # Latent Consistency Models (Luo et al. 2023): the guidance scale, embedded (nn.embeddings.guidance_embedding)
    # to this many features, joins the timestep features through time_embedding.cond_proj
    time_cond_proj_dim: int | None = None
    # Imagen's Efficient U-Net (Saharia et al. 2022, appendix B.1), options off by default (diffusers' UNet):
    # layers_per_block may differ per level (more resnets at low resolution, where they are cheap); every
    # skip connection is scaled by skip_scale (1/sqrt(2)) where the up path concatenates it; with
    # downsample_first each down block after the first downsamples at its start, before its resnets, not at
    # the end of the previous block (up blocks already upsample after their resnets)
    skip_scale: float = 1.0
    downsample_first: bool = False

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"{n} block_out_channels need {n} down and {n} up block types, got "
                             f"{len(self.down_block_types)} and {len(self.up_block_types)}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block width {c} is not divisible by norm_num_groups={self.norm_num_groups}")
        for kind in (*self.down_block_types, *self.up_block_types):
            if kind not in ("CrossAttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D", "CrossAttnUpBlock2D",
                            "UpBlock2D", "AttnUpBlock2D"):
                raise ValueError(f"block type {kind!r} unknown; choose CrossAttn/Attn/plain Down/UpBlock2D")
        for name in ("attention_head_dim", "transformer_layers_per_block", "layers_per_block"):
            _per_block(getattr(self, name), n, name)
        if any(k < 1 for k in _per_block(self.layers_per_block, n, "layers_per_block")):
            raise ValueError(f"layers_per_block must be >= 1 at every level, got {self.layers_per_block}")
        if not self.skip_scale > 0:
            raise ValueError(f"skip_scale must be positive, got {self.skip_scale}")
        if self.addition_embed_type not in (None, "text_time", "text"):
            raise ValueError(f"addition_embed_type {self.addition_embed_type!r} unknown; imagine implements "
                             "'text_time' (SDXL), 'text' (pooled text states) or none")
        if self.addition_embed_type == "text" and self.cross_attention_dim % self.addition_embed_type_num_heads:
            raise ValueError(f"addition_embed_type 'text' pools {self.cross_attention_dim}-wide text states with "
                             f"{self.addition_embed_type_num_heads} heads, which do not divide them: choose "
                             "addition_embed_type_num_heads dividing cross_attention_dim")
        needs = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if self.addition_embed_type == "text_time" and not all(needs):
            raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def layers(self, level: int) -> int:
        """Resnets of the down block at ``level`` (its up block has one more)."""
        return _per_block(self.layers_per_block, len(self.block_out_channels), "layers_per_block")[level]

    @property
    def efficient(self) -> bool:
        """Whether an Efficient U-Net option that diffusers' UNet2DConditionModel lacks is on (it does take
        per-level layers_per_block)."""
        return self.skip_scale != 1.0 or self.downsample_first

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        return config_from_dict(cls, data, "UNet")


class DownBlock(nn.Module):
    """Resnets, each optionally followed by cross-attention (CrossAttnDownBlock2D) or self-attention
    (AttnDownBlock2D), then an optional stride-2 downsampler. Returns the output and every skip."""

    def __init__(self, kind: DownBlockType, c_in: int, c_out: int, cfg: UNetConfig, i: int, add_downsample: bool):
        super().__init__()
        n = cfg.layers(i)
        t = cfg.time_embed_dim
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if j == 0 else c_out, c_out, t, g, eps, cfg.dropout) for j in range(n)])
        # Efficient U-Net: the downsampler (of the incoming width) opens the block instead of closing the last
        self.downsample_first = cfg.downsample_first
        self.kind = kind
        if kind == "CrossAttnDownBlock2D":
            self.attentions = nn.ModuleList([_cross_attention(c_out, cfg, i) for _ in range(n)])
        elif kind == "AttnDownBlock2D":
            self.attentions = nn.ModuleList([_self_attention(c_out, cfg, i) for _ in range(n)])
        self.downsamplers = nn.ModuleList([Downsample2D(c_in if cfg.downsample_first else c_out)]
                                          ) if add_downsample else None

    def forward(self, x, temb, context, mask, intrablock=None):
        """intrablock: a T2I-Adapter feature, added where diffusers adds it: after the last resnet (and its
        attention) of a block with attention, after the downsampler of one without; the skip carries it."""
        skips = []
        if self.downsample_first:
            if intrablock is not None:
                raise ValueError("T2I-Adapters are made for diffusers' UNet layout, not downsample_first")
            if self.downsamplers is not None:
                x = self.downsamplers[0](x)
                skips.append(x)
            for j, resnet in enumerate(self.resnets):
                x = _attend(self, j, resnet(x, temb), context, mask)
                skips.append(x)
            return x, skips
        last = len(self.resnets) - 1
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            x = _attend(self, j, x, context, mask)
            if j == last and intrablock is not None and self.kind != "DownBlock2D":
                x = x + intrablock
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        if intrablock is not None and self.kind == "DownBlock2D":
            x = x + intrablock
            skips[-1] = x
        return x, skips


class UpBlock(nn.Module):
    """Resnets over the concatenation of the running features and a skip, each optionally followed by
    attention, then an optional nearest-2x upsampler."""

    def __init__(self, kind: UpBlockType, prev: int, c_out: int, skip_in: int, cfg: UNetConfig, i: int,
                 add_upsample: bool):
        super().__init__()
        n = cfg.layers(len(cfg.block_out_channels) - 1 - i) + 1
        t, g, eps = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps
        self.skip_scale = cfg.skip_scale
        blocks = []
        for j in range(n):
            res_skip = skip_in if j == n - 1 else c_out
            res_in = prev if j == 0 else c_out
            blocks.append(ResnetBlock2D(res_in + res_skip, c_out, t, g, eps, cfg.dropout))
        self.resnets = nn.ModuleList(blocks)
        self.kind = kind
        # attention settings are indexed from the top of the UNet for up blocks
        rev = len(cfg.block_out_channels) - 1 - i
        if kind == "CrossAttnUpBlock2D":
            self.attentions = nn.ModuleList([_cross_attention(c_out, cfg, rev) for _ in range(n)])
        elif kind == "AttnUpBlock2D":
            self.attentions = nn.ModuleList([_self_attention(c_out, cfg, rev) for _ in range(n)])
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)]) if add_upsample else None

    def forward(self, x, skips, temb, context, mask, upsample_size=None):
        for j, resnet in enumerate(self.resnets):
            skip = skips.pop()
            x = resnet(torch.cat([x, skip if self.skip_scale == 1.0 else skip * self.skip_scale], dim=1), temb)
            x = _attend(self, j, x, context, mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlockCrossAttn(nn.Module):
    """resnet, then (attention, resnet) pairs: UNetMidBlock2DCrossAttn."""

    def __init__(self, c: int, cfg: UNetConfig):
        super().__init__()
        t, g, eps = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps
        last = len(cfg.block_out_channels) - 1
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, t, g, eps, cfg.dropout) for _ in range(2)])
        self.attentions = nn.ModuleList([_cross_attention(c, cfg, last)])

    def forward(self, x, temb, context, mask):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context, mask), temb)


def _cross_attention(c: int, cfg: UNetConfig, i: int) -> Transformer2D:
    n = len(cfg.block_out_channels)
    heads = _per_block(cfg.num_attention_heads or cfg.attention_head_dim, n, "num_attention_heads")[i]
    layers = _per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")[i]
    return Transformer2D(c, heads, cfg.cross_attention_dim, layers, cfg.norm_num_groups, cfg.use_linear_projection,
                         cfg.dropout)


def _self_attention(c: int, cfg: UNetConfig, i: int) -> SpatialSelfAttention:
    head_dim = _per_block(cfg.attention_head_dim, len(cfg.block_out_channels), "attention_head_dim")[i]
    return SpatialSelfAttention(c, heads=c // head_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps)


def _attend(block: nn.Module, j: int, x, context, mask):
    if block.kind.startswith("CrossAttn"):
        if context is None:
            raise ValueError("this UNet cross-attends to text: pass encoder_hidden_states (B, T, "
                             f"{block.attentions[j].transformer_blocks[0].attn2.to_k.in_features})")
        return block.attentions[j](x, context, mask)
    if block.kind.startswith("Attn"):
        return block.attentions[j](x)
    return x


class UNet2DConditionModel(nn.Module):
    """unet(sample (B, C, H, W), timestep (B,) or scalar, encoder_hidden_states (B, T, D) = None,
    class_labels (B,) = None, encoder_attention_mask (B, T) = None, text_embeds (B, P) = None,
    time_ids (B, 6) = None) -> prediction (B, out, H, W). text_embeds and time_ids: SDXL only."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        c0 = cfg.block_out_channels[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, cfg.time_cond_proj_dim)
        self.class_embedding = nn.Embedding(cfg.num_class_embeds, cfg.time_embed_dim) if cfg.num_class_embeds else None
        self.add_embedding = addition_embedding(cfg, cfg.time_embed_dim)
        n = len(cfg.block_out_channels)
        self.down_blocks = nn.ModuleList()
        c_out = c0
        for i, kind in enumerate(cfg.down_block_types):
            c_in, c_out = c_out, cfg.block_out_channels[i]
            down = i > 0 if cfg.downsample_first else i < n - 1
            self.down_blocks.append(DownBlock(kind, c_in, c_out, cfg, i, add_downsample=down))
        self.mid_block = MidBlockCrossAttn(cfg.block_out_channels[-1], cfg) if cfg.mid_block_type else None
        rev = list(reversed(cfg.block_out_channels))
        self.up_blocks = nn.ModuleList()
        c_out = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, c_out = c_out, rev[i]
            skip_in = rev[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(kind, prev, c_out, skip_in, cfg, i, add_upsample=i < n - 1))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(c0, cfg.out_channels * (2 if cfg.learned_variance else 1), 3, padding=1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def embed(self, sample: torch.Tensor, timestep: torch.Tensor | float, class_labels=None, text_embeds=None,
              time_ids=None, timestep_cond=None, context=None) -> torch.Tensor:
        """The timestep embedding (B, time_embed_dim), with the class, pooled-text or SDXL additions: shared
        with ControlNet."""
        return embed_time(self, self.config, sample, timestep, class_labels, text_embeds, time_ids, timestep_cond,
                          context)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states=None,
                class_labels: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                timestep_cond: torch.Tensor | None = None,
                down_block_additional_residuals: list[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None,
                down_intrablock_additional_residuals: list[torch.Tensor] | None = None,
                attention_streams: Mapping[nn.Module, Sequence] | None = None,
                concat_latents: torch.Tensor | None = None) -> torch.Tensor:
        """concat_latents: channels joined to the sample before the first convolution (an inpainting UNet's mask
        and masked image latents, diffusers' order), the same on both branches of guidance.
        The residual inputs are diffusers' (STYLE rule 13: every spatial conditioner speaks through them):
        a ControlNet's one per skip plus the mid block's, added to the skips and to the mid output; a
        T2I-Adapter's one per down block (and one for the mid block where its shape fits), added inside.
        attention_streams: extra key/value streams for cross-attention layers during this call (an
        IP-Adapter's decoupled cross-attention, nn/attention.py), {layer: [(to_k, to_v, tokens, scale)]}."""
        if concat_latents is not None:
            sample = torch.cat([sample, concat_latents.to(sample.dtype)], dim=1)
        with swapped_streams(attention_streams):
            return self._forward(sample, timestep, encoder_hidden_states, class_labels, encoder_attention_mask,
                                 text_embeds, time_ids, timestep_cond, down_block_additional_residuals,
                                 mid_block_additional_residual, down_intrablock_additional_residuals)

    def _forward(self, sample, timestep, encoder_hidden_states, class_labels, encoder_attention_mask, text_embeds,
                 time_ids, timestep_cond, down_block_additional_residuals, mid_block_additional_residual,
                 down_intrablock_additional_residuals) -> torch.Tensor:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"expected a (B, {cfg.in_channels}, H, W) sample, got {tuple(sample.shape)}")
        if (timestep_cond is None) != (cfg.time_cond_proj_dim is None):
            raise ValueError("this UNet embeds the guidance scale (an LCM): pass timestep_cond (B, "
                             f"{cfg.time_cond_proj_dim})" if timestep_cond is None else
                             "timestep_cond given to a UNet without time_cond_proj_dim")
        emb = self.embed(sample, timestep, class_labels, text_embeds, time_ids, timestep_cond, encoder_hidden_states)
        context, mask = encoder_hidden_states, encoder_attention_mask
        intrablock = list(down_intrablock_additional_residuals or ())
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context, mask, intrablock.pop(0) if intrablock else None)
            skips.extend(block_skips)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"{len(down_block_additional_residuals)} down-block residuals for this UNet's "
                                 f"{len(skips)} skips: the ControlNet was made for another architecture")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context, mask)
            if intrablock and x.shape == intrablock[0].shape:
                x = x + intrablock.pop(0)
        if mid_block_additional_residual is not None:  # diffusers adds it with or without a mid block
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            n_res = len(block.resnets)
            block_skips, skips = skips[-n_res:], skips[:-n_res]
            # sizes that do not halve evenly: upsample to the next skip's size, not blindly 2x
            size = tuple(skips[-1].shape[-2:]) if (block.upsamplers is not None and skips) else None
            x = block(x, block_skips, emb, context, mask, size)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


def addition_embedding(cfg, time_embed_dim: int) -> nn.Module | None:
    """The module behind ``addition_embed_type`` (a UNet's or a ControlNet's ``add_embedding``), or None."""
    if cfg.addition_embed_type == "text_time":
        return TimestepEmbedding(cfg.projection_class_embeddings_input_dim, time_embed_dim)
    if cfg.addition_embed_type == "text":
        return TextTimeEmbedding(cfg.cross_attention_dim, time_embed_dim, cfg.addition_embed_type_num_heads)
    return None


def embed_time(net: nn.Module, cfg, sample: torch.Tensor, timestep, class_labels=None, text_embeds=None,
               time_ids=None, timestep_cond=None, context=None) -> torch.Tensor:
    """(B, time_embed_dim): the sinusoidal timestep through ``net.time_embedding``, plus the class embedding,
    the pooled text states (``context``) or SDXL's micro-conditioning where ``net`` has them (a UNet, or a
    ControlNet copied from one)."""
    b = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device)
    t = t.expand(b) if t.ndim == 0 else t
    emb = net.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                                freq_shift=cfg.freq_shift).to(sample.dtype), timestep_cond)
    if net.class_embedding is not None:
        if class_labels is None:
            raise ValueError("this UNet is class-conditional: pass class_labels (B,)")
        emb = emb + net.class_embedding(class_labels).to(emb.dtype)
    if cfg.addition_embed_type == "text":
        if context is None:
            raise ValueError("this UNet pools the text states into its timestep embedding: pass "
                             "encoder_hidden_states")
        return emb + net.add_embedding(context.to(emb.dtype))
    if net.add_embedding is not None:
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet is SDXL-conditioned: pass text_embeds (B, pooled dim) and time_ids "
                             "(B, 6) = original h, w, crop top, left, target h, w")
        # (B, 6) -> (B, 6 * addition_time_embed_dim), then beside the pooled text: (B, projection dim)
        times = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                   flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        extra = torch.cat([text_embeds.float(), times.reshape(b, -1)], dim=-1)
        emb = emb + net.add_embedding(extra.to(emb.dtype))
    return emb
