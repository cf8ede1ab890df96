"""The fast path: the shipped LCM against its teacher, ONNX Runtime fp32 and int8, OpenVINO, and the cold start.

1. ShapesEval (150 prompts, the same for every row) of the teacher at its defaults (DPM++ 2M, 25 steps, CFG 3)
   and of the LCM at 4, 2 and 1 steps (its embedded guidance at the teacher's CFG 3); the LCM's share of the
   teacher's score, with the standard error of the paired difference.
2. Seconds per image of the LCM at 4 steps, batch 1, for torch eager, ONNX Runtime fp32 and int8, in interleaved
   rounds (median of per-round ratios over torch), the UNet's GFLOP/s over the matmul peak of its precision
   (fp32: torch's GEMM; int8: ONNX Runtime's MatMulInteger), and ShapesEval through each backend (int8's cost).
3. OpenVINO against ONNX Runtime on the same exported UNet (one two-row call, interleaved), when openvino is
   installed (pip install openvino): the issue's condition for a second backend is that it measurably wins.
4. Cold start to the first image, `imagine generate PROMPT --fast [--backend onnxruntime]` in a fresh process
   (the ONNX export already made, as `imagine export-onnx --fast` or the first use makes it), with a breakdown
   from a fresh interpreter timing each phase (imports, tokenizer, weights, text encoder or sessions, sampling,
   PNG).

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
backend = %r
if backend == "torch":
    encoder.model  # the transformer, loaded with transformers
else:
    g.onnx_runtime(model, backend, encoder)
t5 = time.perf_counter()
s = g.Settings(prompt=%r, backend=backend).with_model_defaults(model.spec, None, None, None)
images = g.txt2img(model, s, encoder)
t6 = time.perf_counter()
from imagine.io.png import encode_png
from imagine.pipelines.unconditional import to_uint8
params, record = g.describe(model, s, "txt2img", 0, encoder)
encode_png(to_uint8(images)[0], params, record)
t7 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import imagine": t2 - t1, "tokenizer": t3 - t2, "weights": t4 - t3,
                  "text encoder (transformers)" if backend == "torch" else "ONNX sessions": t5 - t4,
                  "sampling (4 steps) + decode": t6 - t5, "PNG": t7 - t6, "total": t7 - t0,
                  "transformers imported": "transformers" in __import__("sys").modules}))
"""


def cold_start(runs: int, backend: str) -> dict:
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "imagine", "generate", PROMPT, "--fast", "--backend", backend,
                              "--out", "/tmp/lcm-cold"], capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        assert run.returncode == 0, run.stderr[-2000:]
    phases = [json.loads(subprocess.run([sys.executable, "-c", PHASES % (backend, PROMPT)], capture_output=True,
                                        text=True, check=True).stdout.strip().splitlines()[-1]) for _ in range(runs)]
    best = min(phases, key=lambda p: p["total"])
    return {"cli_seconds": min(walls), "cli_seconds_all": walls, "phases": best}


def int8_matmul_peak(n: int = 1024, reps: int = 20) -> float:
    """GOP/s of ONNX Runtime's int8 GEMM (MatMulInteger, uint8 x int8 -> int32, what dynamic quantization runs)
    on n x n matrices, best of ``reps``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "int8-gemm",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.integers(0, 255, (n, n), dtype=np.uint8)
    for _ in range(3):
        session.run(None, {"A": a})
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        session.run(None, {"A": a})
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best / 1e9


def openvino_vs_onnxruntime(folder: Path, latent: tuple[int, ...], context, mask, cond_dim, reps: int) -> dict:
    """One two-row call of the exported UNet: ONNX Runtime (fp32) against OpenVINO with fp32 inference and with
    its CPU default (bf16 where the CPU has it), median ms over interleaved rounds, and each one's largest
    difference from ONNX Runtime."""
    try:
        import openvino as ov
    except ImportError:
        return {"skipped": "openvino is not installed (pip install openvino)"}
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, *latent), dtype=np.float32),
             "timestep": np.array([500.0, 500.0], np.float32), "encoder_hidden_states": context.numpy(),
             "encoder_attention_mask": mask.numpy().astype(bool)}
    if cond_dim:
        feeds["timestep_cond"] = rng.standard_normal((2, cond_dim), dtype=np.float32)
    session = ort.InferenceSession(str(folder / "unet.onnx"), providers=["CPUExecutionProvider"])
    core = ov.Core()
    compiled = {"openvino fp32": core.compile_model(str(folder / "unet.onnx"), "CPU",
                                                    {"INFERENCE_PRECISION_HINT": "f32"}),
                "openvino default precision": core.compile_model(str(folder / "unet.onnx"), "CPU")}
    fns = {"onnxruntime fp32": lambda: session.run(None, feeds)[0]}
    for key, model in compiled.items():
        request = model.create_infer_request()
        fns[key] = lambda r=request, m=model: r.infer(feeds)[m.output(0)]
    reference = fns["onnxruntime fp32"]()
    out = {key: {"max_abs_diff": float(np.abs(fn() - reference).max())} for key, fn in fns.items()}
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - started)
    for key, v in times.items():
        out[key]["ms_per_call"] = float(np.median(v)) * 1e3
        out[key]["speedup_over_onnxruntime"] = float(np.median(np.array(times["onnxruntime fp32"]) / np.array(v)))
    out["openvino_version"] = ov.__version__
    return out


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
    peaks = {"fp32": matmul_peak(torch.float32), "int8": int8_matmul_peak()}
    text = encoder.encode([PROMPT, ""])
    flops_per_row = unet_flops(teacher, text.context, text.mask, 2) / 2  # the LCM's UNet is the teacher's
    backends = {}
    for key, v in times.items():
        seconds = float(np.median(v))
        achieved = flops_per_row * 2 * 4 / seconds / 1e9  # 4 steps, two rows per call (the floor)
        peak = peaks["int8" if key.endswith("int8") else "fp32"]
        backends[key] = {"seconds_per_image": seconds,
                         "speedup_over_torch": float(np.median(np.array(times["torch"]) / np.array(v))),
                         "unet_gflops_lower_bound": achieved, "fraction_of_matmul_peak": achieved / peak,
                         "peak": "int8" if key.endswith("int8") else "fp32"}
        score, _ = shapes_eval(lcm, encoder, prompts, settings[key])
        backends[key]["shapes_eval"] = score
        print(key, backends[key], flush=True)
    result["backends"] = backends
    result["matmul_peak_gflops"] = peaks
    result["unet_gflop_per_row"] = flops_per_row / 1e9
    from imagine.io.onnx import default_onnx_folder

    f = lcm.vae.config.downscale
    latent = (lcm.unet.config.in_channels, lcm.spec.image_size // f, lcm.spec.image_size // f)
    result["openvino"] = openvino_vs_onnxruntime(default_onnx_folder(lcm), latent, text.context, text.mask,
                                                 lcm.unet.config.time_cond_proj_dim, 10 * args.reps)
    print(result["openvino"], flush=True)
    result["cold_start"] = {backend: cold_start(args.cold_runs, backend) for backend in ("torch", "onnxruntime")}
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
              "| backend | s/image | speed-up over torch | UNet GOP/s (lower bound) | of the matmul peak "
              "| ShapesEval |",
              "|---|---|---|---|---|---|"]
    for key, v in r["backends"].items():
        lines.append(f"| {key} | {v['seconds_per_image']:.3f} | {v['speedup_over_torch']:.2f}x | "
                     f"{v['unet_gflops_lower_bound']:.1f} | {v['fraction_of_matmul_peak']:.0%} ({v['peak']}) | "
                     f"{v['shapes_eval']:.3f} |")
    peaks = r["matmul_peak_gflops"]
    lines += ["", f"Matmul peaks here: fp32 {peaks['fp32']:.0f} GFLOP/s (torch GEMM), int8 {peaks['int8']:.0f} GOP/s "
              f"(ONNX Runtime MatMulInteger); UNet {r['unet_gflop_per_row']:.3f} GFLOP per row. The rate counts the "
              "UNet's operations over the whole image time (text encoding and decoding included), so it is a lower "
              "bound on the UNet's own; int8 quantizes the linear layers only (convolutions stay fp32).", ""]
    ov = r["openvino"]
    lines += ["## OpenVINO against ONNX Runtime (the exported UNet, one two-row call)", ""]
    if "skipped" in ov:
        lines += [f"Skipped: {ov['skipped']}.", ""]
    else:
        lines += [f"OpenVINO {ov['openvino_version']}.", "", "| runtime | ms per call | speed-up over ONNX Runtime | "
                  "max abs difference |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['ms_per_call']:.2f} | {v['speedup_over_onnxruntime']:.2f}x | {v['max_abs_diff']:.1e} |"
                  for k, v in ov.items() if isinstance(v, dict)]
        lines.append("")
    lines += ["## Cold start to the first image (LCM, 4 steps)", "",
              "The ONNX export already made (`imagine export-onnx --fast`, or the first use). Phases in a fresh "
              "interpreter:", ""]
    for backend, cold in r["cold_start"].items():
        flag = "" if backend == "torch" else f" --backend {backend}"
        lines += [f"`imagine generate \"{r['prompt']}\" --fast{flag}` in a fresh process: "
                  f"**{cold['cli_seconds']:.2f} s** (best of {len(cold['cli_seconds_all'])}).", "",
                  "| phase | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in cold["phases"].items() if not isinstance(v, bool)]
        lines += ["", f"transformers imported: {cold['phases']['transformers imported']}", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
