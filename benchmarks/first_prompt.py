"""What the README's first command really gives: its prompt at seeds 0 to 7 on the shipped model, each judged
by ShapesEval's analyzer, as a strip of images and a JSON record (no seed is picked).

    python benchmarks/first_prompt.py            # writes docs/first_prompt.png and docs/benchmarks/first_prompt.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from imagine.evaluation.shapes_eval import EvalPrompt, Want, judge
from imagine.pipelines.generate import Settings, txt2img
from imagine.pipelines.request import load_text_model
from imagine.pipelines.unconditional import to_uint8
from imagine.weights import default_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = EvalPrompt("position", "a red circle above a blue square", (Want("circle", "red"), Want("square", "blue")),
                    "above", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args()
    model, encoder = load_text_model(default_model())
    s = Settings(prompt=PROMPT.prompt, n=args.seeds, seed=0).with_model_defaults(model.spec, None, None, None)
    images = to_uint8(txt2img(model, s, encoder))
    rows = []
    for seed, image in enumerate(images):
        verdict = judge(PROMPT, image)
        red = next((d for d in _found(verdict.found) if d[1] == "red"), None)
        blue = next((d for d in _found(verdict.found) if d[1] == "blue"), None)
        red_above = red is not None and blue is not None and red[2] < blue[2]
        rows.append({"seed": seed, "passes": verdict.ok, "red_above_blue": red_above, "found": verdict.found})
    size = images.shape[1] * args.scale
    strip = Image.new("RGB", (args.seeds * (size + 2), size + 18), "white")
    draw = ImageDraw.Draw(strip)
    for i, (image, row) in enumerate(zip(images, rows, strict=True)):
        strip.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (i * (size + 2), 0))
        mark = "pass" if row["passes"] else ("red above" if row["red_above_blue"] else "wrong")
        draw.text((i * (size + 2) + 4, size + 3), f"seed {i}: {mark}", fill="black")
    strip.save(ROOT / "docs" / "first_prompt.png")
    report = {"prompt": PROMPT.prompt, "sampler": s.sampler, "steps": s.steps, "cfg": s.cfg_scale, "rows": rows,
              "passes": sum(r["passes"] for r in rows), "red_above_blue": sum(r["red_above_blue"] for r in rows)}
    (ROOT / "docs" / "benchmarks" / "first_prompt.json").write_text(json.dumps(report, indent=2))
    print(f"{PROMPT.prompt!r}, seeds 0-{args.seeds - 1}: ShapesEval passes {report['passes']}, red above blue "
          f"{report['red_above_blue']}")


def _found(text: str) -> list[tuple[str, str, float]]:
    """(shape, colour, y) of each object in a verdict's 'found' text ("red circle at (0.50, 0.86), ...")."""
    out = []
    for item in text.split("), "):
        if " at (" not in item:
            continue
        name, _, where = item.partition(" at (")
        color, _, shape = name.strip().partition(" ")
        out.append((shape, color, float(where.rstrip(")").split(",")[1])))
    return out


if __name__ == "__main__":
    main()
