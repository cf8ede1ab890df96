"""What a bigger default UNet would cost to train here: seconds per training step (forward, backward, AdamW)
of candidate text-to-image UNets on builtin:shapes' 16x16x4 latents with MiniLM-width context, batch 32, in
fp32 and bf16 autocast, beside parameters and fp16 size (the package budget is 40 MB for all shipped weights).

    python benchmarks/unet_step_cost.py       # writes docs/benchmarks/unet_step_cost.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from imagine.models import UNet2DConditionModel, UNetConfig

ROOT = Path(__file__).resolve().parent.parent
CROSS3 = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
CROSS_ALL = dict(down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3)
CANDIDATES = {
    "shipped (48/96/96, attention at 8 and 4)": dict(block_out_channels=(48, 96, 96), **CROSS3),
    "64/128/128, attention at 16, 8, 4": dict(block_out_channels=(64, 128, 128), **CROSS_ALL),
    "96/192/192, attention at 16, 8, 4": dict(block_out_channels=(96, 192, 192), **CROSS_ALL),
    "128/256/256, attention at 16, 8, 4": dict(block_out_channels=(128, 256, 256), **CROSS_ALL),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    x = torch.randn(args.batch, 4, 16, 16)
    t = torch.randint(0, 1000, (args.batch,))
    ctx = torch.randn(args.batch, 77, 384)
    for name, blocks in CANDIDATES.items():
        cfg = UNetConfig(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
                         mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=4, cross_attention_dim=384,
                         **blocks)
        unet = UNet2DConditionModel(cfg)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        params = sum(p.numel() for p in unet.parameters())
        row = {"name": name, "parameters": params, "fp16_mb": params * 2 / 1e6}
        for precision in ("fp32", "bf16"):
            times = []
            for i in range(args.iters + 1):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = (unet(x, t, encoder_hidden_states=ctx).float() - x).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i:
                    times.append(time.perf_counter() - start)
            row[f"step_s_{precision}"] = statistics.median(times)
        rows.append(row)
        print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unet_step_cost.json").write_text(json.dumps({"batch": args.batch, "rows": rows}, indent=2))
    md = ["# Training-step cost of candidate default UNets", "",
          f"`python benchmarks/unet_step_cost.py`: batch {args.batch} of 16x16x4 latents with 77x384 context "
          f"(MiniLM), one layer per block, median of {args.iters} steps (forward, backward, AdamW).", "",
          "| UNet | parameters | fp16 size | s/step fp32 | s/step bf16 | hours per 10k steps (faster) |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        best = min(r["step_s_fp32"], r["step_s_bf16"])
        md.append(f"| {r['name']} | {r['parameters'] / 1e6:.1f} M | {r['fp16_mb']:.1f} MB | {r['step_s_fp32']:.2f} | "
                  f"{r['step_s_bf16']:.2f} | {best * 10_000 / 3600:.1f} |")
    md.append("")
    (args.out / "unet_step_cost.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
