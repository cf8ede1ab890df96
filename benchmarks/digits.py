"""Does a class-conditional digits model draw the digit it is asked for?

1. Train a digits classifier (a small CNN) on scikit-learn's digits at the model's resolution, on a
   held-out split, and report its test accuracy (it is the judge, so it must be good itself).
2. Sample N images of each class from the model with classifier-free guidance, and report the share the
   classifier labels as the requested class, per class and overall, with a sample grid.

    python benchmarks/digits.py --model runs/digits                # the closing-note figure
    python benchmarks/digits.py --model runs/digits --per-class 20 --cfg 1 3 5

Writes docs/benchmarks/digits.json, docs/benchmarks/digits.md and docs/digits_samples.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from imagine.data.images import load_digits
from imagine.io.model_folder import load_model_folder
from imagine.pipelines.unconditional import generate, grid, to_uint8

ROOT = Path(__file__).resolve().parent.parent


class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.LazyLinear(128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


def train_classifier(size: int, seed: int = 0, epochs: int = 40) -> tuple[DigitsClassifier, float]:
    """Train on 80% of the digits (with small random shifts), return the model and its accuracy on the rest."""
    data = load_digits(size)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    split = int(0.8 * len(data))
    train_idx, test_idx = order[:split], order[split:]
    torch.manual_seed(seed)
    model = DigitsClassifier()
    model(data.images[:2])  # materialize the lazy layer
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for batch in train_idx[torch.randperm(len(train_idx), generator=g)].split(64):
            x, y = data.images[batch], data.labels[batch]
            shift = tuple(int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(data.images[test_idx]).argmax(1) == data.labels[test_idx]).float().mean().item()
    return model, acc


def evaluate(model_dir: Path, per_class: int, cfgs: list[float], steps: int, sampler: str, seed: int = 1000) -> dict:
    model = load_model_folder(model_dir)
    size = model.spec.image_size
    start = time.perf_counter()
    classifier, test_acc = train_classifier(size)
    report = {"model": str(model_dir), "classifier_test_accuracy": test_acc,
              "classifier_seconds": time.perf_counter() - start, "sampler": sampler, "steps": steps,
              "per_class": per_class, "results": []}
    grids = {}
    for cfg in cfgs:
        start = time.perf_counter()
        correct, per = 0, {}
        rows = []
        for c in range(10):
            seeds = list(range(seed + c * per_class, seed + (c + 1) * per_class))
            images = generate(model, seeds, steps=steps, sampler=sampler, class_label=c, cfg=cfg)
            with torch.no_grad():
                pred = classifier(images.float()).argmax(1)
            hits = int((pred == c).sum())
            per[str(c)] = hits / per_class
            correct += hits
            rows.append(images[:10])
        report["results"].append({"cfg": cfg, "accuracy": correct / (10 * per_class), "per_class": per,
                                  "seconds": time.perf_counter() - start})
        grids[cfg] = grid(to_uint8(torch.cat(rows)), rows=10)
    return report, grids


def markdown(report: dict, command: str) -> str:
    lines = ["# Class-conditional digits: does the model draw the digit it is asked for?", "",
             f"Measured with `{command}`. The judge is a CNN trained by `benchmarks/digits.py` on 80% of "
             f"scikit-learn's digits; its accuracy on the other 20%: **{report['classifier_test_accuracy']:.1%}**. "
             f"{report['per_class']} samples per class, {report['sampler']}, {report['steps']} steps.", "",
             "| guidance scale | accuracy | worst class | sampling time |", "|---|---|---|---|"]
    for r in report["results"]:
        worst = min(r["per_class"], key=r["per_class"].get)
        lines.append(f"| {r['cfg']:g} | **{r['accuracy']:.1%}** | {worst} ({r['per_class'][worst]:.0%}) | "
                     f"{r['seconds']:.1f} s |")
    if "training" in report:
        lines += ["", report["training"]]
    lines += ["", "![samples: one row per requested class](../digits_samples.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--training-note", default="", help="a sentence on how the model was trained (wall time)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    report, grids = evaluate(args.model, args.per_class, args.cfg, args.steps, args.sampler)
    if args.training_note:
        report["training"] = args.training_note
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "digits.json").write_text(json.dumps(report, indent=2))
    command = f"python benchmarks/digits.py --model {args.model}"
    (args.out / "digits.md").write_text(markdown(report, command))
    best = max(report["results"], key=lambda r: r["accuracy"])
    big = np.kron(grids[best["cfg"]].squeeze(-1), np.ones((3, 3), dtype=np.uint8))
    Image.fromarray(big).save(args.out.parent / "digits_samples.png")
    print(markdown(report, command))


if __name__ == "__main__":
    main()
