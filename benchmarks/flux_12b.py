"""Flux.1 [dev]'s 12B transformer, whole, on this machine (24 GB of memory, 2 cores): its real configuration
(19 double and 38 single blocks, width 3072) with random weights, built one tensor at a time on the meta
device and stored in scaled fp8 e4m3fn as each is read (io/checkpoint.build_and_fill with the fp8 dtype; what
`--weights-dtype fp8` does to a real file), then denoising steps at 512 x 512 (1024 image tokens beside 512
T5 tokens, Flux [dev]'s defaults) and 256 x 256, computed in bf16 layer by layer. Its bf16 weights alone would
be 22.2 GiB, more than this machine has free; fp32, 44.3 GiB.

    python benchmarks/flux_12b.py   # writes docs/benchmarks/flux_12b.{json,md}; about ten minutes here

The peak is the process's resident set high-water mark (VmHWM) after each stage."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from imagine.io.checkpoint import Ref, build_and_fill
from imagine.models.flux import FluxConfig, FluxTransformer2DModel
from imagine.nn import compact

ROOT = Path(__file__).resolve().parent.parent
DEV = FluxConfig(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
GB = 2**30


def peak_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def random_weights(model_keys: dict[str, tuple[int, ...]]) -> dict[str, Ref]:
    """A Ref per tensor, drawn when read: norms' scales 1, biases 0, matrices N(0, 0.02 / sqrt(fan-in / 3072))."""
    def draw(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash(key) % 2**31)
        if key.endswith(("scale", "norm.weight")) or ("norm" in key and len(shape) == 1):
            return torch.ones(shape)
        if key.endswith("bias"):
            return torch.zeros(shape)
        fan_in = shape[1] if len(shape) > 1 else 3072
        return torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02 * (3072 / fan_in) ** 0.5)

    return {k: Ref(shape, lambda k=k, shape=shape: draw(k, shape)) for k, shape in model_keys.items()}


def step(net, side: int, text_tokens: int) -> float:
    latent = torch.randn(1, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, text_tokens, 4096, generator=torch.Generator().manual_seed(1)) * 0.1
    pooled = torch.randn(1, 768, generator=torch.Generator().manual_seed(2)) * 0.1
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = net(latent, torch.tensor([500.0]), context, pooled, guidance=torch.tensor([3.5]))
    seconds = time.perf_counter() - start
    assert out.shape == latent.shape and torch.isfinite(out.float()).all(), "the step gave non-finite values"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.device("meta"):
        keys = {k: tuple(v.shape) for k, v in FluxTransformer2DModel(DEV).state_dict().items()}
    params = sum(torch.Size(s).numel() for s in keys.values())
    start = time.perf_counter()
    net = build_and_fill(lambda: FluxTransformer2DModel(DEV), random_weights(keys), "Flux.1 [dev] (random)",
                         torch.float8_e4m3fn).eval()
    build_s = time.perf_counter() - start
    stored = compact.weight_bytes(net)
    report = {"parameters": params, "stored_gb": round(stored / GB, 2), "bf16_gb": round(2 * params / GB, 2),
              "packed": compact.describe(net), "build_seconds": round(build_s, 1),
              "peak_after_build_gb": round(peak_gb(), 2), "steps": []}
    print(json.dumps(report), flush=True)
    for side in args.sizes:
        seconds = step(net, side, args.text_tokens)
        row = {"size": side, "image_tokens": (side // 16) ** 2, "text_tokens": args.text_tokens,
               "seconds_per_step": round(seconds, 1), "peak_gb": round(peak_gb(), 2)}
        report["steps"].append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flux_12b.json").write_text(json.dumps(report, indent=2))
    lines = ["# Flux.1 [dev]'s 12B transformer, whole, on a 2-core CPU with 24 GB", "",
             "`python benchmarks/flux_12b.py`: the real configuration with random weights, stored in scaled fp8 "
             "e4m3fn (`--weights-dtype fp8`), computed in bf16 layer by layer.", "",
             f"- parameters: {params / 1e9:.2f} B; stored: {report['stored_gb']} GB (bf16 would be "
             f"{report['bf16_gb']} GB, fp32 {2 * report['bf16_gb']:.1f} GB)",
             f"- built in {report['build_seconds']} s (one tensor at a time); resident peak after building: "
             f"{report['peak_after_build_gb']} GB", "",
             "| size | image tokens | text tokens | seconds per step | resident peak |", "|---|---|---|---|---|"]
    for row in report["steps"]:
        lines.append(f"| {row['size']} x {row['size']} | {row['image_tokens']} | {row['text_tokens']} | "
                     f"{row['seconds_per_step']} | {row['peak_gb']} GB |")
    (args.out / "flux_12b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
