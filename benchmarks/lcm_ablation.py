"""Where the shipped LCM loses ShapesEval: per category, against the teacher at its 25 steps and at the LCM's
own 4 steps (what the LCM must beat to be worth it), the LCM at 4 and 8 steps (does more sampling recover it?),
and an earlier distillation checkpoint (does more distillation help?).

Command: python benchmarks/lcm_ablation.py [--earlier DIR]  (writes docs/benchmarks/lcm_ablation.{json,md})
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from imagine.evaluation.shapes_eval import evaluate_model, prompt_set
    from imagine.pipelines.generate import Settings
    from imagine.pipelines.request import load_text_model
    from imagine.weights import default_model, fast_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=25)
    parser.add_argument("--earlier", type=Path, default=None, help="an earlier LCM export (fewer distillation steps)")
    parser.add_argument("--earlier-label", default="LCM, 1750 distillation steps, 4 steps")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "lcm_ablation")
    args = parser.parse_args()
    teacher, encoder = load_text_model(default_model())
    lcm, _ = load_text_model(fast_model())
    prompts = prompt_set(args.per_category, 0, "template")
    rows = [("teacher, DPM++ 2M, 25 steps", teacher, Settings().with_model_defaults(teacher.spec, None, None, None)),
            ("teacher, DPM++ 2M, 4 steps", teacher, Settings().with_model_defaults(teacher.spec, 4, None, None)),
            ("LCM, 4000 distillation steps, 4 steps", lcm, Settings().with_model_defaults(lcm.spec, 4, None, None)),
            ("LCM, 4000 distillation steps, 8 steps", lcm, Settings().with_model_defaults(lcm.spec, 8, None, None))]
    if args.earlier is not None:
        earlier, _ = load_text_model(args.earlier)
        rows.append((args.earlier_label, earlier, Settings().with_model_defaults(earlier.spec, 4, None, None)))
    results = {}
    for label, model, settings in rows:
        report = evaluate_model(model, encoder, prompts, settings, 1, None)
        results[label] = {"overall": report.overall, "categories": report.categories(), "stderr": report.stderr()}
        print(label, results[label], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    cats = list(next(iter(results.values()))["categories"])
    lines = ["# Where the LCM loses ShapesEval", "",
             f"Command: `python benchmarks/lcm_ablation.py` ({args.per_category} prompts per category, the same "
             "prompts and seeds for every row; ± is the standard error of the overall score).", "",
             "| model | overall | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['overall']:.2f} ± {r['stderr']['overall']:.2f} | "
                     + " | ".join(f"{r['categories'][c]:.2f}" for c in cats) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written: {args.out}.json and .md")


if __name__ == "__main__":
    main()
