"""Where SD 1.5's UNet step stands against this CPU's bf16 matmul peak, and what the usual levers buy: the UNet
at real size (random weights), bf16 weights under bf16 autocast, a 512 x 512 latent with guidance (batch 2),
eager against channels-last memory, torch.compile (inductor, oneDNN's kernels) and both. *of peak*: the step's
FLOPs (counted by torch.utils.flop_counter) over its seconds, against the measured bf16 matmul peak.

    python benchmarks/unet_speed_ablation.py   # writes docs/benchmarks/unet_speed_ablation.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from imagine.models import UNet2DConditionModel, UNetConfig

ROOT = Path(__file__).resolve().parent.parent


def matmul_peak(dtype: torch.dtype, n: int = 4096, rounds: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def step_seconds(net, inputs, rounds: int) -> float:
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        net(*inputs[:2], encoder_hidden_states=inputs[2])  # warm-up (and compilation)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            net(*inputs[:2], encoder_hidden_states=inputs[2])
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = UNet2DConditionModel(UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8)).eval()
    base.to(torch.bfloat16)
    x = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
    t = torch.tensor([500, 500])
    context = torch.randn(2, 77, 768, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), FlopCounterMode(display=False) as counter:
        base(x, t, encoder_hidden_states=context)
    flops = counter.get_total_flops()
    peak = matmul_peak(torch.bfloat16)
    rows = []
    variants = (("eager", False, False), ("channels-last", True, False), ("torch.compile", False, True),
                ("torch.compile + channels-last", True, True))
    for label, channels_last, compiled in variants:
        net = base
        inputs = (x.contiguous(memory_format=torch.channels_last) if channels_last else x, t, context)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if compiled:
            net = torch.compile(net)
        start = time.perf_counter()
        seconds = step_seconds(net, inputs, args.rounds)
        rows.append({"variant": label, "seconds": round(seconds, 3), "gflops": round(flops / seconds / 1e9),
                     "of_peak": round(flops / seconds / 1e9 / peak, 3),
                     "first_call_seconds": round(time.perf_counter() - start - seconds * args.rounds, 1)})
        print(json.dumps(rows[-1]), flush=True)
        base = base.to(memory_format=torch.contiguous_format)
    report = {"flops_per_step": flops, "bf16_matmul_peak_gflops": round(peak), "rows": rows,
              "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unet_speed_ablation.json").write_text(json.dumps(report, indent=2))
    lines = ["# SD 1.5's UNet step on this CPU: what the levers buy", "",
             f"`python benchmarks/unet_speed_ablation.py`: the UNet at real size, bf16 weights and autocast, 512 x 512 "
             f"with guidance (batch 2), {flops / 1e12:.2f} TFLOP per step; bf16 matmul peak "
             f"{peak:.0f} GFLOP/s ({torch.get_num_threads()} threads).", "",
             "| variant | s / step | GFLOP/s | of peak | first call (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seconds']} | {r['gflops']} | {r['of_peak']:.0%} | "
                     f"{r['first_call_seconds']} |")
    (args.out / "unet_speed_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
