"""Text-to-image speed on this machine, and side by side with diffusers on the same weights.

1. Cold start: `imagine generate PROMPT` in a fresh process (imports, model and text encoder loading,
   sampling, PNG), wall time and peak RSS.
2. Steady state: images per second at batch 1 and 8 for each of our modes (fp32 eager, bf16 autocast,
   compiled, ONNX Runtime), and the UNet's achieved GFLOP/s (its FLOPs per row
   counted by torch's FlopCounterMode) against the matmul peak measured here in the same precision.
3. diffusers: its UNet2DConditionModel and AutoencoderKL holding our weights, its DPMSolverMultistep
   scheduler (DPM++ 2M, trailing spacing, v-prediction), the same prompt embeddings, noise, steps and
   guidance, in the loop its StableDiffusionPipeline runs, eager and with its UNet compiled. Time per
   image (interleaved rounds, medians) and max pixel difference.

    python benchmarks/t2i_speed.py            # writes docs/benchmarks/t2i_speed.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imagine.io.model_folder import load_model_folder
from imagine.io.networks import diffusers_config
from imagine.models.text_encoders import load_text_encoder
from imagine.pipelines.generate import Settings, txt2img
from imagine.pipelines.unconditional import to_uint8
from imagine.weights import default_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle above a blue square"


def cold_start(model_dir: Path, runs: int) -> dict:
    times, rss = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
            done = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "imagine", "generate", PROMPT,
                                   "--model", str(model_dir), "--out", out], capture_output=True, text=True)
            times.append(time.perf_counter() - started)
            if done.returncode:
                raise RuntimeError(done.stderr)
            rss.append(int(done.stdout.strip().splitlines()[-1]) / 1024)
    return {"seconds": min(times), "seconds_all": times, "peak_rss_mb": max(rss)}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - started) / 1e9


def unet_flops(model, context, mask, rows: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    h = model.spec.image_size // 2 ** (len(model.vae.config.block_out_channels) - 1)
    x = torch.randn(rows, model.unet.config.in_channels, h, h)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.unet(x, torch.full((rows,), 500), encoder_hidden_states=context[:rows],
                   encoder_attention_mask=mask[:rows])
    return counter.get_total_flops()


def diffusers_loop(model, encoder, steps: int, cfg: float, seeds: list[int], compile: bool = False):
    """A function making len(seeds) images (N, C, H, W) in [-1, 1] with diffusers' modules and scheduler in
    the loop StableDiffusionPipeline runs (latents for all images in one batch, CFG as a doubled batch).
    compile: torch.compile its UNet too, as diffusers' docs suggest, for the like-for-like comparison."""
    import diffusers

    unet = diffusers.UNet2DConditionModel(**diffusers_config(model.unet))
    unet.load_state_dict(model.unet.state_dict())
    vae = diffusers.AutoencoderKL(**diffusers_config(model.vae))
    vae.load_state_dict(model.vae.state_dict())
    unet, vae = unet.eval(), vae.eval()
    if compile:
        unet = torch.compile(unet, dynamic=False)
    spec = model.spec
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=spec.num_train_timesteps, beta_schedule=spec.schedule, beta_start=spec.beta_start,
        beta_end=spec.beta_end, prediction_type="v_prediction" if spec.prediction == "v" else "epsilon",
        timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2)
    n = len(seeds)
    text = encoder.encode([""] * n + [PROMPT] * n)  # (uncond, cond), as the pipeline concatenates them
    h = spec.image_size // model.vae.config.downscale
    noise = torch.stack([torch.randn((model.vae.config.latent_channels, h, h),
                                     generator=torch.Generator().manual_seed(s)) for s in seeds])

    def run():
        scheduler.set_timesteps(steps)
        latents = noise * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                out = unet(inp, t, encoder_hidden_states=text.context, encoder_attention_mask=text.mask).sample
                uncond, cond = out.chunk(2)
                latents = scheduler.step(uncond + cfg * (cond - uncond), t, latents).prev_sample
            sf, shift = model.vae.config.scaling_factor, model.vae.config.shift_factor
            return vae.decode(latents / sf + shift).sample.clamp(-1, 1)

    return run


MODES = {  # our modes, all batch invariant: (precision, compile, backend)
    "default": ("fp32", False, "torch"),
    "bf16": ("bf16", False, "torch"),
    "compiled": ("fp32", True, "torch"),
    "onnxruntime": ("fp32", False, "onnxruntime"),  # the ONNX export (made on the warm-up call, cached)
}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def side_by_side(model, encoder, steps: int, cfg: float, n: int, reps: int) -> tuple[dict, dict, dict, dict]:
    """Seconds per image for diffusers (eager and compiled) and each of our modes, timed in interleaved
    rounds (every contender once per round), so drifts in this shared machine's speed fall on all alike.
    Returns (median s/image, median over rounds of diffusers' time over ours, first-call seconds, images
    for the parity check). The speed-up is the median of per-round ratios, each from two runs seconds
    apart: steadier here than a ratio of medians, as this machine's speed wanders by 30% over minutes."""
    fns = {"diffusers fp32": diffusers_loop(model, encoder, steps, cfg, list(range(n))),
           "diffusers fp32 compiled": diffusers_loop(model, encoder, steps, cfg, list(range(n)), compile=True)}
    for mode, (precision, compile, backend) in MODES.items():
        s = Settings(prompt=PROMPT, steps=steps, seed=0, n=n, cfg_scale=cfg, sampler="dpmpp_2m",
                     precision=precision, compile=compile, backend=backend)
        fns[f"imagine {mode}"] = lambda s=s: txt2img(model, s, encoder)
    first = {key: _timed(fn) for key, fn in fns.items()}  # warm-up; compiles where asked
    print(f"batch {n} first calls (s):", {k: round(v, 1) for k, v in first.items()}, flush=True)
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            times[key].append(_timed(fn))
    images = {key: fns[key]() for key in ("diffusers fp32", "imagine default", "imagine compiled")}
    ratios = {key: float(np.median(np.array(times["diffusers fp32"]) / np.array(v)))
              for key, v in times.items() if key.startswith("imagine")}
    ratios["imagine compiled over diffusers compiled"] = float(np.median(
        np.array(times["diffusers fp32 compiled"]) / np.array(times["imagine compiled"])))
    return {key: float(np.median(v)) / n for key, v in times.items()}, ratios, first, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "t2i_speed")
    args = parser.parse_args()
    model_dir = args.model or default_model()
    result: dict = {"model": str(model_dir), "steps": args.steps, "prompt": PROMPT, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "reps": args.reps}
    result["cold_start"] = cold_start(model_dir, args.cold_runs)
    print("cold start:", result["cold_start"], flush=True)

    model = load_model_folder(model_dir)
    encoder = load_text_encoder(model.spec.text_encoder)
    text = encoder.encode([PROMPT, ""])
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    result["matmul_peak_gflops"] = peaks
    flops_per_row = unet_flops(model, text.context, text.mask, 2) / 2
    result["unet_gflop_per_row"] = flops_per_row / 1e9
    cfg = 5.0
    side, speedup, speed, first_calls = {}, {}, {}, {}
    for n in (1, 8):
        seconds, ratios, first, images = side_by_side(model, encoder, args.steps, cfg, n, args.reps)
        first_calls[f"batch {n}"] = first
        speedup.update({f"{key}, batch {n}": value for key, value in ratios.items()})
        for key, value in seconds.items():
            side[f"{key}, batch {n}"] = value
            if key.startswith("imagine"):
                mode = key.removeprefix("imagine ")
                achieved = flops_per_row * 2 * args.steps / value / 1e9  # 2 rows (CFG) per step per image
                peak = peaks["bf16" if mode.endswith("bf16") else "fp32"]
                speed[f"{mode} batch {n}"] = {"seconds_per_image": value, "images_per_s": 1 / value,
                                              "unet_gflops": achieved, "fraction_of_matmul_peak": achieved / peak}
        mine, compiled, reference = images["imagine default"], images["imagine compiled"], \
            images["diffusers fp32"]
        result[f"max_abs_diff_float_batch_{n}"] = (mine - reference).abs().max().item()  # images in [-1, 1]
        result[f"max_pixel_diff_uint8_batch_{n}"] = int(np.abs(to_uint8(mine).astype(int)
                                                               - to_uint8(reference).astype(int)).max())
        result[f"compiled_vs_eager_max_pixel_diff_batch_{n}"] = int(np.abs(to_uint8(compiled).astype(int)
                                                                           - to_uint8(mine).astype(int)).max())
        print(f"batch {n}:", {k: round(v, 3) for k, v in seconds.items()}, flush=True)
    result["speed"] = speed
    result["first_call_seconds"] = first_calls
    result["vs_diffusers_seconds_per_image"] = side
    result["speedup_over_diffusers"] = speedup
    result["max_abs_diff_float"] = max(result["max_abs_diff_float_batch_1"], result["max_abs_diff_float_batch_8"])
    result["max_pixel_diff_uint8"] = max(result["max_pixel_diff_uint8_batch_1"], result["max_pixel_diff_uint8_batch_8"])
    print(json.dumps({k: result[k] for k in ("speedup_over_diffusers", "max_abs_diff_float",
                                             "max_pixel_diff_uint8")}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"written: {args.out}.json and .md")


def markdown(r: dict) -> str:
    cold = r["cold_start"]
    lines = ["# Text-to-image speed (shipped shapes model, 64x64, DPM++ 2M, CFG 5)", "",
             f"Command: `python benchmarks/t2i_speed.py` ({r['steps']} steps, {r['cores']} cores, torch {r['torch']}).",
             "", f"Cold start (`imagine generate \"{r['prompt']}\"` in a fresh process, best of "
             f"{len(cold['seconds_all'])}): **{cold['seconds']:.1f} s**, peak RSS {cold['peak_rss_mb']:.0f} MB.", "",
             f"Matmul peak here: fp32 {r['matmul_peak_gflops']['fp32']:.0f} GFLOP/s, bf16 "
             f"{r['matmul_peak_gflops']['bf16']:.0f} GFLOP/s. UNet: {r['unet_gflop_per_row']:.3f} GFLOP per row.", "",
             "| mode | batch | images/s | s/image | UNet GFLOP/s | of matmul peak |", "|---|---|---|---|---|---|"]
    for key, v in r["speed"].items():
        mode, n = key.rsplit(" batch ", 1)
        lines.append(f"| {mode} | {n} | {v['images_per_s']:.2f} | {v['seconds_per_image']:.3f} | "
                     f"{v['unet_gflops']:.1f} | {v['fraction_of_matmul_peak']:.0%} |")
    lines += ["", "## Side by side with diffusers (same weights, scheduler settings, embeddings, noise)", "",
              "| run | s/image | speed-up over diffusers |", "|---|---|---|"]
    for key, v in r["vs_diffusers_seconds_per_image"].items():
        up = r["speedup_over_diffusers"].get(key)
        lines.append(f"| {key} | {v:.3f} | {'' if up is None else f'{up:.2f}x'} |")
    both = [f"{r['speedup_over_diffusers'][f'imagine compiled over diffusers compiled, batch {n}']:.2f}x "
            f"at batch {n}" for n in (1, 8)]
    lines += ["", "Speed-ups: over diffusers fp32 eager; both compiled (ours compiled over diffusers compiled): "
              + ", ".join(both) + "."]
    lines += ["", f"Timing: {r['reps']} interleaved rounds (each contender once per round); s/image are medians, "
              "speed-ups the median of per-round ratios. First calls "
              "(compilation included), seconds: " + "; ".join(
                  f"{batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in calls.items() if "compiled" in k)
                  for batch, calls in r["first_call_seconds"].items()) + ".", "",
              f"Max difference, imagine default fp32 vs diffusers fp32: {r['max_abs_diff_float']:.2e} "
              f"(images in [-1, 1]); {r['max_pixel_diff_uint8']} in 8-bit pixels. Compiled vs eager (ours): "
              f"{r['compiled_vs_eager_max_pixel_diff_batch_1']} / {r['compiled_vs_eager_max_pixel_diff_batch_8']} "
              "in 8-bit pixels at batch 1 / 8.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
