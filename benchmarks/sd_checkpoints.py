"""Real-size Stable Diffusion on this machine: loading memory and sampling speed, beside diffusers on the
same weights.

With full-size random weights (SD 1.5's UNet, 860M parameters; SDXL's, 2.6B, with --sdxl):

- loading: peak RSS of a fresh process while ``imagine.io.networks.load_unet`` reads the UNet (fp32 file to
  fp32, fp16 file to fp32 and to bf16), against the bytes of the weights it ends up holding; diffusers'
  ``UNet2DConditionModel.from_pretrained`` on the same folder for comparison;
- speed: seconds per sampling step at batch 1 with CFG (the UNet on a batch of 2: prompt and negative) at
  512x512 (1024 for SDXL), ours and diffusers' UNet on the same weights and inputs, fp32 and bf16
  autocast, in interleaved rounds (median of per-round ratios); GFLOP/s achieved against the measured
  matmul peak at that precision; peak RSS of the process.

    python benchmarks/sd_checkpoints.py [--sdxl] [--rounds 3]   # writes docs/benchmarks/sd_checkpoints.{json,md}

Needs diffusers (the test extra) for the comparison; about 10 GB of disk for the weight files (in --work).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SD15 = dict(sample_size=64)
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)


def _child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (clean RSS); it prints one JSON line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_weights(arch: str, work: Path) -> dict[str, Path]:
    """Random full-size UNet weights as diffusers folders, fp32 and fp16 (made once, reused)."""
    folders = {dtype: work / f"{arch}-unet-{dtype}" for dtype in ("fp32", "fp16")}
    if all((f / "diffusion_pytorch_model.safetensors").exists() for f in folders.values()):
        return folders
    code = f"""
import json, torch
from pathlib import Path
from imagine.io.checkpoint import atomic_save_safetensors, atomic_write_bytes
from imagine.models import UNet2DConditionModel, UNetConfig
from imagine.io.networks import diffusers_config
torch.manual_seed(0)
unet = UNet2DConditionModel(UNetConfig(**{(SD15 if arch == 'sd15' else SDXL)!r}))
config = {{"_class_name": "UNet2DConditionModel", **diffusers_config(unet)}}
for dtype, folder in {{k: Path(v) for k, v in {({k: str(v) for k, v in folders.items()})!r}.items()}}.items():
    state = {{k: v.to(torch.float16 if dtype == "fp16" else torch.float32) for k, v in unet.state_dict().items()}}
    atomic_save_safetensors(state, folder / "diffusion_pytorch_model.safetensors", {{"format": "pt"}})
    atomic_write_bytes(folder / "config.json", json.dumps(config).encode())
print("{{}}")
"""
    _child(code)
    return folders


_RSS = """
import resource, json, time
def rss_peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def rss_now_mb():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
"""


def load_memory(folder: Path, impl: str, dtype: str) -> dict:
    """Peak RSS of loading one UNet in a fresh process, against the bytes of the weights it holds."""
    load = (f"from imagine.io.networks import load_unet; unet = load_unet({str(folder)!r}, dtype=torch.{dtype})"
            if impl == "imagine" else
            f"from diffusers import UNet2DConditionModel as U; unet = U.from_pretrained({str(folder)!r}, "
            f"torch_dtype=torch.{dtype})")
    code = _RSS + f"""
import torch
import imagine.io.networks, diffusers  # imports before the baseline
base = rss_now_mb()
start = time.perf_counter()
{load}
with torch.no_grad():  # touch every weight: memory-mapped pages count only once they are read
    checksum = sum(float(p.float().sum()) for p in unet.parameters())
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
print(json.dumps({{"baseline_mb": base, "peak_mb": rss_peak_mb(), "after_mb": rss_now_mb(), "weights_mb": weights,
                  "seconds": seconds}}))
"""
    row = _child(code)
    row["peak_over_weights"] = (row["peak_mb"] - row["baseline_mb"]) / row["weights_mb"]
    return row


def speed(folder: Path, arch: str, rounds: int, weights: str = "float32", precisions=("fp32", "bf16")) -> dict:
    """Seconds per CFG step (UNet on batch 2), ours and diffusers', at each precision, interleaved rounds.
    ``weights``: the dtype both UNets hold (SDXL in fp32 twice would not fit in 24 GB: bfloat16)."""
    size = 64 if arch == "sd15" else 128
    code = _RSS + f"""
import statistics, torch
from torch.utils.flop_counter import FlopCounterMode
from diffusers import UNet2DConditionModel as U
from imagine.io.networks import load_unet
ours = load_unet({str(folder)!r}, dtype=torch.{weights})
theirs = U.from_pretrained({str(folder)!r}, torch_dtype=torch.{weights}).eval()
dt = torch.{weights}
x = torch.randn(2, 4, {size}, {size}, dtype=dt)
t = torch.tensor([500.0, 500.0])
ctx = torch.randn(2, 77, ours.config.cross_attention_dim, dtype=dt)
extra = {{}}
if ours.config.addition_embed_type:
    extra = {{"text_embeds": torch.randn(2, 1280, dtype=dt),
              "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}}
def run_ours():
    return ours(x, t, ctx, **extra)
def run_theirs():
    return theirs(x, t, ctx, added_cond_kwargs=extra or None).sample
with torch.no_grad(), FlopCounterMode(display=False) as counter:
    run_ours()
flops = counter.get_total_flops()
def peak(dtype):
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2): a @ b
    start = time.perf_counter()
    for _ in range(5): a @ b
    return 5 * 2 * n**3 / (time.perf_counter() - start) / 1e9
peaks = {{"fp32": peak(torch.float32), "bf16": peak(torch.bfloat16)}}
precisions = {tuple(precisions)!r}
times = {{(impl, p): [] for impl in ("imagine", "diffusers") for p in precisions}}
with torch.no_grad():
    for p in precisions:
        with torch.autocast("cpu", torch.bfloat16, enabled=p == "bf16"):
            run_ours(); run_theirs()  # warm-up
    for r in range({rounds}):
        for p in precisions:
            with torch.autocast("cpu", torch.bfloat16, enabled=p == "bf16"):
                order = (("imagine", run_ours), ("diffusers", run_theirs))
                for impl, fn in (order if r % 2 == 0 else order[::-1]):
                    start = time.perf_counter(); fn(); times[(impl, p)].append(time.perf_counter() - start)
rows = []
for p in precisions:
    ratios = [o / d for o, d in zip(times[("imagine", p)], times[("diffusers", p)])]
    for impl in ("imagine", "diffusers"):
        s = statistics.median(times[(impl, p)])
        rows.append({{"impl": impl, "precision": p, "s_per_step": s, "gflops": flops / s / 1e9,
                      "peak_gflops": peaks[p], "of_peak": flops / s / 1e9 / peaks[p],
                      "ours_over_diffusers": statistics.median(ratios)}})
print(json.dumps({{"flops_per_step": flops, "rows": rows, "peak_rss_mb": rss_peak_mb(), "weights": "{weights}",
                  "times": {{f"{{k[0]}}-{{k[1]}}": v for k, v in times.items()}}}}))
"""
    return _child(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdxl", action="store_true", help="also SDXL's UNet (about 40 GB of disk and RAM headroom)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imagine-sd-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__}, "models": {}}
    for arch in ["sd15"] + (["sdxl"] if args.sdxl else []):
        folders = write_weights(arch, args.work)
        memory = []
        for impl, file_dtype, dtype in (("imagine", "fp32", "float32"), ("imagine", "fp16", "float32"),
                                        ("imagine", "fp16", "bfloat16"), ("diffusers", "fp32", "float32"),
                                        ("diffusers", "fp16", "float32")):
            row = load_memory(folders[file_dtype], impl, dtype)
            memory.append({"impl": impl, "file": file_dtype, "compute": dtype, **row})
            print(arch, memory[-1], flush=True)
        # fp32 weights (bf16 rows cast them every call, as autocast does), then bf16 weights (what
        # `--precision bf16` loads); two SDXL UNets in fp32 (10 GB each) do not fit beside the activations
        timings = [speed(folders["fp32"], arch, args.rounds)] if arch == "sd15" else []
        timings.append(speed(folders["fp16"], arch, args.rounds, "bfloat16", ("bf16",)))
        results["models"][arch] = {"memory": memory, "speed": timings}
        print(arch, [t["rows"] for t in timings], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sd_checkpoints.json").write_text(json.dumps(results, indent=2))
    lines = ["# Stable Diffusion at real size on this CPU", "",
             f"`python benchmarks/sd_checkpoints.py{' --sdxl' if args.sdxl else ''}` on {results['machine']['cpu']}, "
             f"{results['machine']['threads']} threads, torch {results['machine']['torch']}; random full-size "
             "weights, so the figures are about memory and arithmetic, not image quality.", ""]
    for arch, data in results["models"].items():
        name = "SD 1.5 UNet (860M parameters)" if arch == "sd15" else "SDXL UNet (2.6B parameters)"
        lines += [f"## {name}: loading", "",
                  "| loader | file | computes in | weights (MB) | peak RSS over baseline (MB) | peak / weights | s |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for m in data["memory"]:
            lines.append(f"| {m['impl']} | {m['file']} | {m['compute']} | {m['weights_mb']:.0f} | "
                         f"{m['peak_mb'] - m['baseline_mb']:.0f} | {m['peak_over_weights']:.2f} | {m['seconds']:.1f} |")
        px = 512 if arch == "sd15" else 1024
        first = data["speed"][0]
        lines += ["", f"## {name}: one sampling step at {px}x{px}, batch 1 with CFG (UNet on 2 rows)", "",
                  f"{first['flops_per_step'] / 1e9:.0f} GFLOP per step (torch's FLOP counter); median of "
                  f"{args.rounds} interleaved rounds; bf16 rows run under bf16 autocast.", "",
                  "| UNet | weights | precision | s / step | GFLOP/s | matmul peak (GFLOP/s) | of peak | "
                  "ours / diffusers | peak RSS (MB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for sp in data["speed"]:
            held = "fp32" if sp["weights"] == "float32" else "bf16"
            for r in sp["rows"]:
                ratio = f"{r['ours_over_diffusers']:.2f}" if r["impl"] == "imagine" else ""
                lines.append(f"| {r['impl']} | {held} | {r['precision']} | {r['s_per_step']:.2f} | {r['gflops']:.0f} "
                             f"| {r['peak_gflops']:.0f} | {r['of_peak']:.0%} | {ratio} | {sp['peak_rss_mb']:.0f} |")
        lines.append("")
    (args.out / "sd_checkpoints.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"took {time.time() - start:.0f} s", file=sys.stderr)
