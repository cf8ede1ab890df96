"""Training throughput on this CPU: imagine's training loop against denoising-diffusion-pytorch's, side by side.

Like for like:
- **the code users run**: ours is `imagine.train.loop.train`, the loop `imagine train` runs (data order,
  noise draws, loss, AdamW, gradient clipping, EMA, LR schedule, logging), timed by a hook between steps;
  theirs is the body of their `Trainer.train` step (forward through `GaussianDiffusion`, backward, gradient
  clipping at 1.0, Adam step, EMA update every 10 steps as ema-pytorch does). Their `Trainer` itself needs
  torchvision for its data pipeline, which has no CPU build on PyPI here, so its step is run as written;
- **the same FLOPs per image**: both UNets are configured to within 2% of the same forward GFLOPs on a
  1 x 16 x 16 image (counted by torch.utils.flop_counter, printed with the parameter counts);
- **the same precision**: fp32 against fp32, bf16 autocast against bf16 autocast (accelerate's CPU bf16
  mixed precision is torch.autocast("cpu", bfloat16), as used here).

Interleaved rounds: in each round every contender trains `--iters` steps after `--warmup`; the figure is the
median step time over all rounds, and the speed-up is the median of the per-round ratios at each precision.

denoising-diffusion-pytorch is a benchmark-only dependency. Its PyPI metadata requires torchvision (see
above), so install it without dependencies:

    pip install --no-deps denoising-diffusion-pytorch && pip install einops ema-pytorch accelerate
    python benchmarks/train_throughput.py            # writes docs/benchmarks/train_throughput.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from imagine.data.images import load_dataset
from imagine.models import UNet2DConditionModel
from imagine.train.config import TrainConfig
from imagine.train.loop import make_unet_config, train

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16
# ours: 32/64/128 channels, self-attention at 8x8 and 4x4 (0.174 forward GFLOPs per image, theirs 0.171)
OUR_UNET = dict(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8, attention_head_dim=16,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), mid_block_type=None)


def _import_lucidrains():
    try:
        import torchvision  # noqa: F401
    except ImportError:  # only their Trainer's data pipeline and image grids use it
        stub = types.ModuleType("torchvision")
        stub.transforms, stub.utils = types.ModuleType("transforms"), types.ModuleType("utils")
        sys.modules["torchvision"] = stub
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    return GaussianDiffusion, Unet, EMA


def forward_gflops(model: torch.nn.Module, *args) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args)
    return counter.get_total_flops() / 1e9


def our_config(batch: int, steps: int, precision: str) -> TrainConfig:
    return TrainConfig(image_size=SIZE, batch_size=batch, steps=steps, lr=1e-4, warmup_steps=0, precision=precision,
                       schedule="linear", prediction="eps", unet=OUR_UNET, checkpoint_every=10**9, sample_every=0,
                       log_every=10**9, ema_decay=0.995)


def run_ours(data, batch: int, warmup: int, iters: int, precision: str) -> list[float]:
    """Step times of `imagine.train.loop.train` (the real loop), between consecutive steps after warm-up."""
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        train(our_config(batch, warmup + iters + 1, precision), data, out,
              hooks=(lambda info, context: stamps.append(time.perf_counter()),))
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:], strict=False)]


def make_theirs(batch: int):
    GaussianDiffusion, Unet, EMA = _import_lucidrains()
    unet = Unet(dim=32, dim_mults=(1, 2, 2), channels=1, flash_attn=False)
    diffusion = GaussianDiffusion(unet, image_size=SIZE, timesteps=1000, objective="pred_noise")
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10)
    return unet, diffusion, opt, ema


def run_theirs(model, data: torch.Tensor, batch: int, warmup: int, iters: int, precision: str) -> list[float]:
    """Their Trainer.train step: loss under (accelerate's) autocast, backward, clip 1.0, step, zero, EMA."""
    _, diffusion, opt, ema = model
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        x0 = data[(i * batch) % (len(data) - batch):][:batch] * 0.5 + 0.5  # their data is in [0, 1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion(x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.update()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    torch.manual_seed(0)
    dataset = load_dataset("builtin:digits", SIZE, 1)
    tensor_data = dataset.images
    theirs = make_theirs(args.batch)
    x, t = torch.randn(1, 1, SIZE, SIZE), torch.tensor([10])
    ours_net = UNet2DConditionModel(make_unet_config(our_config(args.batch, 1, "fp32"), 1, 0))
    nets = {"imagine": {"gflops": forward_gflops(ours_net, x, t),
                        "parameters": sum(p.numel() for p in ours_net.parameters())},
            "denoising-diffusion-pytorch": {"gflops": forward_gflops(theirs[0], x, t),
                                            "parameters": sum(p.numel() for p in theirs[0].parameters())}}
    names = [f"{who} {p}" for p in ("fp32", "bf16") for who in ("imagine", "denoising-diffusion-pytorch")]
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        medians = {}
        for precision in ("fp32", "bf16"):
            ours = run_ours(dataset, args.batch, args.warmup, args.iters, precision)
            theirs_t = run_theirs(theirs, tensor_data, args.batch, args.warmup, args.iters, precision)
            times[f"imagine {precision}"] += ours
            times[f"denoising-diffusion-pytorch {precision}"] += theirs_t
            medians[precision] = statistics.median(theirs_t) / statistics.median(ours)
            ratios[precision].append(medians[precision])
        print(f"round {r + 1}/{args.rounds}: imagine over theirs, fp32 {medians['fp32']:.2f}x, "
              f"bf16 {medians['bf16']:.2f}x", flush=True)
    rows = []
    for name in names:
        who, precision = name.rsplit(" ", 1)
        med = statistics.median(times[name])
        rows.append({"name": name, "trainer": who, "precision": precision, "median_step_s": med,
                     "images_per_s": args.batch / med, **nets[who]})
    report = {"batch": args.batch, "image": f"1 x {SIZE} x {SIZE} (digits)", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.machine(), "rounds": args.rounds, "iters": args.iters,
              "rows": rows, "speedup_median_of_round_ratios": {p: statistics.median(v) for p, v in ratios.items()},
              "round_ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_throughput.json").write_text(json.dumps(report, indent=2))
    md = ["# Training throughput on this CPU", "",
          f"`python benchmarks/train_throughput.py` ({report['threads']} threads, torch {report['torch']}): batch "
          f"{args.batch} of {report['image']} images, eps-prediction DDPM; imagine's real training loop "
          "(`imagine.train.loop.train`) against the step of denoising-diffusion-pytorch's Trainer, UNets of the "
          f"same forward FLOPs per image, at the same precision; {args.rounds} interleaved rounds of "
          f"{args.iters} steps after {args.warmup} of warm-up.", "",
          "| trainer | precision | forward GFLOPs / image | UNet parameters | images/s |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['trainer']} | {r['precision']} | {r['gflops']:.3f} | {r['parameters'] / 1e6:.2f} M | "
                  f"{r['images_per_s']:.0f} |")
    sp = report["speedup_median_of_round_ratios"]
    md += ["", f"imagine over denoising-diffusion-pytorch, median of the per-round ratios: **{sp['fp32']:.2f}x** in "
           f"fp32, **{sp['bf16']:.2f}x** in bf16 (rounds: fp32 "
           + ", ".join(f"{v:.2f}" for v in ratios["fp32"]) + "; bf16 " + ", ".join(f"{v:.2f}" for v in ratios["bf16"])
           + ").", "",
           "Ours has more parameters at the same FLOPs (128 channels at 4x4, where a parameter costs little); theirs "
           "adds linear attention at full resolution, as it ships. Both loops include their EMA and gradient "
           "clipping; ours also its data order, noise draws, LR schedule and logging.", ""]
    (args.out / "train_throughput.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
