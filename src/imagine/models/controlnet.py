"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of a UNet's encoder that reads a spatial condition.

The condition image (B, 3, H, W) in [0, 1] goes through a small strided convolution stack to the latent
resolution (the paper's "tiny network E"), whose last convolution starts at zero, and is added to the
copy's first features. Each skip of the copy and its mid block then pass through a 1x1 convolution that
also starts at zero, giving residuals that the locked UNet adds to its own skips and mid output
(diffusers' ``down_block_additional_residuals``), so a fresh ControlNet changes nothing.

Structure and state-dict keys are diffusers' ``ControlNetModel`` (conv_in, time_embedding, down_blocks,
mid_block, controlnet_cond_embedding.{conv_in, blocks, conv_out}, controlnet_down_blocks,
controlnet_mid_block), so diffusers' ControlNet folders load unchanged and ours load in diffusers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import nn

from imagine.models.unet import (
    DownBlock,
    DownBlockType,
    MidBlockCrossAttn,
    UNet2DConditionModel,
    UNetConfig,
    addition_embedding,
    embed_time,
)
from imagine.nn.config import config_from_dict
from imagine.nn.embeddings import TimestepEmbedding

_UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}


@dataclass(frozen=True)
class ControlNetConfig:
    """The encoder half of a UNetConfig plus the condition's own settings (diffusers' names)."""

    in_channels: int = 4
    conditioning_channels: int = 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[DownBlockType, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: Literal["UNetMidBlock2DCrossAttn"] | None = "UNetMidBlock2DCrossAttn"
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
    addition_embed_type: Literal["text_time", "text"] | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    addition_embed_type_num_heads: int = 64
    # one stride-2 convolution between consecutive entries: 2^(len - 1) must be the latent factor
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False  # shuffle-style ControlNets: residuals averaged over space

    def __post_init__(self):
        self.unet_config()  # the UNet checks (block types, widths, groups) hold for the copy too
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels needs at least one entry")

    def unet_config(self) -> UNetConfig:
        """The UNet config whose encoder this copies (up blocks mirrored; they are not built)."""
        shared = {f.name for f in fields(UNetConfig)} & {f.name for f in fields(self)}
        return UNetConfig(**{k: getattr(self, k) for k in shared},
                          up_block_types=tuple(_UP[k] for k in reversed(self.down_block_types)))

    @property
    def downscale(self) -> int:
        """Pixels per latent cell that the condition embedding assumes."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict) -> ControlNetConfig:
        return config_from_dict(cls, data, "ControlNet")

    @classmethod
    def from_unet(cls, unet: UNetConfig, latent_factor: int, conditioning_channels: int = 3) -> ControlNetConfig:
        """The config of a ControlNet for ``unet``, with a condition embedding that reduces pixels by the
        model's latent factor (SD's 8: diffusers' (16, 32, 96, 256); 4: (16, 32, 96); pixel models: (16,))."""
        if unet.efficient or not isinstance(unet.layers_per_block, int):
            raise ValueError("ControlNets copy diffusers' UNet layout; this UNet uses Efficient U-Net options "
                             "(per-level layers, scaled skips or downsample-first), which they do not cover")
        steps = latent_factor.bit_length() - 1
        if latent_factor < 1 or 2**steps != latent_factor:
            raise ValueError(f"the latent factor must be a power of two, got {latent_factor}")
        widths = (16, 32, 96, 256, 256, 256)[: steps + 1]
        shared = {f.name for f in fields(UNetConfig)} & {f.name for f in fields(cls)}
        return cls(**{k: getattr(unet, k) for k in shared}, conditioning_channels=conditioning_channels,
                   conditioning_embedding_out_channels=widths)


class ControlNetConditioningEmbedding(nn.Module):
    """Condition pixels (B, C, H, W) -> (B, c0, H / f, W / f): conv, then (conv, stride-2 conv) pairs, SiLU
    between, and a zero-initialised output convolution."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in itertools.pairwise(widths):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.conv_in(condition))
        for block in self.blocks:
            x = nn.functional.silu(block(x))
        return self.conv_out(x)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNetModel(nn.Module):
    """controlnet(sample, timestep, encoder_hidden_states, controlnet_cond (B, C, H, W) in [0, 1], ...)
    -> (down residuals, one per UNet skip, mid residual), each already x conditioning_scale."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = cfg = config
        ucfg = cfg.unet_config()
        c0 = cfg.block_out_channels[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, ucfg.time_embed_dim)
        self.class_embedding = nn.Embedding(cfg.num_class_embeds, ucfg.time_embed_dim) if cfg.num_class_embeds else None
        self.add_embedding = addition_embedding(cfg, ucfg.time_embed_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(c0, cfg.conditioning_channels,
                                                                         cfg.conditioning_embedding_out_channels)
        n = len(cfg.block_out_channels)
        self.down_blocks = nn.ModuleList()
        zero_convs = [nn.Conv2d(c0, c0, 1)]
        c_out = c0
        for i, kind in enumerate(cfg.down_block_types):
            c_in, c_out = c_out, cfg.block_out_channels[i]
            self.down_blocks.append(DownBlock(kind, c_in, c_out, ucfg, i, add_downsample=i < n - 1))
            zero_convs += [nn.Conv2d(c_out, c_out, 1) for _ in range(cfg.layers_per_block + (i < n - 1))]
        self.controlnet_down_blocks = nn.ModuleList([_zero(c) for c in zero_convs])
        c_mid = cfg.block_out_channels[-1]
        self.mid_block = MidBlockCrossAttn(c_mid, ucfg) if cfg.mid_block_type else None
        self.controlnet_mid_block = _zero(nn.Conv2d(c_mid, c_mid, 1))

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, latent_factor: int, conditioning_channels: int = 3
                  ) -> ControlNetModel:
        """A fresh ControlNet for ``unet``: its encoder and embeddings copied, zero convolutions at zero."""
        net = cls(ControlNetConfig.from_unet(unet.config, latent_factor, conditioning_channels))
        own = net.state_dict()
        copied = {k: v for k, v in unet.state_dict().items() if k in own}
        net.load_state_dict(copied, strict=False)
        return net.to(next(unet.parameters()).dtype)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None,
                controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0,
                encoder_attention_mask: torch.Tensor | None = None, class_labels=None, text_embeds=None,
                time_ids=None, guess_mode: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        cfg = self.config
        f = cfg.downscale
        if controlnet_cond.shape[-2:] != (sample.shape[-2] * f, sample.shape[-1] * f):
            raise ValueError(f"the condition is {tuple(controlnet_cond.shape[-2:])} but this ControlNet needs "
                             f"{f}x the sample's {tuple(sample.shape[-2:])}")
        emb = embed_time(self, cfg, sample, timestep, class_labels, text_embeds, time_ids,
                         context=encoder_hidden_states)
        context, mask = encoder_hidden_states, encoder_attention_mask
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.to(sample.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context, mask)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context, mask)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        if guess_mode and not cfg.global_pool_conditions:  # diffusers: 0.1 at the first skip to 1 at the mid
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down = [d * s for d, s in zip(down, scales, strict=False)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if cfg.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid
