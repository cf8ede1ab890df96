"""Where an LCM loses ShapesEval: per category, against the teacher at its 25 steps and at the LCM's own 4
steps (what an LCM must beat to be worth it), the first LCM at 4 and 8 steps (does more sampling recover it?),
and other LCMs (other distillation lengths or settings) at 4 steps.

Command: python benchmarks/lcm_ablation.py [--lcm LABEL=DIR ...]  (default: the shipped LCM; writes
docs/benchmarks/lcm_ablation.{json,md}). The published table compared two distillations of the shipped model,
both exported in fp16 with `imagine export`: 4000 steps and 1750 steps (the shipped one):
  python benchmarks/lcm_ablation.py --lcm "LCM, 4000 distillation steps=DIR4000" \
      --lcm "LCM, 1750 distillation steps=src/imagine/weights/shapes-lcm"
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from imagine.evaluation.shapes_eval import evaluate_model, prompt_set
    from imagine.pipelines.generate import Settings
    from imagine.pipelines.request import load_text_model
    from imagine.weights import default_model, fast_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=25)
    parser.add_argument("--lcm", action="append", default=None, metavar="LABEL=DIR",
                        help="an LCM to compare (repeat; the first is also run at 8 steps)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "lcm_ablation")
    args = parser.parse_args()
    teacher, encoder = load_text_model(default_model())
    prompts = prompt_set(args.per_category, 0, "template")
    rows = [("teacher, DPM++ 2M, 25 steps", teacher, Settings().with_model_defaults(teacher.spec, None, None, None)),
            ("teacher, DPM++ 2M, 4 steps", teacher, Settings().with_model_defaults(teacher.spec, 4, None, None))]
    for i, item in enumerate(args.lcm or [f"shipped LCM={fast_model()}"]):
        label, sep, folder = item.rpartition("=")
        if not sep:
            parser.error(f"--lcm {item!r}: write LABEL=DIR")
        lcm, _ = load_text_model(folder)
        for steps in (4, 8) if i == 0 else (4,):
            rows.append((f"{label}, {steps} steps", lcm, Settings().with_model_defaults(lcm.spec, steps, None, None)))
    results = {}
    for label, model, settings in rows:
        report = evaluate_model(model, encoder, prompts, settings, 1, None)
        results[label] = {"overall": report.overall, "categories": report.categories(), "stderr": report.stderr()}
        print(label, results[label], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    cats = list(next(iter(results.values()))["categories"])
    lines = ["# Where the LCM loses ShapesEval", "",
             f"Command: `python benchmarks/lcm_ablation.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` "
             f"({args.per_category} prompts per category, the same "
             "prompts and seeds for every row; ± is the standard error of the overall score).", "",
             "| model | overall | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['overall']:.2f} ± {r['stderr']['overall']:.2f} | "
                     + " | ".join(f"{r['categories'][c]:.2f}" for c in cats) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written: {args.out}.json and .md")


if __name__ == "__main__":
    main()
