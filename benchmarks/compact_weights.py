"""Compact weights side by side with bf16: what the denoiser holds, the resident peak of sampling, seconds
per step, and how far the images move.

1. SD 1.5's UNet at real size (860M parameters, random weights, seed 0) at 512 x 512: for each storage (bf16,
   fp8 e4m3fn scaled, GGUF Q8_0, Q5_0, Q4_0) a fresh process builds the model, stores its UNet so
   (nn/compact.compact_module: what --weights-dtype fp8 and a converted .gguf hold), and samples 4 Euler steps
   with guidance under bf16 autocast, then decodes. *seconds/step*: the mean of steps 2 to 4; *peak*: the
   resident high-water mark above the model's load; *PSNR*: the image against bf16's (the same noise).
2. The shipped model, ShapesEval (--per-category prompts per category, 25 steps) in each storage.

    python benchmarks/compact_weights.py   # writes docs/benchmarks/compact_weights.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
STORAGES = ["bf16", "F8_E4M3", "Q8_0", "Q5_0", "Q4_0"]
LABELS = {"bf16": "bf16", "F8_E4M3": "fp8 e4m3fn (scaled)", "Q8_0": "GGUF Q8_0", "Q5_0": "GGUF Q5_0",
          "Q4_0": "GGUF Q4_0"}

CHILD = r'''
import json, sys, time
from pathlib import Path
import numpy as np
import torch
from imagine.io.model_folder import DiffusionModel, DiffusionSpec
from imagine.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig
from imagine.nn import compact
from imagine.pipelines import generate as g

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

storage, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
unet = UNet2DConditionModel(UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8)).eval()
vae = AutoencoderKL(VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                              scaling_factor=0.18215)).eval()
with torch.no_grad():
    for p in unet.parameters():  # random weights at a scale that keeps activations finite through the UNet
        if p.ndim > 1:
            p.mul_(0.5)
if storage == "bf16":
    unet.to(torch.bfloat16)
else:
    compact.compact_module(unet, storage)
held = compact.weight_bytes(unet)
spec = DiffusionSpec(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, image_size=512, latent=True,
                     text_encoder="minilm")
model = DiffusionModel(unet, vae, spec, Path("sd15-random"), arch="sd1")
context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
cond = {"encoder_hidden_states": context, "encoder_attention_mask": torch.ones(1, 77, dtype=torch.bool)}
uncond = {"encoder_hidden_states": torch.zeros_like(context), "encoder_attention_mask": cond["encoder_attention_mask"]}
base = rss()
times = []
last = [time.perf_counter()]
def callback(info):
    now = time.perf_counter()
    times.append(now - last[0])
    last[0] = now
with torch.no_grad():
    images = g.sample(model, [0], steps=4, sampler="euler", schedule=None, cond=cond, uncond=uncond, cfg_scale=5.0,
                      latent_hw=(64, 64), callback=callback, precision="bf16")
np.save(out, ((images[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
print(json.dumps({"storage": storage, "held": held, "seconds_per_step": sum(times[1:]) / len(times[1:]),
                  "peak_above_load": hwm() - base, "packed": compact.describe(unet)}))
'''


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(float) - b.astype(float)) ** 2).mean()
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def shapes_eval(storages: list[str], per_category: int) -> dict:
    from imagine.evaluation.shapes_eval import evaluate_model, prompt_set
    from imagine.nn import compact
    from imagine.pipelines.generate import Settings
    from imagine.pipelines.request import load_text_model
    from imagine.weights import default_model

    prompts = prompt_set(per_category, 0, "template")
    out = {}
    for storage in storages:
        model, encoder = load_text_model(default_model())
        if storage == "bf16":
            model.unet.to(torch.bfloat16)
        else:
            compact.compact_module(model.unet, storage)
        settings = Settings(precision="bf16").with_model_defaults(model.spec, None, None, None)
        report = evaluate_model(model, encoder, prompts, settings)
        out[storage] = {"overall": report.overall, "stderr": report.stderr(), "packed": compact.describe(model.unet),
                        "held": compact.weight_bytes(model.unet)}
        print(storage, out[storage], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the table from the saved JSON")
    args = parser.parse_args()
    if args.markdown_only:
        return write_markdown(json.loads((args.out / "compact_weights.json").read_text()), args.out)
    tmp = args.out / "compact_weights_images"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for storage in STORAGES:
        run = subprocess.run([sys.executable, "-c", CHILD, storage, str(tmp / f"{storage}.npy")], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        row = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    reference = np.load(tmp / "bf16.npy")
    for row in rows:
        row["psnr_vs_bf16"] = None if row["storage"] == "bf16" else round(psnr(np.load(tmp / f"{row['storage']}.npy"),
                                                                                reference), 2)
    for f in tmp.glob("*.npy"):
        f.unlink()
    tmp.rmdir()
    evals = shapes_eval(STORAGES, args.per_category)
    report = {"sd15": rows, "shapes_eval": evals, "per_category": args.per_category}
    (args.out / "compact_weights.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, args.out)


def write_markdown(report: dict, out: Path) -> None:
    mb = 2**20
    lines = ["# Compact weights against bf16", "",
             "`python benchmarks/compact_weights.py`: SD 1.5's UNet at real size (random weights), 512 x 512, 4 Euler "
             "steps with guidance under bf16 autocast, a fresh process per row; then the shipped model's ShapesEval "
             f"({report['per_category']} prompts per category, 25 steps) in each storage.", "",
             "| storage | SD 1.5 UNet holds | s / step | resident peak above load | PSNR vs bf16 | "
             "shipped model holds | ShapesEval |", "|---|---|---|---|---|---|---|"]
    for row in report["sd15"]:
        e = report["shapes_eval"][row["storage"]]
        distance = "reference" if row["psnr_vs_bf16"] is None else f"{row['psnr_vs_bf16']:.1f} dB"
        lines.append(f"| {LABELS[row['storage']]} | {row['held'] / mb:.0f} MB | {row['seconds_per_step']:.2f} | "
                     f"{row['peak_above_load'] / mb:.0f} MB | {distance} | {e['held'] / mb:.1f} MB | "
                     f"{e['overall']:.3f} +- {e['stderr']['overall']:.3f} |")
    (out / "compact_weights.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
