"""A Linear layer whose output rows do not depend on the batch they are computed in.

CPU GEMM kernels pick their blocking (and so the order of a row's floating-point sums) from the row count M.
Where M is the batch itself (the timestep embedding and each ResNet block's projection of it, (B, C) inputs),
a row's result then changes in its last bits with the batch size, and after a few steps of a sampler a pixel
can move. Computed one row at a time (M = 1, the same kernel whatever B) those layers are batch invariant;
they are tiny (B x C x C'), so this costs microseconds. Wider inputs (tokens, (B, L, C)) are left to the
ordinary kernel: their M = B L is large and, measured here, does not change a row's sums (benchmarks/t2i_speed.py
and tests/e2e/test_t2i.py check the whole network)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear on a (B, C) input, one row at a time, where generation runs (no gradient, CPU). Not while
    exporting (ONNX): an export is made for one fixed row count, and a weight shared by per-row nodes trips ONNX
    Runtime's quantizer. Not while training: a training batch has no batch-size invariance to keep, and on a GPU
    the per-row kernels and their backward were most of a step (a profile of the shapes-wide preset at batch
    128 on an H100: 2.7 steps/s, 123k linear calls in 60 steps). Not on GPUs, whose kernels promise no such
    invariance anyway."""
    if (x.ndim != 2 or len(x) == 1 or torch.compiler.is_exporting() or torch.is_grad_enabled()
            or x.device.type != "cpu"):
        return F.linear(x, weight, bias)
    return torch.cat([F.linear(row, weight, bias) for row in x.split(1)])


class RowwiseLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) computed row by row on (B, C) inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rowwise_linear(x, self.weight, self.bias)
