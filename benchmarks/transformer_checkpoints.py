"""The transformer families at real size on this machine: SD 3.5 Medium's loading memory and sampling speed, and
Flux.1's blocks, beside diffusers on the same weights.

With full-size random weights (the figures are about memory and arithmetic, not image quality):

- SD 3.5 Medium (MMDiT-X, 2.5B parameters) written as Stability ships it: the transformer and the VAE in one
  bf16 file, CLIP-L and CLIP-G as separate files (``text_encoders/``). Loading: peak RSS of a fresh process
  while imagine reads the whole model (``load_single_file`` with ``modules=``: the transformer to bf16, the VAE
  and CLIPs to fp32, as generation holds them) and the transformer alone, against the bytes it ends up holding;
  diffusers' ``SD3Transformer2DModel.from_single_file`` on the same file for comparison.
- SD 3.5 Medium speed: seconds per sampling step at 1024x1024, batch 1 with CFG (the transformer on 2 rows,
  4096 image tokens and 333 text tokens), bf16 weights, ours and diffusers' on the same weights and inputs, in
  interleaved rounds (median of per-round ratios); GFLOP/s against the measured bf16 matmul peak.
- Flux.1 (12B: 24 GB in bf16, more than this machine's memory) as one double-stream and one single-stream
  block at full width (3072, 24 heads) over 4096 image and 512 text tokens: seconds per block, ours and
  diffusers', and the step projected to 19 + 38 blocks (batch 1: [dev] and [schnell] run without CFG).

    python benchmarks/transformer_checkpoints.py [--rounds 2] [--work DIR]
    # writes docs/benchmarks/transformer_checkpoints.{json,md}

Needs diffusers (the test extra); about 8 GB of disk for the weight files (in --work, made once and reused).
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
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
SD3_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=16, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
FLUX_BLOCKS = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))


def _child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (clean RSS); it prints one JSON line last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=5400,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


_RSS = """
import resource, json, time
def rss_peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def rss_now_mb():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
"""


def write_sd35(work: Path) -> dict[str, Path]:
    """SD 3.5 Medium's transformer and VAE as one bf16 file in Stability's layout, CLIP-L and CLIP-G as fp16
    files beside it in text_encoders/ (made once, reused)."""
    paths = {"model": work / "sd3.5_medium.safetensors", "clip_l": work / "text_encoders" / "clip_l.safetensors",
             "clip_g": work / "text_encoders" / "clip_g.safetensors"}
    if all(p.exists() for p in paths.values()):
        return paths
    code = f"""
import torch
from pathlib import Path
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from imagine.io import sd3_files
from imagine.io.checkpoint import atomic_save_safetensors
from imagine.io.ldm_keys import vae_map, write_mapped
from imagine.models import AutoencoderKL, VAEConfig
from imagine.models.mmdit import MMDiTConfig, SD3Transformer2DModel
torch.manual_seed(0)
paths = {{k: Path(v) for k, v in {({k: str(v) for k, v in paths.items()})!r}.items()}}
torch.set_default_dtype(torch.bfloat16)
net = SD3Transformer2DModel(MMDiTConfig(**{SD35_MEDIUM!r}))
for p in net.parameters():  # adaLN-Zero starts at zero: random everywhere, so every block does real work
    p.data.normal_(0, 0.02)
state = write_mapped(net.state_dict(), sd3_files.transformer_map(net.config))
del net
torch.set_default_dtype(torch.float32)
vae = AutoencoderKL(VAEConfig(**{SD3_VAE!r}))
with torch.device("meta"):
    keys = list(AutoencoderKL(vae.config).state_dict())
state.update({{"first_stage_model." + k: v.to(torch.bfloat16) for k, v in
              write_mapped(vae.state_dict(), vae_map(keys, vae.config, "")).items()}})
atomic_save_safetensors(state, paths["model"], {{"format": "pt"}})
del state
for name, cfg in (("clip_l", {CLIP_L!r}), ("clip_g", {CLIP_G!r})):
    clip = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    atomic_save_safetensors({{k: v.half() for k, v in clip.state_dict().items() if not k.endswith("position_ids")}},
                            paths[name], {{"format": "pt"}})
print("{{}}")
"""
    _child(code)
    return paths


def load_memory(paths: dict[str, Path], what: str) -> dict:
    """Peak RSS of one load in a fresh process, against the bytes of the weights it holds afterwards."""
    file = str(paths["model"])
    if what == "imagine-model":
        load = (f"from imagine.io.stable_diffusion import load_single_file\n"
                f"m = load_single_file({file!r}, dtype=torch.bfloat16, modules=[{str(paths['clip_l'])!r}, "
                f"{str(paths['clip_g'])!r}])\n"
                "mods = [m.unet, m.vae, m.text_encoder.model_1, m.text_encoder.model_2]")
    elif what == "imagine-transformer":
        load = (f"from imagine.io import sd3_files\n"
                f"from imagine.io.checkpoint import open_weights, build_and_fill\n"
                f"from imagine.io.ldm_keys import read_mapped\n"
                f"from imagine.models.mmdit import SD3Transformer2DModel\n"
                f"w, _ = open_weights({file!r})\n"
                f"p = sd3_files.transformer_prefix(w)\n"
                f"cfg = sd3_files.config_from_original({{k[len(p):]: r for k, r in w.items() if k.startswith(p)}})\n"
                f"net = build_and_fill(lambda: SD3Transformer2DModel(cfg), "
                f"read_mapped(w, sd3_files.transformer_map(cfg, p), {file!r}), {file!r}, torch.bfloat16)\n"
                "mods = [net]")
    else:  # diffusers: from_single_file with the config written locally (nothing can be fetched here)
        load = (f"from diffusers import SD3Transformer2DModel as D\n"
                f"net = D.from_single_file({file!r}, config={str(paths['model'].parent / 'diffusers')!r}, "
                f"subfolder='transformer', torch_dtype=torch.bfloat16, local_files_only=True)\n"
                "mods = [net]")
    code = _RSS + f"""
import torch
import imagine.io.stable_diffusion, diffusers, transformers  # imports before the baseline
base = rss_now_mb()
start = time.perf_counter()
{load}
with torch.no_grad():  # touch every weight: memory-mapped pages count only once they are read
    tensors = [t for mod in mods for t in (*mod.parameters(), *mod.buffers())]
    checksum = sum(float(c.sum(dtype=torch.float32)) for t in tensors for c in t.flatten().split(1 << 22))
seconds = time.perf_counter() - start
weights = sum(t.numel() * t.element_size() for t in tensors) / 2**20  # buffers too: SD3's positions are 432 MB
print(json.dumps({{"baseline_mb": base, "peak_mb": rss_peak_mb(), "after_mb": rss_now_mb(), "weights_mb": weights,
                  "seconds": seconds}}))
"""
    row = _child(code)
    row["peak_over_weights"] = (row["peak_mb"] - row["baseline_mb"]) / row["weights_mb"]
    return row


_PEAK = """
def peak():
    n = 2048
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    for _ in range(2): a @ b
    start = time.perf_counter()
    for _ in range(5): a @ b
    return 5 * 2 * n**3 / (time.perf_counter() - start) / 1e9
"""


def sd35_speed(paths: dict[str, Path], rounds: int) -> dict:
    """Seconds per CFG step at 1024 px (the transformer on 2 rows), ours and diffusers', bf16 weights."""
    code = _RSS + _PEAK + f"""
import statistics, torch
from torch.utils.flop_counter import FlopCounterMode
from diffusers import SD3Transformer2DModel as D
from imagine.io.stable_diffusion import load_single_file
m = load_single_file({str(paths['model'])!r}, dtype=torch.bfloat16, modules=[{str(paths['clip_l'])!r},
                     {str(paths['clip_g'])!r}])
ours = m.unet
del m
theirs = D.from_config(D.load_config({str(paths['model'].parent / 'diffusers')!r}, subfolder="transformer"))
theirs.load_state_dict(ours.state_dict())
theirs = theirs.to(torch.bfloat16).eval()
x = torch.randn(2, 16, 128, 128, dtype=torch.bfloat16)
t = torch.tensor([500.0, 500.0])
ctx = torch.randn(2, 333, 4096, dtype=torch.bfloat16)  # 77 + 256 tokens: SD3 without T5 pads T5's part with zeros
pooled = torch.randn(2, 2048, dtype=torch.bfloat16)
def run_ours():
    return ours(x, t, ctx, pooled)
def run_theirs():
    return theirs(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
with torch.no_grad():
    with FlopCounterMode(display=False) as counter:
        a = run_ours()
    flops = counter.get_total_flops()
    b = run_theirs()
    diff = float((a.float() - b.float()).abs().max())
    times = {{"imagine": [], "diffusers": []}}
    for r in range({rounds}):
        order = (("imagine", run_ours), ("diffusers", run_theirs))
        for impl, fn in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter(); fn(); times[impl].append(time.perf_counter() - start)
p = peak()
ratios = [o / d for o, d in zip(times["imagine"], times["diffusers"])]
rows = [{{"impl": impl, "s_per_step": statistics.median(v), "gflops": flops / statistics.median(v) / 1e9,
          "of_peak": flops / statistics.median(v) / 1e9 / p}} for impl, v in times.items()]
print(json.dumps({{"flops_per_step": flops, "peak_gflops": p, "rows": rows, "ours_over_diffusers":
                  statistics.median(ratios), "max_abs_diff": diff, "peak_rss_mb": rss_peak_mb(), "times": times}}))
"""
    return _child(code)


def flux_blocks(rounds: int) -> dict:
    """One double- and one single-stream Flux block at full width, ours and diffusers', timed by hooks inside a
    1 + 1 block model over 1024 px (4096 image tokens) and 512 text tokens; the step projected to 19 + 38."""
    code = _RSS + _PEAK + f"""
import statistics, torch
from diffusers import FluxTransformer2DModel as D
from imagine.models.flux import FluxConfig, FluxTransformer2DModel, latent_ids
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
cfg = FluxConfig(**{FLUX_BLOCKS!r})
ours = FluxTransformer2DModel(cfg).eval()
for p in ours.parameters():
    p.data.normal_(0, 0.02)
theirs = D(**{FLUX_BLOCKS!r}).eval()
theirs.load_state_dict(ours.state_dict())
torch.set_default_dtype(torch.float32)
tokens = torch.randn(1, 4096, 64, dtype=torch.bfloat16)
ctx = torch.randn(1, 512, 4096, dtype=torch.bfloat16)
pooled = torch.randn(1, 768, dtype=torch.bfloat16)
t, guidance = torch.tensor([0.5]), torch.tensor([3.5])
img_ids, txt_ids = latent_ids(128, 128), torch.zeros(512, 3)
spent = {{}}
def timed(model, impl):
    for kind, block in (("double", model.transformer_blocks[0]), ("single", model.single_transformer_blocks[0])):
        def pre(_m, _a, _k=None, kind=kind):
            spent[(impl, kind, "start")] = time.perf_counter()
        def post(_m, _a, _o, kind=kind):
            spent.setdefault((impl, kind), []).append(time.perf_counter() - spent[(impl, kind, "start")])
        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
timed(ours, "imagine"); timed(theirs, "diffusers")
def run_ours():
    return ours(tokens, t, ctx, pooled, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance)
def run_theirs():
    return theirs(hidden_states=tokens, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                  img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
totals = {{"imagine": [], "diffusers": []}}
with torch.no_grad():
    a, b = run_ours(), run_theirs()
    diff = float((a.float() - b.float()).abs().max())
    spent.clear()
    for r in range({rounds}):
        order = (("imagine", run_ours), ("diffusers", run_theirs))
        for impl, fn in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter(); fn(); totals[impl].append(time.perf_counter() - start)
rows = []
for impl in ("imagine", "diffusers"):
    d, s, whole = (statistics.median(spent[(impl, "double")]), statistics.median(spent[(impl, "single")]),
                   statistics.median(totals[impl]))
    rows.append({{"impl": impl, "double_s": d, "single_s": s, "rest_s": whole - d - s,
                  "projected_step_s": whole - d - s + 19 * d + 38 * s}})
block_params = {{"double": sum(p.numel() for p in ours.transformer_blocks[0].parameters()),
                 "single": sum(p.numel() for p in ours.single_transformer_blocks[0].parameters())}}
print(json.dumps({{"rows": rows, "max_abs_diff": diff, "peak_gflops": peak(), "block_params": block_params,
                  "full_params": 19 * block_params["double"] + 38 * block_params["single"],
                  "peak_rss_mb": rss_peak_mb()}}))
"""
    return _child(code)


def write_diffusers_config(work: Path) -> None:
    """diffusers' from_single_file needs the model's config; nothing can be fetched here, so it is written."""
    folder = work / "diffusers" / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    config = {**SD35_MEDIUM, "dual_attention_layers": list(SD35_MEDIUM["dual_attention_layers"])}
    (folder / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **config}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imagine-transformer-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--only", choices=("memory", "speed", "flux"), action="append",
                        help="run only these parts (repeatable); the others are kept from the last JSON")
    args = parser.parse_args()
    parts = args.only or ["memory", "speed", "flux"]
    out_json = args.out / "transformer_checkpoints.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}
    args.work.mkdir(parents=True, exist_ok=True)
    if "memory" in parts or "speed" in parts:
        paths = write_sd35(args.work)
        write_diffusers_config(args.work)
        results["file_mb"] = {k: p.stat().st_size / 2**20 for k, p in paths.items()}
    if "memory" in parts:
        results["memory"] = []
        for what in ("imagine-transformer", "diffusers-transformer", "imagine-model"):
            try:
                row = load_memory(paths, what)
            except RuntimeError as err:
                row = {"error": str(err)[-600:]}
            results["memory"].append({"what": what, **row})
            print(results["memory"][-1], flush=True)
    if "speed" in parts:
        results["speed"] = sd35_speed(paths, args.rounds)
        print(results["speed"], flush=True)
    if "flux" in parts:
        results["flux"] = flux_blocks(args.rounds)
        print(results["flux"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2))
    (args.out / "transformer_checkpoints.md").write_text(report(results, args.rounds))
    print(report(results, args.rounds))


def report(results: dict, rounds: int) -> str:
    m = results["machine"]
    lines = ["# SD 3.5 Medium and Flux.1 at real size on this CPU", "",
             f"`python benchmarks/transformer_checkpoints.py` on {m['cpu']}, {m['threads']} threads, torch "
             f"{m['torch']}; random full-size weights, so the figures are about memory and arithmetic, not image "
             "quality.", ""]
    if "memory" in results:
        sizes = results.get("file_mb", {})
        lines += ["## SD 3.5 Medium (2.5B): loading", "",
                  f"Files: transformer + VAE {sizes.get('model', 0):.0f} MB (bf16), "
                  f"CLIP-L {sizes.get('clip_l', 0):.0f} MB, "
                  f"CLIP-G {sizes.get('clip_g', 0):.0f} MB (fp16). The whole model holds the transformer in bf16 and "
                  "the VAE and CLIPs in fp32 (as generation runs them), so it holds more bytes than the files.", "",
                  "| what | weights and buffers held (MB) | peak RSS over baseline (MB) | peak / weights | s |",
                  "|---|---:|---:|---:|---:|"]
        labels = {"imagine-transformer": "imagine, the transformer alone",
                  "diffusers-transformer": "diffusers `from_single_file`, the transformer",
                  "imagine-model": "imagine `load_single_file`, the whole model (+ 2 text encoder files)"}
        for row in results["memory"]:
            if "error" in row:
                lines.append(f"| {labels[row['what']]} | failed: {row['error'][-200:].strip()} | | | |")
                continue
            lines.append(f"| {labels[row['what']]} | {row['weights_mb']:.0f} | "
                         f"{row['peak_mb'] - row['baseline_mb']:.0f} | {row['peak_over_weights']:.2f} | "
                         f"{row['seconds']:.1f} |")
        lines.append("")
    if "speed" in results:
        sp = results["speed"]
        lines += ["## SD 3.5 Medium: one sampling step at 1024x1024, batch 1 with CFG (2 rows)", "",
                  f"{sp['flops_per_step'] / 1e12:.1f} TFLOP per step (torch's FLOP counter); bf16 weights and "
                  f"inputs; median of {rounds} interleaved rounds; the two outputs differ by at most "
                  f"{sp['max_abs_diff']:.2g} (bf16 arithmetic); bf16 matmul peak {sp['peak_gflops']:.0f} GFLOP/s.", "",
                  "| transformer | s / step | GFLOP/s | of peak |", "|---|---:|---:|---:|"]
        for r in sp["rows"]:
            lines.append(f"| {r['impl']} | {r['s_per_step']:.1f} | {r['gflops']:.0f} | {r['of_peak']:.0%} |")
        lines += ["", f"ours / diffusers: {sp['ours_over_diffusers']:.2f} (median of per-round ratios); peak RSS "
                  f"{sp['peak_rss_mb']:.0f} MB with both transformers loaded.", ""]
    if "flux" in results:
        fx = results["flux"]
        lines += ["## Flux.1 (12B): one double- and one single-stream block at 1024x1024, batch 1", "",
                  f"A block pair at full width (double {fx['block_params']['double'] / 1e6:.0f}M parameters, single "
                  f"{fx['block_params']['single'] / 1e6:.0f}M; 19 + 38 of them: {fx['full_params'] / 1e9:.1f}B) over "
                  "4096 image and 512 text tokens, bf16; the step projected as 19 double + 38 single blocks + the "
                  f"embeddings and final layer. Outputs differ by at most {fx['max_abs_diff']:.2g}.", "",
                  "| transformer | double block (s) | single block (s) | rest (s) | projected s / step |",
                  "|---|---:|---:|---:|---:|"]
        for r in fx["rows"]:
            lines.append(f"| {r['impl']} | {r['double_s']:.2f} | {r['single_s']:.2f} | {r['rest_s']:.2f} | "
                         f"{r['projected_step_s']:.0f} |")
        lines += ["", "The whole 12B transformer needs 24 GB in bf16, more than this machine has; it runs whole once "
                  "compact storage (fp8, GGUF) lands with the memory issue.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"took {time.time() - start:.0f} s", file=sys.stderr)
