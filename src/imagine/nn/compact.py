"""Compact weights: a network's large matrices stored in fp8 (e4m3fn) or in GGUF's block quantizations (Q8_0,
Q5_K, Q4_K, ...), and dequantized layer by layer at compute time, in bf16, as Forge, ComfyUI-GGUF and diffusers
run such files. Only the weight a layer is computing with exists in bf16, and only while it computes.

A compact weight is a ``Packed`` (the stored bytes, their type and the weight's logical shape). It attaches to
a layer as a parametrization of its ``weight`` (torch.nn.utils.parametrize): the stored bytes are the
parameter's original, and every read of ``layer.weight`` dequantizes them. Row operations (a fused Q/K/V
tensor split into three, Flux's ``linear1`` cut in pieces, halves swapped) work on the packed bytes directly,
as GGUF's blocks run along a row, so a file in another layout converts without dequantizing.

The block formats follow ggml (llama.cpp's ggml-quants.c, as the ``gguf`` package implements them in numpy):
the torch dequantizers here are tested equal to the ``gguf`` package's on random blocks; types without one
here are dequantized by the ``gguf`` package itself (numpy, slower)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

FP8 = "F8_E4M3"
FP8_MAX = 448.0  # e4m3fn's largest finite value
# (values per block, bytes per block) of the types people's GGUF files use
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
          "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
          "IQ4_NL": (32, 18), "IQ4_XS": (256, 136)}
WRITABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # what the gguf package quantizes (its K-quants read only)
MIN_ELEMENTS = 1024  # smaller tensors (norms, biases, embeddings of a few rows) stay as they are


@dataclass
class Packed:
    """One compact weight: ``data`` is uint8 (rows, bytes per row) for a GGUF type, float8_e4m3fn in the
    weight's shape for fp8; ``scale`` multiplies an fp8 weight (1 for files stored unscaled)."""

    data: torch.Tensor
    qtype: str
    shape: tuple[int, ...]
    scale: float = 1.0

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def rows(self, start: int, end: int) -> Packed:
        """Rows start:end of the weight (dim 0): whole blocks, as a block never crosses a row."""
        return Packed(self.data[start:end], self.qtype, (end - start, *self.shape[1:]), self.scale)

    def chunk(self, count: int, part: int) -> Packed:
        n = self.shape[0] // count
        return self.rows(part * n, (part + 1) * n)

    def swap(self) -> Packed:
        """Its two halves along dim 0 in the other order."""
        half = self.shape[0] // 2
        return Packed(torch.cat([self.data[half:], self.data[:half]]), self.qtype, self.shape, self.scale)

    def contiguous(self) -> Packed:
        return Packed(self.data.contiguous(), self.qtype, self.shape, self.scale)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(self, dtype)


# -- fp8
def to_fp8(weight: torch.Tensor) -> Packed:
    """A weight in fp8 e4m3fn, scaled so its largest magnitude is e4m3fn's largest (one scale per tensor, as
    scaled-fp8 files store it): small weights keep their precision instead of falling into subnormals."""
    amax = float(weight.detach().abs().max())
    scale = amax / FP8_MAX if amax > 0 else 1.0
    data = (weight.detach().float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Packed(data, FP8, tuple(weight.shape), scale)


# -- GGUF block types
def quantize(weight: torch.Tensor, qtype: str) -> Packed:
    """A weight in one of GGUF's block types (``WRITABLE``), by the gguf package: its rows must be a whole
    number of blocks (the inner dimension a multiple of 32)."""
    from gguf import GGMLQuantizationType, quants  # late: see quantize

    if qtype not in WRITABLE:
        raise ValueError(f"imagine writes GGUF as {', '.join(WRITABLE)} (the gguf package quantizes those; its "
                         f"K-quants are read-only): {qtype} is not one of them")
    rows = weight.detach().float().reshape(weight.shape[0], -1).numpy()
    data = quants.quantize(rows, GGMLQuantizationType[qtype])
    return Packed(torch.from_numpy(np.ascontiguousarray(data)), qtype, tuple(weight.shape))


def packable(weight: torch.Tensor, qtype: str) -> bool:
    """Whether a tensor is stored compact: a matrix (or a convolution's kernel) with enough elements, whose
    rows hold whole blocks for a GGUF type (a 3x3 kernel's rows do not: such tensors stay as they are)."""
    if weight.ndim < 2 or weight.numel() < MIN_ELEMENTS or not weight.is_floating_point():
        return False
    if qtype == FP8:
        return True
    per_row = weight.numel() // weight.shape[0]
    return per_row % BLOCKS[qtype][0] == 0


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 from pairs of bytes (..., 2) -> (...) float32."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return d[:, None] * b[:, 2:].view(torch.int8).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: the low nibbles first, then the high ones (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2])[:, None] * (_nibbles(b[:, 2:]).float() - 8)


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2])[:, None] * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])[:, None]


def _bits(b: torch.Tensor) -> torch.Tensor:
    """Bytes (..., k) -> their bits (..., k, 8), least significant first, as uint8 on the bytes' device."""
    return (b[..., None] >> torch.arange(8, dtype=torch.uint8, device=b.device)) & 1


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5's 32 high bits (4 bytes, little endian) -> (blocks, 32) of 0 or 16 (uint8)."""
    return _bits(qh).reshape(len(qh), 32) << 4  # bit j of byte i is value 8i + j


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])
    return _f16(b[:, :2])[:, None] * (q.float() - 16)


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])
    return _f16(b[:, :2])[:, None] * q.float() + _f16(b[:, 2:4])[:, None]


def _scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's 12 bytes of 6-bit scales and mins, for the 8 sub-blocks: (blocks, 8) each."""
    s = s.long()
    low = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mins = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return low.float(), mins.float()


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scales_k4(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 values: 32 low nibbles, then 32 high ones
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).float()
    return (d[:, None, None] * sc[:, :, None] * q - dmin[:, None, None] * m[:, :, None]).reshape(-1, 256)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scales_k4(b[:, 4:16])
    qh = b[:, 16:48]  # bit s of byte l: value l of sub-block s
    qs = b[:, 48:].reshape(-1, 4, 32)
    low = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
    high = _bits(qh).transpose(1, 2) << 4  # (blocks, 8 sub-blocks, 32)
    q = (low | high).float()
    return (d[:, None, None] * sc[:, :, None] * q - dmin[:, None, None] * m[:, :, None]).reshape(-1, 256)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[:, :128].long().reshape(-1, 2, 64)
    qh = b[:, 128:192].long().reshape(-1, 2, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 8)
    d = _f16(b[:, 208:210])
    q1 = (ql[:, :, :32] & 0x0F) | ((qh & 3) << 4)
    q2 = (ql[:, :, 32:] & 0x0F) | (((qh >> 2) & 3) << 4)
    q3 = (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4)
    q4 = (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4)
    q = torch.stack([q1, q2, q3, q4], dim=2).float() - 32  # (blocks, 2 halves, 4 quarters, 32)
    # the scale of value l of quarter k in a half: scales[l // 16 + 2k]
    s = scales.reshape(-1, 2, 4, 2)[:, :, :, :, None].expand(-1, 2, 4, 2, 16).reshape(-1, 2, 4, 32)
    return (d[:, None, None, None] * s * q).reshape(-1, 256)


TORCH_DEQUANT = {"Q8_0": _dq_q8_0, "Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1,
                 "Q4_K": _dq_q4_k, "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k}


def dequantize(p: Packed, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight in ``dtype`` (on the device its bytes are on)."""
    if p.qtype == FP8:
        w = p.data.to(dtype)
        return w * p.scale if p.scale != 1.0 else w
    if p.qtype in TORCH_DEQUANT:
        nbytes = BLOCKS[p.qtype][1]
        blocks = p.data.reshape(-1, nbytes)
        return TORCH_DEQUANT[p.qtype](blocks).to(dtype).reshape(p.shape)
    from gguf import GGMLQuantizationType, quants  # late: see quantize

    values = quants.dequantize(p.data.cpu().numpy(), GGMLQuantizationType[p.qtype])
    return torch.from_numpy(np.ascontiguousarray(values)).to(p.data.device, dtype).reshape(p.shape)


class Dequantize(nn.Module):
    """The parametrization: the stored bytes (the parameter's original) -> the weight, in bf16."""

    def __init__(self, qtype: str, shape: tuple[int, ...], scale: float = 1.0, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.qtype, self.shape, self.scale, self.dtype = qtype, tuple(shape), scale, dtype

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return dequantize(Packed(original, self.qtype, self.shape, self.scale), self.dtype)

    def extra_repr(self) -> str:
        return f"{self.qtype}, shape={self.shape}"


def attach(module: nn.Module, name: str, packed: Packed, dtype: torch.dtype = torch.bfloat16) -> None:
    """Store ``module.<name>`` compact: its bytes the parameter, dequantized at every read."""
    if parametrize.is_parametrized(module, name):
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    module._parameters[name] = nn.Parameter(packed.data, requires_grad=False)
    parametrize.register_parametrization(module, name, Dequantize(packed.qtype, packed.shape, packed.scale, dtype),
                                         unsafe=True)


def packed_of(module: nn.Module, name: str) -> Packed | None:
    """A compact weight's Packed (None when ``module.<name>`` is stored plainly)."""
    if not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    how = next((p for p in plist if isinstance(p, Dequantize)), None)
    if how is None:
        return None
    return Packed(plist.original, how.qtype, how.shape, how.scale)


def compact_module(model: nn.Module, qtype: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every packable weight of ``model`` as ``qtype`` (fp8, or a GGUF type it can write), the rest in
    ``dtype``; returns how many weights were packed."""
    count = 0
    for module in list(model.modules()):
        for name, param in list(module._parameters.items()):
            if param is None or parametrize.is_parametrized(module, name):
                continue
            if packable(param, qtype):
                attach(module, name, to_fp8(param) if qtype == FP8 else quantize(param, qtype), dtype)
                count += 1
            elif param.is_floating_point():
                module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    return count


def weight_bytes(model: nn.Module) -> int:
    """What the model's parameters and buffers hold, compact weights at their stored size."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def plain_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every compact weight dequantized under its own key (``x.weight``, not
    ``x.parametrizations.weight.original``): what a plain file of the same model holds."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." in key:
            if not key.endswith(".original"):
                continue
            prefix, _, rest = key.partition(".parametrizations.")
            name = rest.removesuffix(".original")
            owner = model.get_submodule(prefix) if prefix else model
            value = packed_of(owner, name).dequantize(dtype or torch.float32)
            key = f"{prefix}.{name}" if prefix else name
        elif dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value
    return out


def describe(model: nn.Module) -> dict[str, int]:
    """How many weights are stored in each compact type (empty for a plain model)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        for name in list(getattr(module, "parametrizations", {}) or {}):
            packed = packed_of(module, name)
            if packed is not None:
                counts[packed.qtype] = counts.get(packed.qtype, 0) + 1
    return counts


def compute_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The dtypes the model's weights compute in: a compact weight's dequantized dtype, any other floating
    parameter's own."""
    out: set[torch.dtype] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if "." in name or param is None or not param.is_floating_point():
                continue
            out.add(param.dtype)
        for plist in (getattr(module, "parametrizations", None) or {}).values():
            for p in plist:
                if isinstance(p, Dequantize):
                    out.add(p.dtype)
    return out
