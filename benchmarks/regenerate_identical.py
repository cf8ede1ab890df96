"""PNGs made by an earlier commit regenerate bit for bit with the current code (`imagine generate --from`).

For a refactor that promises "behaviour stays the same" (issue 31): the earlier commit, checked out into a
temporary git worktree and run from its own sources, makes one PNG of every kind (txt2img, a batch with an
ancestral sampler, a LoRA, ControlNet + T2I-Adapter units, an image prompt, an image prompt with a
ControlNet, img2img, inpaint, hires fix) with the shipped model; the current code regenerates each from
its record alone and the pixels are compared. Writes docs/benchmarks/regenerate_identical.{json,md}.

    python benchmarks/regenerate_identical.py --old 4a4b50b      # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SETUP = """
import torch
from PIL import Image, ImageDraw
from imagine.adapters.lora import create, parts_of
from imagine.io.lora_keys import save_lora
from imagine.pipelines.request import load_text_model
from imagine.weights import default_model
model, _ = load_text_model(default_model())
torch.manual_seed(0)
lora = create(parts_of(model), rank=4)
for layer in lora.layers.values():
    torch.nn.init.normal_(layer.up.weight, std=0.05)
save_lora(lora, "style.safetensors", "kohya")
img = Image.new("RGB", (64, 64), (230, 230, 230)); d = ImageDraw.Draw(img)
d.ellipse((8, 8, 36, 36), fill=(220, 30, 30)); d.rectangle((34, 34, 58, 58), fill=(30, 30, 220))
img.save("scene.png")
m = Image.new("L", (64, 64), 0); ImageDraw.Draw(m).rectangle((30, 30, 62, 62), fill=255); m.save("mask.png")
"""
TRAIN = [
    ["train-controlnet", "--condition", "canny", "--data", "builtin:shapes", "--steps", "2", "--batch-size", "2",
     "--out", "cn_canny"],
    ["train-adapter", "--condition", "segmentation", "--data", "builtin:shapes", "--steps", "2", "--batch-size", "2",
     "--num-res-blocks", "1", "--out", "ad_seg"],
]
CASES = {
    "txt2img": ["generate", "a red circle above a blue square", "--steps", "6", "--seed", "3"],
    "batch, ancestral": ["generate", "a red circle", "--steps", "4", "--seed", "10", "--n", "2",
                         "--sampler", "euler_a"],
    "LoRA": ["generate", "a red circle", "--steps", "5", "--seed", "4", "--lora", "style.safetensors:0.8"],
    "ControlNet + T2I-Adapter": ["generate", "a red circle", "--steps", "5", "--seed", "5", "--control",
                                 "canny@cn_canny:scene.png", "--adapter", "segmentation@ad_seg:scene.png:0.7"],
    "image prompt": ["generate", "a blue square", "--steps", "5", "--seed", "6", "--image-prompt", "scene.png"],
    "image prompt + ControlNet": ["generate", "a blue square", "--steps", "5", "--seed", "6", "--image-prompt",
                                  "scene.png", "--control", "canny@cn_canny:scene.png"],
    "img2img": ["img2img", "scene.png", "a green triangle", "--steps", "6", "--strength", "0.6", "--seed", "7"],
    "inpaint": ["inpaint", "scene.png", "mask.png", "a yellow star", "--steps", "6", "--seed", "8"],
    "hires fix": ["generate", "a red circle", "--steps", "4", "--seed", "9", "--hires", "2", "--hires-strength", "0.5"],
}


def imagine(args: list[str], cwd: Path, src: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)} if src is not None else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "imagine", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="4a4b50b", help="the earlier commit whose PNGs must regenerate")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old-src"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), args.old], cwd=ROOT, check=True)
        try:
            work = tmp / "work"
            work.mkdir()
            env = {**os.environ, "PYTHONPATH": str(old / "src")}
            subprocess.run([sys.executable, "-c", SETUP], cwd=work, env=env, check=True)
            for command in TRAIN:
                run = imagine(command, work, old / "src")
                assert run.returncode == 0, run.stderr[-2000:]
            for name, command in CASES.items():
                made = imagine([*command, "--out", f"old/{name}"], work, old / "src")
                assert made.returncode == 0, f"{name}: {made.stderr[-2000:]}"
                for png in sorted((work / "old" / name).glob("*.png")):
                    again = work / "new" / name / png.stem
                    run = imagine(["generate", "--from", str(png), "--out", str(again)], work)
                    if run.returncode != 0:
                        rows.append({"case": name, "image": png.name, "identical": False,
                                     "error": run.stderr.strip().splitlines()[-1]})
                        continue
                    a = np.asarray(Image.open(png))
                    b = np.asarray(Image.open(next(again.glob("*.png"))))
                    same = a.shape == b.shape and np.array_equal(a, b)
                    diff = -1 if a.shape != b.shape else int(np.abs(a.astype(int) - b.astype(int)).max())
                    rows.append({"case": name, "image": png.name, "identical": same, "max_abs_diff": diff})
                    print(f"{name:28s} {png.name}: {'identical' if same else f'DIFFERENT (max diff {diff})'}")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result = {"old": args.old, "new": head.strip(), "images": rows,
              "all_identical": all(r["identical"] for r in rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regenerate_identical.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# PNGs made by {args.old} regenerated by {result['new']} (`imagine generate --from`)", "",
             "Command: `python benchmarks/regenerate_identical.py --old " + args.old + "`", "",
             "| case | image | identical |", "|---|---|---|"]
    for r in rows:
        verdict = "yes" if r["identical"] else f"NO: {r.get('error') or r['max_abs_diff']}"
        lines.append(f"| {r['case']} | {r['image']} | {verdict} |")
    (args.out / "regenerate_identical.md").write_text("\n".join(lines) + "\n")
    if not result["all_identical"]:
        raise SystemExit("some images differ")


if __name__ == "__main__":
    main()
