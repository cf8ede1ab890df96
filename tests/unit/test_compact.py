"""Compact weights (nn/compact.py): every torch dequantizer equals the gguf package's (ggml's reference, in
numpy) on random blocks; row operations on packed bytes equal the same operations on the weight; an fp8 or
GGUF-packed layer computes what its dequantized weight computes, and holds its bytes, not a float copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from imagine.nn import compact
from imagine.nn.compact import BLOCKS, FP8, Packed, attach, compact_module, dequantize, packed_of, quantize, to_fp8

F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(qtype: str, rows: int, per_row: int, seed: int = 0) -> torch.Tensor:
    size, nbytes = BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, per_row // size, nbytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:  # scales: finite halves (random bytes could be NaN or infinity)
        data[:, :, offset: offset + 2] = rng.uniform(-0.05, 0.05, size=data.shape[:2]).astype(np.float16)[
            ..., None].view(np.uint8)
    return torch.from_numpy(data.reshape(rows, -1))


@pytest.mark.parametrize("qtype", sorted(compact.TORCH_DEQUANT))
def test_each_torch_dequantizer_equals_ggmls(qtype):
    from gguf import GGMLQuantizationType, quants

    data = random_blocks(qtype, 6, 512)
    ours = dequantize(Packed(data, qtype, (6, 512)), torch.float32)
    reference = quants.dequantize(data.numpy(), GGMLQuantizationType[qtype])
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-6, atol=1e-6)


def test_types_without_a_torch_dequantizer_go_through_the_gguf_package():
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(4, BLOCKS["Q3_K"][1]), dtype=np.uint8)
    data[:, -2:] = np.float16(0.01).reshape(1, 1).view(np.uint8)  # Q3_K's d is its last two bytes
    ours = dequantize(Packed(torch.from_numpy(data), "Q3_K", (4, 256)), torch.float32)
    np.testing.assert_allclose(ours.numpy(), quants.dequantize(data, GGMLQuantizationType.Q3_K), atol=1e-6)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", FP8])
def test_row_operations_on_packed_bytes_equal_them_on_the_weight(qtype):
    if qtype == FP8:
        packed = to_fp8(torch.randn(12, 64))
    else:
        packed = Packed(random_blocks(qtype, 12, 256), qtype, (12, 256))
    whole = packed.dequantize(torch.float32)
    assert torch.equal(packed.chunk(3, 1).dequantize(torch.float32), whole.chunk(3)[1])
    assert torch.equal(packed.rows(2, 7).dequantize(torch.float32), whole[2:7])
    assert torch.equal(packed.swap().dequantize(torch.float32), torch.cat(whole.chunk(2)[::-1]))


def test_quantizing_comes_back_close_and_fp8_is_scaled():
    w = torch.randn(64, 256) * 0.02
    for qtype, tolerance in (("Q8_0", 0.01), ("Q5_0", 0.05), ("Q4_0", 0.1)):
        back = quantize(w, qtype).dequantize(torch.float32)
        assert (back - w).norm() / w.norm() < tolerance, qtype
    p = to_fp8(w)
    assert p.data.dtype == torch.float8_e4m3fn and (p.dequantize(torch.float32) - w).norm() / w.norm() < 0.05
    # unscaled, small weights lose most of their bits to e4m3fn's subnormals (below 2^-6)
    small = w / 10
    plain = (small.to(torch.float8_e4m3fn).float() - small).norm() / small.norm()
    assert plain > 0.15 and plain > 3 * (to_fp8(small).dequantize(torch.float32) - small).norm() / small.norm()
    with pytest.raises(ValueError, match="K-quants are read-only"):
        quantize(w, "Q4_K")


@pytest.mark.parametrize("qtype", ["Q8_0", FP8])
def test_a_compact_layer_computes_with_its_dequantized_weight_and_holds_its_bytes(qtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.LayerNorm(256))
    x = torch.randn(3, 256)
    expected = model(x)
    before = compact.weight_bytes(model)
    assert compact_module(model, qtype) == 2  # the two matrices; the norm and the biases stay
    assert compact.weight_bytes(model) < before / 3
    packed = packed_of(model[0], "weight")
    assert packed is not None and packed.qtype == qtype and packed_of(model[3], "weight") is None
    with torch.autocast("cpu", torch.bfloat16):
        out = model(x.bfloat16())
    manual = nn.functional.linear(x, packed.dequantize(torch.float32), model[0].bias.float())
    assert torch.allclose(model[0](x.bfloat16()).float(), manual, atol=0.05)
    assert (out.float() - expected).norm() / expected.norm() < 0.05
    attach(model[0], "weight", packed)  # attaching again replaces, it does not stack
    assert len(model[0].parametrizations["weight"]) == 1


def test_a_file_stored_in_fp8_is_kept_as_it_is():
    """Flux's and SD3's fp8 checkpoints (e4m3fn tensors): with fp8 storage their bytes are kept unscaled, and
    loaded in fp32 they are widened exactly."""
    from imagine.io.checkpoint import Ref, build_and_fill

    w = (torch.randn(64, 64) * 0.5).to(torch.float8_e4m3fn)
    weights = {"weight": Ref((64, 64), lambda: w), "bias": Ref((64,), lambda: torch.zeros(64))}
    layer = build_and_fill(lambda: nn.Linear(64, 64), weights, "an fp8 file", torch.float8_e4m3fn)
    packed = packed_of(layer, "weight")
    assert packed.scale == 1.0 and torch.equal(packed.data.view(torch.uint8), w.view(torch.uint8))
    plain = build_and_fill(lambda: nn.Linear(64, 64), weights, "an fp8 file", torch.float32)
    assert torch.equal(plain.weight, w.float())
