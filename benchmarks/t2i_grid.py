"""A grid of prompts (rows) by seeds (columns) from a text-to-image model, labelled, for the docs.

    python benchmarks/t2i_grid.py --model runs/shapes --out docs/shapes_grid.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from imagine.io.model_folder import load_model_folder
from imagine.models.text_encoders import load_text_encoder
from imagine.pipelines.generate import Settings, txt2img
from imagine.pipelines.unconditional import to_uint8

PROMPTS = [
    "a red circle",
    "a big blue square",
    "a yellow star in the top left",
    "a green triangle at the bottom",
    "two white circles",
    "three orange boxes",
    "a red circle above a blue square",
    "a yellow star to the left of a purple triangle",
    "a cyan disk and a pink star",
    "a white star on a navy background",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--cfg", type=float, default=None, help="default: the model's")
    parser.add_argument("--sampler", default=None, help="default: the model's")
    parser.add_argument("--scale", type=int, default=2, help="pixel magnification in the grid")
    args = parser.parse_args()
    model = load_model_folder(args.model)
    encoder = load_text_encoder(model.spec.text_encoder)
    base = Settings().with_model_defaults(model.spec, args.steps, args.sampler, args.cfg)
    args.steps, args.sampler, args.cfg = base.steps, base.sampler, base.cfg_scale
    start = time.perf_counter()
    rows = []
    for prompt in PROMPTS:
        s = Settings(prompt=prompt, steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler, n=args.seeds)
        rows.append(to_uint8(txt2img(model, s, encoder)))
    seconds = time.perf_counter() - start
    size = rows[0].shape[1] * args.scale
    label_w, gap = 300, 2
    canvas = Image.new("RGB", (label_w + args.seeds * (size + gap), len(PROMPTS) * (size + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, images) in enumerate(zip(PROMPTS, rows, strict=True)):
        y = r * (size + gap)
        draw.text((6, y + size // 2 - 6), prompt, fill="black")
        for c, img in enumerate(images):
            tile = Image.fromarray(np.kron(img, np.ones((args.scale, args.scale, 1), dtype=np.uint8)))
            canvas.paste(tile, (label_w + c * (size + gap), y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    n = len(PROMPTS) * args.seeds
    print(f"{n} images ({args.steps} steps, {args.sampler}, cfg {args.cfg}) in {seconds:.1f} s "
          f"({seconds / n:.2f} s/image, torch threads {torch.get_num_threads()}); wrote {args.out}")


if __name__ == "__main__":
    main()
