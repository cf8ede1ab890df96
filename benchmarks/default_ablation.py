"""What limits the default model? Short trainings that change one thing at a time, each judged by ShapesEval per
category (standard errors beside) in builtin:shapes' template wording and in the held-out half of the shapes
language (words no training caption uses).

    python benchmarks/default_ablation.py train --steps 3000 --out runs/ablation      # all runs, side by side
    python benchmarks/default_ablation.py train base wide --steps 3000 --out runs/ablation
    python benchmarks/default_ablation.py eval --runs runs/ablation     # docs/benchmarks/default_ablation.*

Every run starts from the t2i preset (batch 64, v-prediction, min-SNR 5, bf16) in the shipped model's VAE
latents, on builtin:shapes-language unless it says otherwise. Runs train side by side (made for a GPU
machine; each takes the GPU when there is one) and are evaluated side by side on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHRASINGS = ("template", "held_out")


def _configs() -> dict[str, tuple[str, object]]:
    """name -> (what it changes, TrainConfig)."""
    from imagine.train.config import _T2I_SMALL, _T2I_WIDE, PRESETS

    base = replace(PRESETS["t2i"], data="builtin:shapes-language", batch_size=64, lr=5e-4, warmup_steps=200,
                   lr_decay_from=0.7, checkpoint_every=1000, sample_every=0, log_every=50, default_cfg=3.0)
    pooled = dict(addition_embed_type="text", addition_embed_type_num_heads=8)
    every_level = dict(down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3)
    wide_plain = {k: v for k, v in _T2I_WIDE.items() if k not in pooled}
    return {
        "base": ("the shipped network (48/96/96, attention at 8x8 and 4x4)", replace(base, unet=_T2I_SMALL)),
        "base+pooled": ("+ pooled text states in the timestep embedding",
                        replace(base, unet={**_T2I_SMALL, **pooled})),
        "base+attn16": ("+ cross-attention at 16x16 too", replace(base, unet={**_T2I_SMALL, **every_level})),
        "wide": ("64/128/128, attention at every level", replace(base, unet=wide_plain)),
        "wide+pooled": ("64/128/128, attention at every level, pooled text (the shapes-wide network)",
                        replace(base, unet=_T2I_WIDE)),
        "wide+pooled/templates": ("the same on builtin:shapes' template captions only",
                                  replace(base, unet=_T2I_WIDE, data="builtin:shapes")),
    }


def train_one(name: str, steps: int, out: Path, threads: int) -> None:
    import torch

    from imagine.train.recipe import train_model
    from imagine.weights import default_model

    torch.set_num_threads(threads)
    cfg = replace(_configs()[name][1], steps=steps)
    folder = out / name.replace("/", "_")
    resume = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    start = time.perf_counter()
    train_model(cfg, cfg.data, folder, vae=default_model() / "vae", resume=resume, log=lambda m: None)
    (folder / "ablation.json").write_text(json.dumps({"name": name, "steps": steps,
                                                      "seconds": time.perf_counter() - start}))


def eval_one(folder: Path, per_category: int, threads: int) -> None:
    import torch

    from imagine.evaluation.shapes_eval import evaluate_model, prompt_set
    from imagine.pipelines.generate import Settings
    from imagine.pipelines.request import load_text_model

    torch.set_num_threads(threads)
    model, encoder = load_text_model(folder)
    settings = Settings().with_model_defaults(model.spec, None, None, None)
    rows = {}
    for phrasing in PHRASINGS:
        r = evaluate_model(model, encoder, prompt_set(per_category, 0, phrasing), settings)
        rows[phrasing] = {"overall": r.overall, "stderr": r.stderr(), "categories": r.categories()}
    (folder / "eval.json").write_text(json.dumps({"per_category": per_category, "rows": rows}, indent=2))


def _side_by_side(commands: list[list[str]], log_dir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for cmd in commands:
        log = open(log_dir / f"{cmd[3].replace('/', '_')}.log", "w")  # closed below
        env = {**os.environ, "IMAGINE_DATA_WORKERS": "2"}  # renderers per run, when on a GPU
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, cmd))
    failed = []
    for proc, log, cmd in procs:
        if proc.wait():
            failed.append(cmd[3])
        log.close()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (logs in {log_dir})")


def report(runs: Path, out: Path) -> None:
    from imagine.evaluation.shapes_eval import CATEGORIES
    from imagine.io.networks import load_unet

    configs = _configs()
    rows = []
    for name, (what, _) in configs.items():
        folder = runs / name.replace("/", "_")
        if not (folder / "eval.json").exists():
            continue
        meta = json.loads((folder / "ablation.json").read_text()) if (folder / "ablation.json").exists() else {}
        params = sum(p.numel() for p in load_unet(folder / "unet").parameters())
        rows.append({"name": name, "what": what, "params": params, **meta,
                     **json.loads((folder / "eval.json").read_text())})
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_ablation.json").write_text(json.dumps(rows, indent=2))
    steps = sorted({r.get("steps") for r in rows} - {None})
    md = ["# What limits the default model", "",
          f"`python benchmarks/default_ablation.py train --steps {steps[0] if steps else 'N'}` then `... eval`: "
          "each run changes one thing, trains the same steps (batch 64, t2i preset, the shipped VAE), and is "
          f"judged by ShapesEval ({rows[0]['per_category'] if rows else '?'} prompts per category, seed 0) "
          "worded by builtin:shapes' templates and by the held-out half of the shapes language. "
          "± is the standard error of the overall score.", ""]
    for phrasing in PHRASINGS:
        md += [f"## {phrasing.replace('_', '-')} wording", "",
               "| run | change | parameters | overall | " + " | ".join(CATEGORIES) + " |",
               "|---|---|---|---|" + "---|" * len(CATEGORIES)]
        for r in rows:
            row = r["rows"][phrasing]
            md.append(f"| {r['name']} | {r['what']} | {r['params'] / 1e6:.1f} M | {row['overall']:.2f} ± "
                      f"{row['stderr']['overall']:.2f} | "
                      + " | ".join(f"{row['categories'][c]:.2f}" for c in CATEGORIES) + " |")
        md.append("")
    if rows and any("seconds" in r for r in rows):
        md += ["Training seconds (side by side on one machine, so each is slower than alone): "
               + ", ".join(f"{r['name']} {r['seconds']:.0f}" for r in rows if "seconds" in r), ""]
    (out / "default_ablation.md").write_text("\n".join(md))
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("names", nargs="*", help=f"runs (default: all of {', '.join(_configs())})")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation")
    e = sub.add_parser("eval")
    e.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation")
    e.add_argument("--per-category", type=int, default=25)
    e.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    one = sub.add_parser("_train_one")
    one.add_argument("name")
    one.add_argument("--steps", type=int)
    one.add_argument("--out", type=Path)
    one.add_argument("--threads", type=int)
    ev = sub.add_parser("_eval_one")
    ev.add_argument("name")
    ev.add_argument("--per-category", type=int)
    ev.add_argument("--threads", type=int)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    me = [sys.executable, str(Path(__file__).resolve())]
    if args.command == "train":
        names = args.names or list(_configs())
        unknown = set(names) - set(_configs())
        if unknown:
            raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {', '.join(_configs())}")
        _side_by_side([[*me, "_train_one", n, "--steps", str(args.steps), "--out", str(args.out), "--threads",
                        str(max(1, cpus // (3 * len(names))))] for n in names], args.out / "logs")
    elif args.command == "eval":
        names = [n for n in _configs() if (args.runs / n.replace("/", "_") / "unet").is_dir()]
        threads = max(1, cpus // max(1, len(names)))
        _side_by_side([[*me, "_eval_one", str(args.runs / n.replace("/", "_")), "--per-category",
                        str(args.per_category), "--threads", str(threads)] for n in names], args.runs / "logs-eval")
        report(args.runs, args.out)
    elif args.command == "_train_one":
        train_one(args.name, args.steps, args.out, args.threads)
    else:
        eval_one(Path(args.name), args.per_category, args.threads)


if __name__ == "__main__":
    main()
