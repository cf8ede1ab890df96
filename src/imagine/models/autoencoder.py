"""The KL autoencoder of latent diffusion (Rombach et al. 2022, section 3; Kingma & Welling 2014).

State-dict keys are diffusers' AutoencoderKL's, so SD's VAEs load unchanged. The latent scaling factor
(SD 1.x: 0.18215) lives in the config, never inline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from imagine.nn.attention import SpatialSelfAttention
from imagine.nn.config import config_from_dict
from imagine.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # diffusers' names for the only block types SD's VAE uses; kept so configs round-trip
    down_block_types: tuple[Literal["DownEncoderBlock2D"], ...] | None = None
    up_block_types: tuple[Literal["UpDecoderBlock2D"], ...] | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            value = getattr(self, name)
            if value is not None and (len(value) != n or set(value) != {want}):
                raise ValueError(f"{name} must be {n} x {want!r}, got {value!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block width {c} is not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict) -> VAEConfig:
        return config_from_dict(cls, data, "VAE")


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), log variance clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: (B,)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class _MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(c, 1, groups, 1e-6)]) if add_attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class _EncoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if j == 0 else c_out, c_out, None, groups, 1e-6) for j in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(c_out, padding=0)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class _DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if j == 0 else c_out, c_out, None, groups, 1e-6) for j in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [_EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < n - 1) for i in range(n)])
        self.mid_block = _MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev, g, n = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = _MidBlock(rev[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [_DecoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, i < n - 1) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """vae.encode(x (B, 3, H, W) in [-1, 1]) -> DiagonalGaussian over (B, latent, H/f, W/f);
    vae.decode(z) -> image (B, 3, H, W). Diffusion runs on scaling_factor * (z - shift_factor)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = cfg = config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if cfg.use_quant_conv else None
        z = cfg.latent_channels
        self.post_quant_conv = nn.Conv2d(z, z, 1) if cfg.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        f = self.config.downscale
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the VAE's factor {f}")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> the scaled latent diffusion models see."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.config.scaling_factor + self.config.shift_factor

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior
