"""Quality against steps: ShapesEval and KID of a text-to-image model for each sampler and step count.

KID is measured in the CLIP scorer's image-feature space against renders of the same number of
builtin:shapes training scenes (reference features cached under --cache). Writes
docs/benchmarks/shapes_quality.{json,md}.

    python benchmarks/shapes_quality.py                     # the shipped model and scorer
    python benchmarks/shapes_quality.py --per-category 10 --samplers dpmpp_2m,euler --steps 4,8,16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from imagine.evaluation.fid import cached_reference, extract, kid, shapes_reference_batches
from imagine.evaluation.shapes_eval import evaluate, prompt_set
from imagine.io.model_folder import load_model_folder
from imagine.io.networks import load_clip
from imagine.models.text_encoders import load_text_encoder
from imagine.pipelines.generate import Settings, txt2img
from imagine.pipelines.unconditional import to_uint8
from imagine.weights import default_clip, default_model

ROOT = Path(__file__).resolve().parents[1]


def run(model_dir: Path, clip_dir: Path, samplers: list[str], steps: list[int], per_category: int,
        cfg: float | None, cache: Path) -> dict:
    model = load_model_folder(model_dir)
    cfg = model.spec.default_cfg if cfg is None else cfg
    encoder = load_text_encoder(model.spec.text_encoder)
    clip = load_clip(clip_dir)
    prompts = prompt_set(per_category)
    n = len(prompts)
    size = model.spec.image_size
    reference = cached_reference(clip.fid_features, f"clip-fid:{clip_dir.name}", f"builtin:shapes:{size}:{n}",
                                 lambda: shapes_reference_batches(size, n), cache)
    rows = []
    for sampler in samplers:
        for k in steps:
            images = []
            started = time.perf_counter()

            def make(chunk, sampler=sampler, k=k, images=images):
                out = np.concatenate([to_uint8(txt2img(model, Settings(prompt=p.prompt, seed=p.seed, steps=k,
                                                                       sampler=sampler, cfg_scale=cfg),
                                          encoder))
                                      for p in chunk])
                images.append(out)
                return out

            report = evaluate(prompts, make)
            seconds = time.perf_counter() - started
            features = extract(clip.fid_features, images)
            k_id = kid(features, reference, subsets=50, subset_size=min(100, max(2, n // 2)))
            row = {"sampler": sampler, "steps": k, "overall": report.overall, "stderr": report.stderr()["overall"],
                   "categories": report.categories(), "kid": k_id.mean, "kid_std": k_id.std,
                   "seconds_per_image": seconds / n}
            rows.append(row)
            print(f"{sampler:>12} {k:>3} steps: ShapesEval {report.overall:.3f} ± {row['stderr']:.3f}, "
                  f"KID {k_id.mean * 1e3:.2f}e-3 ± {k_id.std * 1e3:.2f}e-3, {seconds / n:.2f} s/image", flush=True)
    return {"model": str(model_dir), "clip": str(clip_dir), "per_category": per_category, "images_per_setting": n,
            "cfg": cfg, "rows": rows, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def markdown(result: dict) -> str:
    steps = sorted({r["steps"] for r in result["rows"]})
    samplers = list(dict.fromkeys(r["sampler"] for r in result["rows"]))
    cell = {(r["sampler"], r["steps"]): r for r in result["rows"]}
    lines = ["# Quality against steps (shipped shapes model)", "",
             f"ShapesEval overall (GenEval-style, {result['images_per_setting']} prompts, one image each) and KID "
             f"(x1e3, CLIP image features against {result['images_per_setting']} dataset renders), CFG "
             f"{result['cfg']}. Command: `{result.get('command', 'python benchmarks/shapes_quality.py')}`.", "",
             "| sampler | " + " | ".join(f"{k} steps" for k in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for s in samplers:
        lines.append(f"| {s} | " + " | ".join(
            f"{cell[s, k]['overall']:.2f} / {cell[s, k]['kid'] * 1e3:.1f}" if (s, k) in cell else "" for k in steps)
            + " |")
    lines += ["", "Each cell: ShapesEval overall / KID x1e3. Standard error of ShapesEval: about "
              f"{np.mean([r['stderr'] for r in result['rows']]):.3f}. KID's spread over subsets of "
              f"{max(2, result['images_per_setting'] // 2)} is in the JSON (kid_std); at this sample size it is "
              "larger than the differences between cells, so only ShapesEval separates the settings here.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--clip", type=Path, default=None)
    parser.add_argument("--samplers", default="dpmpp_2m,unipc,euler,euler_a,ddim")
    parser.add_argument("--steps", default="4,8,16,32,50")
    parser.add_argument("--per-category", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "fid")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "shapes_quality")
    args = parser.parse_args()
    result = run(args.model or default_model(), args.clip or default_clip(), args.samplers.split(","),
                 [int(k) for k in args.steps.split(",")], args.per_category, args.cfg, args.cache)
    result["command"] = "python " + " ".join(["benchmarks/shapes_quality.py", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"written: {args.out}.json and .md")


if __name__ == "__main__":
    main()
