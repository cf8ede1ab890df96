"""The LoRA update (Hu et al. 2021): beside a frozen layer W, a low-rank path B A scaled by alpha / r,
so y = W x + (alpha / r) B A x. A ("down", r x in) starts random, B ("up", out x r) at zero, so training
starts from the frozen model's output. For a convolution, A is a convolution with W's kernel, stride
and padding into r channels and B a 1x1 convolution back (kohya's LoRA for conv layers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from imagine.nn.linear import RowwiseLinear


class LoRALayer(nn.Module):
    """The update path of one Linear or Conv2d; ``delta_weight`` is the same update as a weight."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        if isinstance(base, nn.Linear):
            # row by row on (B, C) inputs (a LoRA on the timestep path), as the base layer is (nn/linear.py)
            self.down = RowwiseLinear(base.in_features, rank, bias=False)
            self.up = RowwiseLinear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA attaches to Linear and Conv2d layers, not {type(base).__name__}")
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # A random (as nn.Linear's own init)
        nn.init.zeros_(self.up.weight)  # B zero: the update starts at nothing

    @classmethod
    def from_tensors(cls, down: torch.Tensor, up: torch.Tensor, alpha: float | None,
                     base: nn.Module | None = None) -> LoRALayer:
        """A layer holding given A (down) and B (up) weights; ``base`` gives a conv's stride and padding
        (without it, a k x k kernel pads k // 2 with stride 1)."""
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise ValueError(f"LoRA down {tuple(down.shape)} and up {tuple(up.shape)} disagree on the rank")
        if down.ndim == 2:
            shape = nn.Linear(down.shape[1], up.shape[0], device="meta")
        else:
            k = down.shape[-1]
            stride, padding = (base.stride, base.padding) if isinstance(base, nn.Conv2d) else (1, k // 2)
            shape = nn.Conv2d(down.shape[1], up.shape[0], k, stride, padding, device="meta")
        layer = cls(shape, rank, alpha).to_empty(device="cpu")
        with torch.no_grad():
            layer.down.weight.copy_(down)
            layer.up.weight.copy_(up)
        return layer

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.down(x.to(dtype))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A shaped as the base layer's weight."""
        up, down = self.up.weight, self.down.weight
        if up.ndim == 2:
            return up @ down * self.scale
        # conv: B is 1x1, so the update is B's (out, r) matrix applied to each tap of A's kernel
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * self.scale


@dataclass
class LoRA:
    layers: dict[str, LoRALayer] = field(default_factory=dict)  # "PART.MODULE" -> its update
    name: str = "lora"

    def parts(self) -> set[str]:
        return {key.split(".", 1)[0] for key in self.layers}

    def parameters(self):
        for layer in self.layers.values():
            yield from layer.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Ours: "PART.MODULE.down.weight", ".up.weight", ".alpha" (io/lora_keys.py writes kohya's and PEFT's)."""
        out = {}
        for key, layer in self.layers.items():
            out[f"{key}.down.weight"] = layer.down.weight.detach()
            out[f"{key}.up.weight"] = layer.up.weight.detach()
            out[f"{key}.alpha"] = torch.tensor(layer.alpha)
        return out


def find_module(part: nn.Module, name: str) -> nn.Module | None:
    """A module by name, with or without transformers' ``text_model.`` prefix (transformers 5 dropped it
    on CLIPTextModel; files keep it)."""
    for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
        try:
            module = part.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return module
    return None
