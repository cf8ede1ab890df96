"""Spatial control measured on layouts the training never drew (builtin:shapes under another seed).

Starting from the shipped model, trains ControlNets and T2I-Adapters for segmentation and canny, and a Tile
ControlNet, then measures:
- adherence: mean IoU between each object the condition lays out and the best-matching region found in
  the generated image, with the scene's own caption as the prompt (it asks for the colours); and the
  colour accuracy (share of laid-out objects whose region has the asked colour) beside the uncontrolled
  model's (share of asked objects whose colour it draws at all);
- the prompt still matters: one condition, other colour words: share of objects in the asked colour;
- multi-control: a segmentation unit for one object and a canny unit for another, each honoured;
- ControlNet vs T2I-Adapter: adherence, parameters, training minutes, seconds per image;
- Tile: a 64 px render upscaled to 128 and 256 by Tile ControlNet + img2img, PSNR against the true render
  at that size, beside Lanczos.

    python benchmarks/control.py                 # writes docs/benchmarks/control.{json,md}
    python benchmarks/control.py --quick         # fewer steps and scenes: a smoke run

Every stage is cached in --work (default runs/control/): trainings resume exactly, finished stages are kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name: (kind, condition)
    "controlnet-segmentation": ("controlnet", "segmentation"),
    "controlnet-canny": ("controlnet", "canny"),
    "adapter-segmentation": ("t2i_adapter", "segmentation"),
    "adapter-canny": ("t2i_adapter", "canny"),
    "controlnet-tile": ("controlnet", "tile"),
}
HELD_OUT_SEED = 7919


def train_all(work: Path, steps: int, batch: int, results: dict, save) -> None:
    from imagine.data.shapes import ShapesDataset
    from imagine.pipelines.request import load_text_model
    from imagine.train.control import ControlTrainConfig, train_control
    from imagine.weights import default_model

    for name, (kind, condition) in RUNS.items():
        if name in results.get("training", {}):
            continue
        model, encoder = load_text_model(default_model())
        cfg = ControlTrainConfig(condition=condition, kind=kind, steps=steps, batch_size=batch, lr=1e-4,
                                 checkpoint_every=100, log_every=20)
        out = work / name
        resume = (work / f"{name}-training" / "latest").exists()
        start = time.perf_counter()
        print(f"training {name} ({steps} steps, batch {batch}){' (resumed)' if resume else ''}", flush=True)
        train_control(model, encoder, ShapesDataset(size=model.spec.image_size), cfg, out, resume=resume)
        minutes = (time.perf_counter() - start) / 60
        log = [json.loads(line) for line in (work / f"{name}-training" / "log.jsonl").read_text().splitlines()]
        per_step = float(np.median([e["seconds"] for e in log if "seconds" in e])) if log else None
        results.setdefault("training", {})[name] = {"minutes_this_sitting": minutes, "resumed": resume,
                                                    "seconds_per_step": per_step, "steps": steps, "batch": batch}
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "control")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stage", choices=["train", "measure", "all"], default="all")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.scenes = 20, 4
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "results.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}

    def save() -> None:
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(cache)

    if args.stage in ("train", "all"):
        train_all(args.work, args.steps, args.batch, results, save)
    if args.stage in ("measure", "all"):
        measure(args.work, args.out, args.scenes, results, save)


if __name__ == "__main__":
    main()
