"""Latents as tokens for the diffusion transformers (Peebles & Xie 2023): patch embedding with fixed 2-D
sine-cosine positions, the unpatchify back to a latent, and the adaLN modulation of their blocks. Module and
parameter names follow diffusers' PatchEmbed, AdaLayerNormZero and CombinedTimestepLabelEmbeddings."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from imagine.nn.embeddings import TimestepEmbedding, timestep_embedding


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) features [sin, cos] at frequencies 10000^(-i / (dim/2)) (MAE's), float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0))
    out = torch.outer(positions.reshape(-1).double(), omega)
    return torch.cat([out.sin(), out.cos()], dim=1)


@functools.lru_cache(maxsize=16)
def sincos_2d(dim: int, height: int, width: int, base_size: int, interpolation_scale: float = 1.0) -> torch.Tensor:
    """(height * width, dim) fixed positions of a height x width token grid, rows first: half the features
    encode the column, half the row, each scaled so that a grid of base_size spans the same range whatever
    its size (PixArt's and SD3's resolution-aware positions). Always computed on the CPU: the cache must never
    keep a tensor made under a meta-device context (a model built without memory before loading weights)."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    rows = torch.arange(height, dtype=torch.float32, device="cpu") / (height / base_size) / interpolation_scale
    cols = torch.arange(width, dtype=torch.float32, device="cpu") / (width / base_size) / interpolation_scale
    grid_w, grid_h = torch.meshgrid(cols, rows, indexing="xy")  # (height, width) each
    return torch.cat([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], dim=1).float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, dim): a p x p stride-p convolution, plus the fixed 2-D positions of the
    grid, scaled to the training grid's (sincos_2d, cached; never in a checkpoint). With ``pos_embed_max_size``
    (SD3) the positions of a max x max grid are a buffer (in checkpoints, as diffusers keeps them) and an
    image's grid takes their centre crop."""

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, dim: int,
                 interpolation_scale: float = 1.0, pos_embed_max_size: int | None = None, positions: bool = True):
        super().__init__()
        self.patch_size, self.interpolation_scale, self.positions = patch_size, interpolation_scale, positions
        self.base_size = sample_size // patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        if pos_embed_max_size is not None:
            n = pos_embed_max_size * pos_embed_max_size
            if torch.empty(0).device.type == "meta":  # built to be loaded: the checkpoint holds the positions
                grid = torch.empty(n, dim)
            else:  # not through the cache: SD3.5's 384 x 384 grid is 900 MB, made once per model
                grid = sincos_2d.__wrapped__(dim, pos_embed_max_size, pos_embed_max_size, self.base_size,
                                             interpolation_scale)
            self.register_buffer("pos_embed", grid[None].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        if not self.positions:  # patches alone (diffusers' pos_embed_type None: a ControlNet's input embedding)
            return tokens
        if self.pos_embed_max_size is not None:
            m = self.pos_embed_max_size
            if h > m or w > m:
                raise ValueError(f"a {h} x {w} grid of patches is larger than this network's positions ({m} x {m})")
            top, left = (m - h) // 2, (m - w) // 2
            pos = self.pos_embed.reshape(m, m, -1)[top: top + h, left: left + w].reshape(h * w, -1)
        else:
            pos = sincos_2d(tokens.shape[-1], h, w, self.base_size, self.interpolation_scale)
        return (tokens + pos[None].to(tokens.device)).to(tokens.dtype)


def patch_grid(sample: torch.Tensor, timestep: torch.Tensor | float, in_channels: int, patch_size: int
               ) -> tuple[torch.Tensor, int, int]:
    """A transformer's input checked: a (B, in_channels, H, W) sample whose sides are multiples of the patch size.
    Returns (the timestep as (B,), the grid's h and w in patches)."""
    if sample.ndim != 4 or sample.shape[1] != in_channels:
        raise ValueError(f"expected a (B, {in_channels}, H, W) sample, got {tuple(sample.shape)}")
    if sample.shape[-2] % patch_size or sample.shape[-1] % patch_size:
        raise ValueError(f"the sample's sides {tuple(sample.shape[-2:])} are not multiples of the patch size "
                         f"{patch_size}")
    timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
    return timestep, sample.shape[-2] // patch_size, sample.shape[-1] // patch_size


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch_size: int, channels: int) -> torch.Tensor:
    """(B, h * w, p * p * C) -> (B, C, h * p, w * p), the inverse of the patch embedding's layout."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height, width, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, height * patch_size, width * patch_size)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift, shift and scale (B, D) per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class LabelEmbedding(nn.Module):
    """Class labels -> vectors, with one extra row for the dropped label of classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class TimestepLabelEmbedding(nn.Module):
    """DiT's conditioning vector: the timestep's 256 sinusoidal features through an MLP, plus the class's
    embedding (diffusers' CombinedTimestepLabelEmbeddings)."""

    FREQUENCIES = 256

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(self.FREQUENCIES, dim)
        self.class_embedder = LabelEmbedding(num_classes, dim)

    def forward(self, timestep: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        features = timestep_embedding(timestep, self.FREQUENCIES, flip_sin_to_cos=True, freq_shift=1)
        return self.timestep_embedder(features.to(dtype)) + self.class_embedder(labels)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero (Peebles & Xie 2023, section 3.2): from the conditioning vector, six per-sample vectors:
    shift, scale and gate of the attention and of the MLP. The block starts as the identity when ``linear``
    is zero-initialized (the gates are zero). With ``num_classes`` (DiT) it embeds the timestep and class
    itself; without (MMDiT) it is given the conditioning vector."""

    def __init__(self, dim: int, num_classes: int | None = None):
        super().__init__()
        self.emb = TimestepLabelEmbedding(num_classes, dim) if num_classes is not None else None
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                emb: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(modulated x, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
        if emb is None:
            emb = self.emb(timestep, labels, x.dtype)
        emb = self.linear(F.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        return modulate(self.norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm modulated by a conditioning vector: x (1 + scale) + shift, (scale, shift) = linear(silu(c))
    (diffusers' AdaLayerNormContinuous: note the order, scale first)."""

    def __init__(self, dim: int, conditioning_dim: int, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(conditioning_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(conditioning).to(x.dtype)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


class GeluFeedForward(nn.Module):
    """Linear, tanh-approximated GELU, Linear (diffusers' FeedForward with "gelu-approximate"; names ff.net.0.proj
    and ff.net.2)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, dim_out: int | None = None):
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim_out or dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[1](gelu_tanh(self.net[0].proj(x))))


class _Proj(nn.Module):  # diffusers' GELU module: its projection is named proj
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def zero_(module: nn.Module) -> nn.Module:
    """Zero a module's weights and biases (adaLN-Zero's init; the block starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def xavier_projections_(network: nn.Module, patch_embed: PatchEmbed) -> None:
    """DiT's base initialization of a transformer: every Linear and the patch embedding Xavier-uniform, biases zero
    (each network then zeroes its modulations and output, adaLN-Zero)."""
    for module in network.modules():
        if isinstance(module, nn.Linear):
            xavier_(module)
    xavier_(patch_embed.proj)


def xavier_(module: nn.Linear | nn.Conv2d) -> None:
    """DiT's initialization of projections: Xavier-uniform over the flattened weight, zero bias."""
    w = module.weight.data
    bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))
    nn.init.uniform_(w, -bound, bound)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
