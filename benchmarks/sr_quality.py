"""Super-resolution: does the shipped SR stage beat Lanczos, keep the base model's prompt adherence, and what
does it cost?

1. PSNR and SSIM (scikit-image) against the true render at 256 px of held-out builtin:shapes scenes (far past
   the training stream), for the SR stage at a sweep of noise-augmentation levels, Lanczos and bicubic, on the
   same 64 px inputs: the 256 px render degraded as training degrades (antialiased bicubic), and the scene
   rendered at 64 px directly. A side-by-side crop grid goes to docs/benchmarks/sr_crops.png.
2. ShapesEval of the base model's 64 px output against the cascade's 256 px output (downsampled to 64 px for
   the analyzer), the same prompts and seeds: the cascade must not lose prompt adherence.
3. Seconds per image on this CPU for the base alone, base + SR (--size 256) and hires fix (Lanczos 4x, then
   img2img at strength 0.5), and the peak RSS of a fresh process upscaling to 256 and, tiled, to 1024.

Command: python benchmarks/sr_quality.py [--sr DIR]  (writes docs/benchmarks/sr_quality.{json,md})
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

RSS = r"""
import resource, sys, torch
from imagine.models.text_encoders import default_text_encoder
from imagine.pipelines.generate import Settings
from imagine.pipelines.upscale import enlarge, resolve_upscaler
size, tile = int(sys.argv[1]), int(sys.argv[2])
up = resolve_upscaler(sys.argv[3])
low = torch.rand(1, 3, size // 4, size // 4) * 2 - 1
out = enlarge(low, (size, size), up, Settings(prompt="a red circle", tile=tile), default_text_encoder())
print(out.shape[-1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def scenes(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n held-out scenes: (n, 3, size, size) renders at size and at size / 4, and their captions."""
    from imagine.data.shapes import make_scene, render

    big, small, captions = [], [], []
    for i in range(n):
        scene = make_scene(10**8 + i, 0)
        big.append(torch.from_numpy(render(scene, size).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        small.append(torch.from_numpy(render(scene, size // 4).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        captions.append(scene.caption)
    return torch.stack(big), torch.stack(small), captions


def psnr_ssim(out: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    b = ((truth.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    p = [peak_signal_noise_ratio(y, x, data_range=255) for x, y in zip(a, b, strict=True)]
    s = [structural_similarity(y, x, channel_axis=2, data_range=255) for x, y in zip(a, b, strict=True)]
    return float(np.mean(p)), float(np.mean(s))


def main() -> None:
    from imagine.diffusion.superres import degrade
    from imagine.pipelines.generate import Settings
    from imagine.pipelines.request import load_text_model
    from imagine.pipelines.upscale import enlarge, from_pil, resample, resolve_upscaler, to_pil
    from imagine.weights import SR_MODEL, default_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sr", default=SR_MODEL.name, help="the SR stage (default: the shipped one)")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--levels", default="0,25,100", help="noise-augmentation levels to sweep")
    parser.add_argument("--per-category", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "sr_quality")
    args = parser.parse_args()
    result: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "sr": args.sr}
    base, encoder = load_text_model(default_model())
    sr = resolve_upscaler(args.sr)
    truth, rendered_small, captions = scenes(args.images, 256)
    inputs = {"degraded": degrade(truth, 4), "rendered at 64": rendered_small}
    rows: dict = {}
    crops = []
    for name, low in inputs.items():
        for method in ("Lanczos", "Bicubic"):
            out = from_pil(resample(to_pil(low), (256, 256), method))
            rows[f"{method}, {name} input"] = dict(zip(("psnr", "ssim"), psnr_ssim(out, truth), strict=True))
            if name == "degraded" and method == "Lanczos":
                crops.append(out)
        for level in (int(v) for v in args.levels.split(",")):
            outs = []
            for i in range(len(low)):
                s = Settings(prompt=captions[i], seed=i, sr_noise_level=level)
                outs.append(enlarge(low[i: i + 1], (256, 256), sr, s, encoder))
            out = torch.cat(outs)
            rows[f"SR, level {level}, {name} input"] = dict(zip(("psnr", "ssim"), psnr_ssim(out, truth), strict=True))
            if name == "degraded" and level == sr.stages[0].spec.default_noise_level:
                crops.append(out)
            print(rows, flush=True)
    result["psnr_ssim"] = rows
    _crop_grid([*crops, truth], ROOT / "docs" / "benchmarks" / "sr_crops.png")

    # ShapesEval: base at 64 against the cascade at 256 (downsampled for the analyzer), same prompts and seeds
    from imagine.evaluation.shapes_eval import evaluate_model, prompt_set

    prompts = prompt_set(args.per_category, 0, "template")
    plain = Settings().with_model_defaults(base.spec, None, None, None)
    cascade = Settings(hires_scale=4.0, hires_strength=0.0, hires_upscaler=args.sr).with_model_defaults(
        base.spec, None, None, None)
    for label, s in (("base, 64 px", plain), ("base + SR, 256 px", cascade)):
        report = evaluate_model(base, encoder, prompts, s, 1, None)
        result.setdefault("shapes_eval", {})[label] = {"overall": report.overall, "categories": report.categories(),
                                                       "stderr": report.stderr()["overall"]}
        print(label, report.overall, flush=True)

    # seconds per image
    from imagine.pipelines.generate import txt2img
    from imagine.pipelines.upscale import hires

    lanczos = resolve_upscaler("Lanczos")
    base_s = Settings(prompt="a red circle above a blue square").with_model_defaults(base.spec, None, None, None)
    jobs = {"base, 64 px": lambda: txt2img(base, base_s, encoder),
            "base + SR, 256 px": lambda: hires(base, _with(base_s, 4.0, 0.0, args.sr), txt2img(base, base_s, encoder),
                                               encoder, sr),
            "hires fix (Lanczos 4x, img2img at 0.5), 256 px": lambda: hires(
                base, _with(base_s, 4.0, 0.5, "Lanczos"), txt2img(base, base_s, encoder), encoder, lanczos)}
    seconds = {}
    for label, fn in jobs.items():
        fn()
        started = time.perf_counter()
        fn()
        seconds[label] = time.perf_counter() - started
        print(label, seconds[label], flush=True)
    result["seconds_per_image"] = seconds
    rss = {}
    for size, tile in ((256, 0), (1024, 256), (1024, 0)):
        run = subprocess.run([sys.executable, "-c", RSS, str(size), str(tile), args.sr], capture_output=True,
                             text=True)
        label = f"{size} px" + (f", tiles of {tile}" if tile else "")
        # the untiled 1024 px pass shows what tiles save; where it cannot run here, say so
        rss[label] = float(run.stdout.split()[-1]) if run.returncode == 0 else f"failed: {run.stderr.strip()[-200:]}"
    result["peak_rss_mb"] = rss
    print(rss, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result, args))
    print(f"written: {args.out}.json and .md")


def _with(s, scale, strength, upscaler):
    from dataclasses import replace

    return replace(s, hires_scale=scale, hires_strength=strength, hires_upscaler=upscaler)


def _crop_grid(columns: list[torch.Tensor], path: Path) -> None:
    """Rows: the first four images; columns: Lanczos, SR, truth; each the 96 px centre crop, shown 2x."""
    from PIL import Image

    from imagine.pipelines.unconditional import grid, to_uint8

    tiles = []
    for i in range(min(4, len(columns[0]))):
        for col in columns:
            crop = col[i: i + 1, :, 80:176, 80:176]
            tiles.append(torch.nn.functional.interpolate(crop, scale_factor=2, mode="nearest"))
    Image.fromarray(grid(to_uint8(torch.cat(tiles)), rows=min(4, len(columns[0]))).squeeze()).save(path)


def markdown(r: dict, args) -> str:
    lines = ["# Super-resolution 64 -> 256", "",
             f"Command: `python benchmarks/sr_quality.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` "
             f"(torch {r['torch']}, {r['threads']} threads; SR stage `{r['sr']}`; {args.images} held-out "
             f"builtin:shapes scenes; ShapesEval {args.per_category} prompts per category).", "",
             "## Against the true 256 px render", "", "| method | PSNR (dB) | SSIM |", "|---|---|---|"]
    lines += [f"| {k} | {v['psnr']:.2f} | {v['ssim']:.3f} |" for k, v in r["psnr_ssim"].items()]
    lines += ["", "Crops (centre 96 px, 2x): Lanczos | SR at its default level | truth, one scene per row: "
              "![crops](sr_crops.png)", "", "## Prompt adherence (ShapesEval, analyzer at 64 px)", "",
              "| output | overall | " + " | ".join(next(iter(r["shapes_eval"].values()))["categories"]) + " |",
              "|---" * (2 + len(next(iter(r["shapes_eval"].values()))["categories"])) + "|"]
    for k, v in r["shapes_eval"].items():
        lines.append(f"| {k} | {v['overall']:.2f} ± {v['stderr']:.2f} | "
                     + " | ".join(f"{x:.2f}" for x in v["categories"].values()) + " |")
    lines += ["", "## Cost on this CPU", "", "| job | seconds per image |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["seconds_per_image"].items()]
    lines += ["", "| upscale from a quarter of the size (the stage's steps, fresh process) | peak RSS (MB) |",
              "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in r["peak_rss_mb"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
