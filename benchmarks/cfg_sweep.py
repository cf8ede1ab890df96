"""Which guidance scale the shipped model should default to, chosen on prompts the evaluation never sees:
ShapesEval over a CFG sweep on a prompt set of its own seed (the evaluation set is seed 0), with the
standard error of each figure.

    python benchmarks/cfg_sweep.py            # writes docs/benchmarks/cfg_sweep.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imagine.evaluation.shapes_eval import CATEGORIES, evaluate_model, prompt_set
from imagine.pipelines.generate import Settings
from imagine.pipelines.request import load_text_model
from imagine.weights import default_model

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--scales", default="1.5,2,3,4,5,8")
    parser.add_argument("--per-category", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1000, help="prompt-set seed (not the evaluation's 0)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    model, encoder = load_text_model(args.model or default_model())
    prompts = prompt_set(args.per_category, args.seed)
    rows = []
    for scale in (float(v) for v in args.scales.split(",")):
        settings = Settings().with_model_defaults(model.spec, None, None, scale)
        r = evaluate_model(model, encoder, prompts, settings)
        rows.append({"cfg": scale, "overall": r.overall, "stderr": r.stderr()["overall"],
                     "categories": r.categories()})
        print(f"CFG {scale:g}: {r.overall:.3f} ± {r.stderr()['overall']:.3f}", flush=True)
    best = max(rows, key=lambda row: row["overall"])
    report = {"model": str(args.model or "the shipped model"), "prompt_seed": args.seed,
              "per_category": args.per_category, "prompts": len(prompts), "steps": model.spec.default_steps,
              "sampler": model.spec.default_sampler, "rows": rows, "best_cfg": best["cfg"],
              "shipped_default_cfg": model.spec.default_cfg}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cfg_sweep.json").write_text(json.dumps(report, indent=2))
    md = ["# Guidance scale sweep on held-aside prompts", "",
          f"`python benchmarks/cfg_sweep.py`: ShapesEval of {report['model']} at its defaults "
          f"({report['sampler']}, {report['steps']} steps) but the guidance scale, on {len(prompts)} prompts "
          f"({args.per_category} per category) of prompt-set seed {args.seed}, which the evaluation (seed 0) never "
          "uses; ± is the standard error of the overall.", "",
          "| CFG | overall | " + " | ".join(CATEGORIES) + " |", "|---|---|" + "---|" * len(CATEGORIES)]
    for row in rows:
        md.append(f"| {row['cfg']:g} | {row['overall']:.2f} ± {row['stderr']:.2f} | "
                  + " | ".join(f"{row['categories'].get(c, float('nan')):.2f}" for c in CATEGORIES) + " |")
    md += ["", f"Best: CFG {best['cfg']:g}; the model ships with CFG {model.spec.default_cfg:g}.", ""]
    (args.out / "cfg_sweep.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
