"""Training throughput on this CPU: imagine's training step against denoising-diffusion-pytorch's, side by side.

Both train a pixel-space DDPM (eps prediction, 1000 steps) on 1-channel 16x16 digits at the same batch, with
AdamW/Adam, measured in one process, same threads, alternating runs. The UNets are of comparable size
(printed). A step is forward + loss + backward + optimizer step; images/s is batch / median step time.

denoising-diffusion-pytorch is a benchmark-only dependency. Its PyPI metadata requires torchvision, which has
no CPU build here and would pull a CUDA torch, so install it without dependencies:

    pip install --no-deps denoising-diffusion-pytorch && pip install einops ema-pytorch accelerate
    python benchmarks/train_throughput.py            # writes docs/benchmarks/train_throughput.{json,md}

Only its Unet and GaussianDiffusion are used; when torchvision is missing an empty stand-in module lets its
file import (torchvision is used only by its Trainer's data pipeline and image grids).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from imagine.data.images import load_digits
from imagine.diffusion.losses import diffusion_loss
from imagine.diffusion.schedules import make_alphas_cumprod
from imagine.models import UNet2DConditionModel, UNetConfig

ROOT = Path(__file__).resolve().parent.parent


def _import_lucidrains():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torchvision")
        stub.transforms, stub.utils = types.ModuleType("transforms"), types.ModuleType("utils")
        sys.modules["torchvision"] = stub
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    return GaussianDiffusion, Unet


def ours(batch: int, precision: str, channels_last: bool):
    cfg = UNetConfig(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 96),
                     down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), mid_block_type=None,
                     layers_per_block=1, norm_num_groups=8, attention_head_dim=32)
    unet = UNet2DConditionModel(cfg)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    ac = make_alphas_cumprod("linear", 1000, 0.0001, 0.02).float()
    g = torch.Generator().manual_seed(0)

    def step(x0):
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        ab = ac[t].reshape(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = unet(x_t, t)
        loss = diffusion_loss(out.float(), x0, noise, x_t, t, ac, "eps")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return unet, step


def lucidrains(batch: int):
    GaussianDiffusion, Unet = _import_lucidrains()
    unet = Unet(dim=32, dim_mults=(1, 2, 2), channels=1, flash_attn=False)
    diffusion = GaussianDiffusion(unet, image_size=16, timesteps=1000, objective="pred_noise")
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4)

    def step(x0):
        loss = diffusion(x0 * 0.5 + 0.5)  # it normalizes [0, 1] images to [-1, 1] itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return unet, step


def measure(step, data: torch.Tensor, batch: int, warmup: int, iters: int) -> list[float]:
    times = []
    for i in range(warmup + iters):
        x0 = data[(i * batch) % (len(data) - batch):][:batch]
        start = time.perf_counter()
        step(x0)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median over all is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_digits(16).images
    contenders = {
        "imagine fp32": ours(args.batch, "fp32", False),
        "imagine bf16": ours(args.batch, "bf16", False),
        "imagine bf16 + channels_last": ours(args.batch, "bf16", True),
        "denoising-diffusion-pytorch fp32": lucidrains(args.batch),
    }
    params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, (_, step) in contenders.items():
            times[name] += measure(step, data, args.batch, warmup=3, iters=args.iters)
    rows = []
    for name in contenders:
        med = statistics.median(times[name])
        rows.append({"name": name, "parameters": params[name], "median_step_s": med,
                     "images_per_s": args.batch / med})
    ref = next(r for r in rows if r["name"].startswith("denoising"))
    for r in rows:
        r["speedup_vs_denoising_diffusion_pytorch"] = r["images_per_s"] / ref["images_per_s"]
    report = {"batch": args.batch, "image": "1 x 16 x 16 (digits)", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.machine(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_throughput.json").write_text(json.dumps(report, indent=2))
    md = ["# Training throughput on this CPU", "",
          f"Measured with `python benchmarks/train_throughput.py` in one process ({report['threads']} threads, "
          f"torch {report['torch']}): batch {args.batch} of {report['image']} images, eps-prediction DDPM "
          "training step (forward, loss, backward, optimizer step), median over "
          f"{args.rounds} alternating rounds of {args.iters} steps.", "",
          "| trainer | UNet parameters | images/s | vs denoising-diffusion-pytorch |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['name']} | {r['parameters'] / 1e6:.2f} M | {r['images_per_s']:.0f} | "
                  f"{r['speedup_vs_denoising_diffusion_pytorch']:.2f}x |")
    md += ["", "Both UNets have self-attention at the two lower resolutions and ~1.4M parameters; "
           "denoising-diffusion-pytorch's also has linear attention at full resolution, as it ships.", ""]
    (args.out / "train_throughput.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
