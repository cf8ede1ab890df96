"""T2I-Adapter (Mou et al. 2023): a small network that turns a condition image into one feature map per
UNet encoder scale, added to the encoder's own features (diffusers' ``down_intrablock_additional_residuals``).

Per scale: an optional 2x average-pool, a 1x1 convolution where the width changes, and residual blocks
(3x3 conv, ReLU, 1x1 conv, plus the input). The condition first loses resolution by pixel-unshuffle.
``full_adapter`` gives features at factors d, 2d, 4d, ... (SD 1.x/2.x: a cross-attention block at every
level); ``full_adapter_xl`` gives d, d, 2d, 2d (SDXL, and every UNet whose first level is a plain block
whose feature is added after its downsampler). Structure and state-dict keys are diffusers' ``T2IAdapter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from imagine.models.unet import UNetConfig
from imagine.nn.config import config_from_dict

AdapterType = Literal["full_adapter", "full_adapter_xl"]


@dataclass(frozen=True)
class T2IAdapterConfig:
    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: AdapterType = "full_adapter"

    def __post_init__(self):
        if self.adapter_type not in ("full_adapter", "full_adapter_xl"):
            raise ValueError(f"adapter type {self.adapter_type!r} unknown; imagine implements full_adapter and "
                             "full_adapter_xl")
        if self.adapter_type == "full_adapter_xl" and len(self.channels) != 4:
            raise ValueError("full_adapter_xl has exactly four levels")

    @property
    def total_downscale_factor(self) -> int:
        """Pixels per cell of the coarsest feature."""
        return self.downscale_factor * (2 if self.adapter_type == "full_adapter_xl" else 2 ** (len(self.channels) - 1))

    @classmethod
    def from_dict(cls, data: dict) -> T2IAdapterConfig:
        return config_from_dict(cls, data, "T2IAdapter")

    @classmethod
    def for_unet(cls, unet: UNetConfig, latent_factor: int, num_res_blocks: int = 2) -> T2IAdapterConfig:
        """The adapter whose features land where ``unet`` adds them. A UNet whose first level is a plain
        block with a downsampler (SDXL, imagine's shipped model) takes its first feature after that
        downsampler: the xl layout, with the mid block fed by the fourth feature."""
        if unet.efficient:
            raise ValueError("T2I-Adapters are made for diffusers' UNet layout; this UNet uses Efficient U-Net "
                             "options (scaled skips or downsample-first)")
        c = unet.block_out_channels
        if unet.down_block_types[0] == "DownBlock2D" and len(c) == 3:
            return cls(channels=(c[0], c[1], c[2], c[2]), num_res_blocks=num_res_blocks,
                       downscale_factor=latent_factor * 2, adapter_type="full_adapter_xl")
        if all(t.startswith("CrossAttn") for t in unet.down_block_types[:-1]):
            return cls(channels=tuple(c), num_res_blocks=num_res_blocks, downscale_factor=latent_factor)
        raise ValueError(f"no T2I-Adapter layout fits a UNet with down blocks {unet.down_block_types}")


class AdapterResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.block2(self.act(self.block1(x)))


class AdapterBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, down: bool = False):
        super().__init__()
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.resnets = nn.Sequential(*[AdapterResnetBlock(c_out) for _ in range(num_res_blocks)])

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class _Body(nn.Module):
    """diffusers' FullAdapter / FullAdapterXL (held as ``adapter`` so the keys read adapter.body...)."""

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        c, n = cfg.channels, cfg.num_res_blocks
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.downscale_factor**2, c[0], 3, padding=1)
        if cfg.adapter_type == "full_adapter":
            blocks = [AdapterBlock(c[0], c[0], n)] + [AdapterBlock(c[i - 1], c[i], n, down=True)
                                                      for i in range(1, len(c))]
        else:  # levels at d, d, 2d, 2d
            blocks = [AdapterBlock(c[0], c[0], n), AdapterBlock(c[0], c[1], n), AdapterBlock(c[1], c[2], n, down=True),
                      AdapterBlock(c[2], c[3], n)]
        self.body = nn.ModuleList(blocks)

    def forward(self, x):
        x = self.conv_in(self.unshuffle(x))
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    """adapter(condition (B, C, H, W) in [0, 1]) -> one feature map per level, for the UNet's
    ``down_intrablock_additional_residuals``."""

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        self.config = config
        self.adapter = _Body(config)

    @property
    def total_downscale_factor(self) -> int:
        return self.config.total_downscale_factor

    def forward(self, condition: torch.Tensor) -> list[torch.Tensor]:
        f = self.total_downscale_factor
        if condition.shape[-1] % f or condition.shape[-2] % f:
            raise ValueError(f"the condition is {tuple(condition.shape[-2:])}: this adapter needs sides that are "
                             f"multiples of {f}")
        return self.adapter(condition)
