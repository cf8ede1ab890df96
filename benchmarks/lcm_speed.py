"""The fast path: the shipped LCM against its teacher, ONNX Runtime fp32 and int8, and the cold start.

1. ShapesEval (150 prompts, the same for every row) of the teacher at its defaults (DPM++ 2M, 25 steps, CFG 3)
   and of the LCM at 4, 2 and 1 steps (its embedded guidance at the teacher's CFG 3); the LCM's share of the
   teacher's score, with the standard error of the paired difference.
2. Seconds per image of the LCM at 4 steps, batch 1, for torch eager, ONNX Runtime fp32 and int8, in interleaved
   rounds (median of per-round ratios over torch), the UNet's GFLOP/s over the matmul peak of its precision,
   and ShapesEval through each backend (int8's cost).
3. Cold start to the first image, `imagine generate PROMPT --fast` in a fresh process, with a breakdown from a
   fresh interpreter timing each phase (imports, text encoder, weights, sampling, PNG).

Command: python benchmarks/lcm_speed.py  (writes docs/benchmarks/lcm_speed.{json,md})
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle above a blue square"

PHASES = r"""
import time, json, io
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from imagine.pipelines import generate as g
from imagine.io.model_folder import load_model_folder
from imagine.models.text_encoders import default_text_encoder
from imagine.weights import fast_model
t2 = time.perf_counter()
encoder = default_text_encoder()
t3 = time.perf_counter()
model = load_model_folder(fast_model())
t4 = time.perf_counter()
s = g.Settings(prompt=%r).with_model_defaults(model.spec, None, None, None)
images = g.txt2img(model, s, encoder)
t5 = time.perf_counter()
from imagine.io.png import encode_png
from imagine.pipelines.unconditional import to_uint8
params, record = g.describe(model, s, "txt2img", 0, encoder)
encode_png(to_uint8(images)[0], params, record)
t6 = time.perf_counter()
print(json.dumps({"imports (torch)": t1 - t0, "imports (imagine)": t2 - t1, "text encoder": t3 - t2,
                  "weights": t4 - t3, "sampling (4 steps) + decode": t5 - t4, "PNG": t6 - t5, "total": t6 - t0}))
"""


def cold_start(runs: int) -> dict:
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "imagine", "generate", PROMPT, "--fast", "--out", "/tmp/lcm-cold"],
                             capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        assert run.returncode == 0, run.stderr[-2000:]
    phases = [json.loads(subprocess.run([sys.executable, "-c", PHASES % PROMPT], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1]) for _ in range(runs)]
    best = min(phases, key=lambda p: p["total"])
    return {"cli_seconds": min(walls), "cli_seconds_all": walls, "phases": best}


def shapes_eval(model, encoder, prompts, settings) -> tuple[float, np.ndarray]:
    from imagine.evaluation.shapes_eval import evaluate_model

    report = evaluate_model(model, encoder, prompts, settings, 1, None)
    return report.overall, np.array([v.ok for v in report.verdicts], dtype=float)


def main() -> None:
    from imagine.evaluation.shapes_eval import prompt_set
    from imagine.pipelines.generate import Settings, onnx_runtime, txt2img
    from imagine.pipelines.request import load_text_model
    from imagine.weights import default_model, fast_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=25)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "lcm_speed")
    args = parser.parse_args()
    result: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "prompt": PROMPT}

    teacher, encoder = load_text_model(default_model())
    lcm, _ = load_text_model(fast_model())
    prompts = prompt_set(args.per_category, 0, "template")
    base = Settings().with_model_defaults(teacher.spec, None, None, None)
    score, ok_teacher = shapes_eval(teacher, encoder, prompts, base)
    rows = {"teacher, DPM++ 2M, 25 steps": {"shapes_eval": score}}
    print("teacher", score, flush=True)
    for steps in (4, 2, 1):
        s = Settings().with_model_defaults(lcm.spec, steps, None, None)
        score, ok = shapes_eval(lcm, encoder, prompts, s)
        diff = ok - ok_teacher
        rows[f"LCM, {steps} steps"] = {"shapes_eval": score, "of_teacher": score / rows[
            "teacher, DPM++ 2M, 25 steps"]["shapes_eval"], "paired_diff": float(diff.mean()),
            "paired_diff_se": float(diff.std(ddof=1) / np.sqrt(len(diff)))}
        print(steps, rows[f"LCM, {steps} steps"], flush=True)
    result["shapes_eval"] = rows

    # backends: LCM 4 steps, batch 1
    from t2i_speed import matmul_peak, unet_flops  # benchmarks/ is on sys.path

    fns, settings = {}, {}
    for backend in ("torch", "onnxruntime", "onnxruntime-int8"):
        settings[backend] = Settings(prompt=PROMPT, backend=backend).with_model_defaults(lcm.spec, None, None, None)
        if backend != "torch":
            onnx_runtime(lcm, backend, encoder)  # export once, load the sessions
        fns[backend] = lambda s=settings[backend]: txt2img(lcm, s, encoder)
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(args.reps):
        for key, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - started)
    peaks = {"fp32": matmul_peak(torch.float32), "int8": None}
    text = encoder.encode([PROMPT, ""])
    flops_per_row = unet_flops(teacher, text.context, text.mask, 2) / 2  # the LCM's UNet is the teacher's
    backends = {}
    for key, v in times.items():
        seconds = float(np.median(v))
        achieved = flops_per_row * 2 * 4 / seconds / 1e9  # 4 steps, two rows per call (the floor)
        backends[key] = {"seconds_per_image": seconds,
                         "speedup_over_torch": float(np.median(np.array(times["torch"]) / np.array(v))),
                         "unet_gflops_upper_bound": achieved,
                         "fraction_of_fp32_matmul_peak": achieved / peaks["fp32"]}
        score, _ = shapes_eval(lcm, encoder, prompts, settings[key])
        backends[key]["shapes_eval"] = score
        print(key, backends[key], flush=True)
    result["backends"] = backends
    result["matmul_peak_gflops"] = peaks
    result["unet_gflop_per_row"] = flops_per_row / 1e9
    result["cold_start"] = cold_start(args.cold_runs)
    print(result["cold_start"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result, args))
    print(f"written: {args.out}.json and .md")


def markdown(r: dict, args) -> str:
    lines = ["# The fast path: latent consistency model, ONNX Runtime, cold start", "",
             f"Command: `python benchmarks/lcm_speed.py` (torch {r['torch']}, {r['threads']} threads; "
             f"ShapesEval {args.per_category * 6} prompts, the same for every row).", "",
             "| model | ShapesEval | of the teacher | paired difference ± s.e. |", "|---|---|---|---|"]
    for key, v in r["shapes_eval"].items():
        lines.append(f"| {key} | {v['shapes_eval']:.3f} | "
                     + (f"{v['of_teacher']:.0%} | {v['paired_diff']:+.3f} ± {v['paired_diff_se']:.3f} |"
                        if "of_teacher" in v else " | |"))
    lines += ["", "## Backends (LCM, 4 steps, batch 1)", "",
              "| backend | s/image | speed-up over torch | UNet GFLOP/s (bound) | of fp32 matmul peak | ShapesEval |",
              "|---|---|---|---|---|---|"]
    for key, v in r["backends"].items():
        lines.append(f"| {key} | {v['seconds_per_image']:.3f} | {v['speedup_over_torch']:.2f}x | "
                     f"{v['unet_gflops_upper_bound']:.1f} | {v['fraction_of_fp32_matmul_peak']:.0%} | "
                     f"{v['shapes_eval']:.3f} |")
    lines += ["", f"Matmul peak here: fp32 {r['matmul_peak_gflops']['fp32']:.0f} GFLOP/s; UNet "
              f"{r['unet_gflop_per_row']:.3f} GFLOP per row. GFLOP/s counts the UNet's FLOPs over the whole "
              "image time (text encoding and decoding included), so it is a lower bound on the UNet's own rate.", ""]
    cold = r["cold_start"]
    lines += ["## Cold start to the first image (LCM, 4 steps)", "",
              f"`imagine generate \"{r['prompt']}\" --fast` in a fresh process: **{cold['cli_seconds']:.2f} s** "
              f"(best of {len(cold['cli_seconds_all'])}). Phases in a fresh interpreter:", "",
              "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in cold["phases"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
