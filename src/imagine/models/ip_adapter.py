"""IP-Adapter (Ye et al. 2023): prompting with an image through decoupled cross-attention.

A frozen image encoder gives an embedding; ``image_proj`` turns it into ``num_tokens`` context tokens
(a linear map and a LayerNorm); every cross-attention layer of the UNet gets its own key and value
projections for those tokens (``to_k_ip``, ``to_v_ip``) and adds their attention, times the scale, to the
text's: Z = Attn(Q, K_text, V_text) + lambda Attn(Q, K_img, V_img). The UNet itself never changes.

State-dict keys are those of the original IP-Adapter files, which diffusers' ``load_ip_adapter`` and
sd-webui-controlnet read: ``image_proj.proj.*``, ``image_proj.norm.*`` and ``ip_adapter.{k}.to_k_ip.weight``
/ ``to_v_ip.weight``, where k = 1, 3, 5, ... numbers the UNet's cross-attention layers in diffusers' order
(down blocks, then up blocks, then the mid block; k counts self-attention layers too, hence odd)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from imagine.nn.config import config_from_dict

NUM_TOKENS = 4  # the plain IP-Adapter's token count (diffusers assumes 4 for files of this layout)


@dataclass(frozen=True)
class IPAdapterConfig:
    image_embed_dim: int  # the image encoder's embedding width
    cross_attention_dim: int  # the UNet's text width: the tokens live in the text's space
    layer_widths: tuple[int, ...]  # each cross-attention layer's inner width, in diffusers' order
    num_tokens: int = NUM_TOKENS

    def __post_init__(self):
        if min(self.image_embed_dim, self.cross_attention_dim, self.num_tokens) < 1 or not self.layer_widths:
            raise ValueError("an IP-Adapter needs positive widths, tokens and at least one cross-attention layer")

    @classmethod
    def from_dict(cls, data: dict) -> IPAdapterConfig:
        data = {**data, "layer_widths": tuple(data.get("layer_widths", ()))}
        return config_from_dict(cls, data, "IP-Adapter")

    @classmethod
    def for_unet(cls, unet, image_embed_dim: int, num_tokens: int = NUM_TOKENS) -> IPAdapterConfig:
        widths = tuple(layer.to_k.out_features for layer in cross_attention_layers(unet))
        if not widths:
            raise ValueError("this UNet has no cross-attention layers: an IP-Adapter has nowhere to attach")
        return cls(image_embed_dim, unet.config.cross_attention_dim, widths, num_tokens)


class ImageProjection(nn.Module):
    """(B, image_embed_dim) -> (B, num_tokens, cross_attention_dim): the original ``ImageProjModel``
    (diffusers' ``ImageProjection``, which renames ``proj`` to ``image_embeds``)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        out = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(out.reshape(embeds.shape[0], self.num_tokens, -1))


class IPLayer(nn.Module):
    """One cross-attention layer's image key and value projections (no bias, as the original)."""

    def __init__(self, cross_attention_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, width, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, width, bias=False)


class IPAdapter(nn.Module):
    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = c = config
        self.image_proj = ImageProjection(c.image_embed_dim, c.cross_attention_dim, c.num_tokens)
        self.ip_adapter = nn.ModuleDict({str(2 * i + 1): IPLayer(c.cross_attention_dim, w)
                                         for i, w in enumerate(c.layer_widths)})

    @classmethod
    def from_unet(cls, unet, image_embed_dim: int, seed: int = 0) -> IPAdapter:
        """A fresh adapter for ``unet``: the image key and value projections start as copies of the text ones
        (as the paper initialises them), so the image tokens are read like text tokens from the first step."""
        torch.manual_seed(seed)
        adapter = cls(IPAdapterConfig.for_unet(unet, image_embed_dim))
        with torch.no_grad():
            for layer, attn in zip(adapter.layers, cross_attention_layers(unet), strict=True):
                layer.to_k_ip.weight.copy_(attn.to_k.weight)
                layer.to_v_ip.weight.copy_(attn.to_v.weight)
        return adapter

    @property
    def layers(self) -> list[IPLayer]:
        return [self.ip_adapter[str(2 * i + 1)] for i in range(len(self.config.layer_widths))]

    def tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.image_proj(embeds)

    def streams(self, unet, tokens: torch.Tensor, scale: float, layers: list[nn.Module] | None = None
                ) -> dict[nn.Module, list]:
        """{attention layer: [(to_k_ip, to_v_ip, tokens, scale)]}: the UNet's ``attention_streams`` input
        (nn/attention.py). layers: ``cross_attention_layers(unet)``, when the caller holds them."""
        layers = cross_attention_layers(unet) if layers is None else layers
        return {attn: [(layer.to_k_ip, layer.to_v_ip, tokens, scale)]
                for attn, layer in zip(layers, self.layers, strict=True)}


def cross_attention_layers(unet) -> list[nn.Module]:
    """The UNet's cross-attention modules (attn2 of every transformer block) in diffusers' processor order:
    down blocks, up blocks, then the mid block (module registration order in diffusers)."""
    blocks = [*unet.down_blocks, *unet.up_blocks]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(unet.mid_block)
    out = []
    for block in blocks:
        kind = getattr(block, "kind", "CrossAttn")  # the mid block always cross-attends
        if not kind.startswith("CrossAttn") or not hasattr(block, "attentions"):
            continue
        for transformer in block.attentions:
            out.extend(b.attn2 for b in transformer.transformer_blocks)
    return out


def check_fits(adapter: IPAdapter, unet, name: str) -> None:
    """Refuse an adapter made for another base model, saying what differs."""
    want = IPAdapterConfig.for_unet(unet, adapter.config.image_embed_dim, adapter.config.num_tokens)
    mine = (adapter.config.cross_attention_dim, adapter.config.layer_widths)
    theirs = (want.cross_attention_dim, want.layer_widths)
    if mine != theirs:
        raise ValueError(f"IP-Adapter {name!r} was made for another base model: it has text width "
                         f"{mine[0]} and {len(mine[1])} cross-attention layers {list(mine[1])}, this model has "
                         f"{theirs[0]} and {len(theirs[1])} {list(theirs[1])}")
