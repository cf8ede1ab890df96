"""Does the model understand people, or only its caption templates? ShapesEval on the same scenes worded
three ways: builtin:shapes' templates, the train half of the shapes language (other synonyms, frames and
word orders a training set may use) and its held-out half (words no training caption may use).

    python benchmarks/shapes_phrasing.py      # writes docs/benchmarks/shapes_phrasing.{json,md}
    python benchmarks/shapes_phrasing.py --model shipped=src/imagine/weights/shapes-default \\
        --model before=/tmp/previous-default     # several models side by side, each at its own defaults
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
PHRASINGS = ("template", "in_vocabulary", "held_out")


def _named(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    return (name, Path(path)) if sep else (Path(value).name, Path(value))


def evaluate(path: Path, per_category: int) -> dict:
    model, encoder = load_text_model(path)
    settings = Settings().with_model_defaults(model.spec, None, None, None)
    rows = {}
    for phrasing in PHRASINGS:
        r = evaluate_model(model, encoder, prompt_set(per_category, 0, phrasing), settings)
        rows[phrasing] = {"overall": r.overall, "stderr": r.stderr(), "categories": r.categories(),
                          "examples": [v.prompt for v in r.verdicts[::per_category]]}
        print(f"{path} {phrasing}: {r.overall:.3f} ± {r.stderr()['overall']:.3f}", flush=True)
    return {"path": str(path), "settings": {"steps": settings.steps, "sampler": settings.sampler,
                                            "cfg": settings.cfg_scale}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", type=_named, default=None,
                        help="NAME=FOLDER (or FOLDER), repeatable; default: the shipped model")
    parser.add_argument("--per-category", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    models = args.model or [("shipped", default_model())]
    report = {"per_category": args.per_category,
              "models": {name: evaluate(path, args.per_category) for name, path in models}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shapes_phrasing.json").write_text(json.dumps(report, indent=2))
    md = ["# ShapesEval by phrasing", "",
          f"`python benchmarks/shapes_phrasing.py{''.join(f' --model {n}={p}' for n, p in args.model or [])}`: "
          f"each model at its own defaults, {args.per_category} prompts per category (seed 0), the same scenes "
          "worded by builtin:shapes' templates, by the train half of data/shapes_language.py and by its held-out "
          "half; ± is the standard error.", "",
          "| model | phrasing | overall | " + " | ".join(CATEGORIES) + " |",
          "|---|---|---|" + "---|" * len(CATEGORIES)]
    for name, result in report["models"].items():
        for phrasing, row in result["rows"].items():
            md.append(f"| {name} | {phrasing.replace('_', '-')} | {row['overall']:.2f} ± "
                      f"{row['stderr']['overall']:.2f} | "
                      + " | ".join(f"{row['categories'][c]:.2f}" for c in CATEGORIES) + " |")
    md += ["", "Examples (the first prompt of each category):", ""]
    first = next(iter(report["models"].values()))
    for phrasing, row in first["rows"].items():
        md.append(f"- {phrasing.replace('_', '-')}: " + "; ".join(f"\"{e}\"" for e in row["examples"]))
    md.append("")
    (args.out / "shapes_phrasing.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
