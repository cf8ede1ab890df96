"""Editing by inversion, measured on the shipped model (issue 37).

1. Reconstruction: rendered two-object scenes inverted under their own caption and sampled back with it, at 25
   and 50 DDIM steps: plain DDIM inversion without guidance (cfg 1), with the model's guidance, and null-text
   inversion with it. PSNR against the image; the VAE's own round trip is the ceiling.
2. Edits: "a C1 S1 to the left of a C2 S2" -> "a C3 S1 to the left of a C2 S2" (the first object recoloured).
   *changed*: the analyzer finds S1 in C3 where the first object was; *other kept*: it still finds the second
   object; *PSNR outside*: against the image, outside the first object's mask grown by 4 px. SDEdit (img2img
   of the target prompt at strength 0.6) is the reference without inversion.

    python benchmarks/edit_eval.py          # writes docs/benchmarks/edit_eval.{json,md,png}
    python benchmarks/edit_eval.py --n 4 --steps 25   # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation

from imagine.data.shapes import COLORS, SHAPES, SIZES, Scene, ShapeObject, render
from imagine.evaluation.shapes_analyzer import analyze
from imagine.pipelines import generate as g
from imagine.pipelines.inversion import edit, invert
from imagine.pipelines.request import load_text_model
from imagine.pipelines.unconditional import to_uint8
from imagine.weights import default_model

ROOT = Path(__file__).resolve().parent.parent


def cases(n: int, seed: int = 0, size: int = 64) -> list[dict]:
    rng, out = random.Random(seed), []
    for i in range(n):
        s1, s2 = rng.sample(SHAPES, 2)
        c1, c2, c3 = rng.sample(list(COLORS), 3)
        a = ShapeObject(s1, c1, "large", (0.27, rng.uniform(0.35, 0.65)), SIZES["large"])
        b = ShapeObject(s2, c2, "large", (0.73, rng.uniform(0.35, 0.65)), SIZES["large"])
        image = render(Scene([a, b], "black", "", "composed"), size)
        out.append({"image": Image.fromarray(image), "seed": seed + i, "a": a, "b": b,
                    "source": f"a {c1} {s1} to the left of a {c2} {s2}",
                    "target": f"a {c3} {s1} to the left of a {c2} {s2}", "want": (s1, c3), "keep": (s2, c2)})
    return out


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    diff = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    error = diff[where].mean() if where is not None else diff.mean()
    return float(10 * np.log10(255**2 / max(error, 1e-10)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="cases for the reconstructions")
    parser.add_argument("--edits", type=int, default=24, help="cases for the edits")
    parser.add_argument("--steps", default="25,50", help="reconstruction steps")
    parser.add_argument("--edit-steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    model, encoder = load_text_model(default_model())
    base = g.Settings().with_model_defaults(model.spec, None, None, None)
    cfg = base.cfg_scale
    recon, edits, grid = [], [], []
    todo = cases(max(args.n, args.edits))
    for steps in (int(x) for x in args.steps.split(",")):
        for label, scale, null in (("DDIM, cfg 1", 1.0, False), (f"DDIM, cfg {cfg:g}", cfg, False),
                                   (f"null-text, cfg {cfg:g}", cfg, True)):
            scores, tick = [], time.perf_counter()
            for case in todo[: args.n]:
                s = replace(base, prompt=case["source"], source_prompt=case["source"], steps=steps, cfg_scale=scale,
                            strength=1.0, null_text=null, edit_mask=False, seed=case["seed"])
                out = to_uint8(edit(model, s, case["image"], encoder))[0]
                scores.append(psnr(out, np.asarray(case["image"])))
            recon.append({"steps": steps, "setting": label, "psnr": float(np.mean(scores)),
                          "seconds": (time.perf_counter() - tick) / args.n})
            print(f"{steps} steps, {label}: {np.mean(scores):.2f} dB", flush=True)
    vae = []
    for case in todo[: args.n]:
        z = g._init_latent(model, replace(base, width=64, height=64), case["image"], (64, 64))
        vae.append(psnr(to_uint8(g.decode(model, z).clamp(-1, 1))[0], np.asarray(case["image"])))
    ceiling = float(np.mean(vae))
    settings = (("DDIM inversion + DiffEdit mask", dict(null_text=False, edit_mask=True)),
                ("null-text inversion + DiffEdit mask", dict(null_text=True, edit_mask=True)),
                ("null-text inversion, no mask", dict(null_text=True, edit_mask=False)),
                ("SDEdit (img2img at 0.6, no inversion)", None))
    for label, options in settings:
        changed = kept = 0
        outside, tick, row = [], time.perf_counter(), []
        for case in todo[: args.edits]:
            s = replace(base, prompt=case["target"], seed=case["seed"], steps=args.edit_steps)
            if options is None:
                out = to_uint8(g.img2img(model, replace(s, strength=0.6), case["image"], encoder))[0]
            else:
                s = replace(s, source_prompt=case["source"], strength=1.0, **options)
                inv = invert(model, s, case["image"], encoder)
                out = to_uint8(edit(model, s, case["image"], encoder, inversion=inv))[0]
            found = analyze(out)
            ax = case["a"].center[0]
            changed += any((d.shape, d.color) == case["want"] and abs(d.center[0] - ax) < 0.2 for d in found)
            kept += any((d.shape, d.color) == case["keep"] for d in found)
            away = ~binary_dilation(case["a"].mask, iterations=4)
            outside.append(psnr(out, np.asarray(case["image"]), away))
            if len(row) < 8:
                row.append(out)
        grid.append(np.concatenate(row, axis=1))
        edits.append({"setting": label, "changed": changed / args.edits, "kept": kept / args.edits,
                      "psnr_outside": float(np.mean(outside)),
                      "seconds": (time.perf_counter() - tick) / args.edits})
        print(f"{label}: changed {changed / args.edits:.2f}, kept {kept / args.edits:.2f}, "
              f"PSNR outside {np.mean(outside):.1f} dB", flush=True)
    originals = np.concatenate([np.asarray(c["image"]) for c in todo[:8]], axis=1)
    args.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([originals, *grid], axis=0)).resize((8 * 128, (len(grid) + 1) * 128),
                                                                       Image.NEAREST).save(args.out / "edit_eval.png")
    report = {"model": "the shipped model", "cfg": cfg, "reconstruction": recon, "vae_psnr": ceiling,
              "edits": edits, "edit_steps": args.edit_steps, "cases": args.n, "edit_cases": args.edits}
    (args.out / "edit_eval.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (args.out / "edit_eval.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def markdown(r: dict) -> list[str]:
    md = ["# Editing by inversion", "", f"`python benchmarks/edit_eval.py` on {r['model']} (this CPU, one process).",
          "", f"## Reconstruction ({r['cases']} two-object scenes, inverted and sampled back under their caption)",
          "", "| steps | inversion | PSNR (dB) | s per image |", "|---|---|---|---|"]
    for row in r["reconstruction"]:
        md.append(f"| {row['steps']} | {row['setting']} | {row['psnr']:.2f} | {row['seconds']:.1f} |")
    md += ["", f"The VAE's own round trip (encode, decode) reaches {r['vae_psnr']:.2f} dB: the ceiling.", "",
           f"## Edits ({r['edit_cases']} scenes, the first object recoloured by the prompt, {r['edit_steps']} steps)",
           "", "| method | changed | other object kept | PSNR outside the object (dB) | s per image |",
           "|---|---|---|---|---|"]
    for row in r["edits"]:
        md.append(f"| {row['setting']} | {row['changed']:.2f} | {row['kept']:.2f} | {row['psnr_outside']:.1f} | "
                  f"{row['seconds']:.1f} |")
    rec = {(row["steps"], row["setting"].split(",")[0]): row["psnr"] for row in r["reconstruction"]
           if not row["setting"].endswith("cfg 1")}
    edits = {row["setting"]: row for row in r["edits"]}
    best = max(r["edits"], key=lambda row: row["changed"] + row["kept"])
    md += ["", f"Under guidance plain DDIM inversion does not come back (about {min(rec.values()):.0f} dB); null-text "
           f"inversion does, within a few dB of the VAE's own round trip, at about ten times the time. For edits, "
           f"{best['setting']} changes and keeps best together; without the mask the rest of the picture drifts "
           f"(PSNR outside {edits['null-text inversion, no mask']['psnr_outside']:.1f} dB), and SDEdit without "
           "inversion keeps least of it. The changed rate is bounded by the 64 px model's colour binding on "
           "two-object prompts (the first row of the picture is the input).",
           "", "![the first eight scenes, then one row per method](edit_eval.png)"]
    return md


if __name__ == "__main__":
    main()
