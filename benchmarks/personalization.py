"""Personalization measured on a concept the shipped model has never seen: a heart (builtin:shapes draws
circles, squares, triangles and stars only). The renderer and the detector for it live here, not in
builtin:shapes; the detector is proven on its own renders and on builtin:shapes scenes before it judges.

Starting from the shipped model, with five captioned renders of the heart under the identifier "sks":
- DreamBooth-LoRA with prior preservation, and without it: the share of samples for identifier prompts
  ("a red sks", "a sks on the left", ...) that show a heart with the asked colour and place;
- ShapesEval of each fine-tuned model on ordinary prompts against the base model's (language drift);
- textual inversion on the same images and prompts (the token "sks" as a learned embedding);
- file sizes, training minutes on this CPU, and generation speed with the LoRA attached vs merged;
- the same DreamBooth (with the prior) as LyCORIS's LoHa and LoKr and as DoRA (``--algos``), at comparable file
  sizes where the kind allows (LoHa at half LoRA's rank holds as many numbers; LoKr's Kronecker factors are
  small by construction): instance fidelity, language drift, file size, minutes, speed attached and merged.

    python benchmarks/personalization.py          # writes docs/benchmarks/personalization.{json,md}

Every stage is cached in --work (default runs/personalization/): an interrupted run continues where it
stopped (the trainings resume exactly), and a finished stage is not run again.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from imagine.data.shapes import BACKGROUNDS, COLORS, SIZES, polygon

ROOT = Path(__file__).resolve().parent.parent
SS = 4  # supersampling, as builtin:shapes renders
SHAPES = ("circle", "square", "triangle", "star", "heart")

# the instance set: five hearts, each captioned with its colour and place under the identifier
INSTANCES = [("red", (0.25, 0.5), "a red sks on the left"), ("blue", (0.5, 0.25), "a blue sks at the top"),
             ("green", (0.5, 0.5), "a green sks"), ("yellow", (0.75, 0.5), "a yellow sks on the right"),
             ("white", (0.5, 0.75), "a white sks at the bottom")]
# identifier prompts: colours and places the instance set pairs otherwise (or never shows)
PROMPTS = [("a red sks", "red", None), ("a blue sks", "blue", None), ("an orange sks", "orange", None),
           ("a purple sks", "purple", None), ("a sks on the left", None, "left"),
           ("a sks on the right", None, "right"), ("a green sks at the top", "green", "top"),
           ("a pink sks at the bottom", "pink", "bottom")]
# the prior: the base model's own drawings of ordinary single-object captions (no identifier)
CLASS_PROMPTS = [f"a {c} {s}" for s in ("circle", "square", "triangle", "star") for c in ("red", "blue", "green",
                                                                                             "yellow", "white")]


def heart_polygon(cx: float, cy: float, r: float, n: int = 96) -> list[tuple[float, float]]:
    """The classic heart curve, scaled so its half-width is r, centred on its box."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    x, y = x / 16, (y - (y.max() + y.min()) / 2) / 16
    return list(zip((cx + r * x).tolist(), (cy + r * y).tolist(), strict=True))


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The shape's polygon; None for a circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    return heart_polygon(cx, cy, r) if shape == "heart" else polygon(shape, cx, cy, r)


def render(shape: str, color: str, center: tuple[float, float], size: str = "large", background: str = "black",
           px: int = 64) -> np.ndarray:
    """One object on a plain background, supersampled as builtin:shapes draws."""
    big = px * SS
    img = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    r = SIZES[size] * big
    cx, cy = center[0] * big, center[1] * big
    pts = outline(shape, cx, cy, r)
    if pts is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    else:
        draw.polygon(pts, fill=COLORS[color])
    return np.asarray(img.resize((px, px), Image.LANCZOS))


def _template(shape: str, box: tuple[int, int, int, int], shape_hw: tuple[int, int]) -> np.ndarray:
    """``shape`` drawn to fill ``box`` (x0, y0, x1, y1, inclusive) as a boolean mask."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    big = Image.new("L", (shape_hw[1] * SS, shape_hw[0] * SS), 0)
    draw = ImageDraw.Draw(big)
    unit = outline(shape, 0.0, 0.0, 1.0)
    if unit is None:  # circle
        draw.ellipse([x0 * SS, y0 * SS, (x1 + 1) * SS, (y1 + 1) * SS], fill=255)
    else:
        xs, ys = [p[0] for p in unit], [p[1] for p in unit]
        sx, sy = w * SS / (max(xs) - min(xs)), h * SS / (max(ys) - min(ys))
        draw.polygon([((p[0] - min(xs)) * sx + x0 * SS, (p[1] - min(ys)) * sy + y0 * SS) for p in unit], fill=255)
    return np.asarray(big.resize((shape_hw[1], shape_hw[0]), Image.BILINEAR)) >= 128


@dataclass(frozen=True)
class Found:
    shape: str
    color: str
    center: tuple[float, float]
    iou: float


def detect(image: np.ndarray, min_area: int = 12) -> list[Found]:
    """Objects in an image, each named by the shape template (fitted to its box) it overlaps best; colour
    by the analyzer's per-pixel colour model (evaluation/shapes_analyzer.py)."""
    from imagine.evaluation.shapes_analyzer import coverage, segments

    alpha, best = coverage(image)
    names = list(COLORS)
    found = []
    for core, color_index in segments(ndimage.label(alpha >= 0.5)[0], best):
        if core.sum() < min_area:
            continue
        ys, xs = np.nonzero(core)
        box = (xs.min(), ys.min(), xs.max(), ys.max())
        scores = {}
        for shape in SHAPES:
            t = _template(shape, box, core.shape)
            scores[shape] = float((t & core).sum() / max((t | core).sum(), 1))
        shape = max(scores, key=scores.get)
        color = names[color_index]
        found.append(Found(shape, color, ((xs.mean() + 0.5) / core.shape[1], (ys.mean() + 0.5) / core.shape[0]),
                           scores[shape]))
    return sorted(found, key=lambda f: -f.iou)


def place_ok(center: tuple[float, float], place: str | None) -> bool:
    x, y = center
    return {None: True, "left": x < 0.4, "right": x > 0.6, "top": y < 0.4, "bottom": y > 0.6}[place]


def judge(image: np.ndarray, color: str | None, place: str | None) -> dict:
    found = detect(image)
    hearts = [f for f in found if f.shape == "heart"]
    shows = bool(hearts)
    right = [f for f in hearts if (color is None or f.color == color) and place_ok(f.center, place)]
    return {"concept": shows, "ok": bool(right), "found": [(f.shape, f.color, round(f.center[0], 2),
                                                             round(f.center[1], 2)) for f in found]}


def validate_detector(n: int = 150) -> dict:
    """Hearts (every colour, size, background, place) must read as hearts; builtin:shapes objects never."""
    from imagine.data.shapes import ShapesDataset

    rng = np.random.default_rng(0)
    hits = 0
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        size = list(SIZES)[i % 2]
        background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        center = tuple(rng.uniform(0.25, 0.75, 2))
        found = detect(render("heart", color, center, size, background))
        hits += bool(found) and found[0].shape == "heart" and found[0].color == color
    data = ShapesDataset(64)
    objects = false = shape_right = 0
    for i in range(n):
        scene, img = data.scene(i)
        found = detect(img)
        objects += len(scene.objects)
        false += sum(f.shape == "heart" for f in found)
        truth = sorted(o.shape for o in scene.objects)
        shape_right += sorted(f.shape for f in found) == truth
    return {"hearts_detected": hits / n, "heart_renders": n, "false_hearts_per_object": false / max(objects, 1),
            "shapes_scenes": n, "shapes_scenes_all_shapes_right": shape_right / n}


def write_instances(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (color, center, caption) in enumerate(INSTANCES):
        Image.fromarray(render("heart", color, center)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption + "\n")
    return folder


def concept_share(model, encoder, settings, seeds: int, *, lora=None, embedding=None) -> dict:
    """The share of identifier-prompt samples that show a heart with the asked colour and place."""
    from imagine.pipelines.request import Request, run

    rows, ok, shows = [], 0, 0
    for prompt, color, place in PROMPTS:
        good = 0
        for seed in range(seeds):
            request = Request("txt2img", replace(settings, prompt=prompt, seed=1000 + seed, n=1),
                              loras=((str(lora), 1.0),) if lora else (),
                              embeddings=(str(embedding),) if embedding else ())
            verdict = judge(run(request.check(model), model, encoder)[0].pixels, color, place)
            good += verdict["ok"]
            shows += verdict["concept"]
        rows.append({"prompt": prompt, "ok": good / seeds})
        ok += good
    total = seeds * len(PROMPTS)
    return {"share": ok / total, "shows_concept": shows / total, "stderr": math.sqrt(ok / total * (1 - ok / total)
                                                                                     / total), "prompts": rows}


def sample_grid(model, encoder, settings, path: Path, *, lora=None, embedding=None) -> None:
    from imagine.pipelines.request import Request, run
    from imagine.pipelines.unconditional import grid

    if path.exists():  # drawn by an earlier sitting
        return
    images = []
    for prompt, _, _ in PROMPTS:
        for seed in range(4):
            request = Request("txt2img", replace(settings, prompt=prompt, seed=1000 + seed, n=1),
                              loras=((str(lora), 1.0),) if lora else (),
                              embeddings=(str(embedding),) if embedding else ())
            images.append(run(request.check(model), model, encoder)[0].pixels)
    Image.fromarray(grid(np.stack(images), rows=len(PROMPTS)).squeeze()).save(path)


def shapes_eval(model, encoder, settings, per_category: int, lora=None) -> dict:
    from imagine.adapters.lora import attach, parts_of
    from imagine.evaluation.shapes_eval import evaluate_model, prompt_set
    from imagine.io.lora_keys import load_lora

    handle = None
    if lora:
        parts = parts_of(model, encoder)
        handle = attach(parts, [(load_lora(lora, parts), 1.0)], text_encoder=encoder)
    try:
        r = evaluate_model(model, encoder, prompt_set(per_category, 0), settings)
    finally:
        if handle is not None:
            handle.detach()
    return {"overall": r.overall, "stderr": r.stderr()["overall"], "categories": r.categories(),
            "passed": [v.ok for v in r.verdicts]}


def paired_diff(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """Mean of b - a over the same prompts and seeds, and its standard error."""
    d = np.array(b, dtype=float) - np.array(a, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def speed(model, encoder, settings, lora: Path, merged_dir: Path, images: int) -> dict:
    """Seconds per image: the base model, the LoRA attached (hooks every step), the LoRA merged."""
    from imagine.pipelines.request import Request, load_text_model, run

    def per_image(m, enc, loras=()):
        request = Request("txt2img", replace(settings, prompt="a red sks", seed=0, n=1), loras=loras)
        run(request.check(m), m, enc)  # warm
        tick = time.perf_counter()
        for i in range(images):
            run(Request("txt2img", replace(settings, prompt="a red sks", seed=i, n=1), loras=loras).check(m), m, enc)
        return (time.perf_counter() - tick) / images

    merged, merged_encoder = load_text_model(merged_dir)
    return {"base_s": per_image(model, encoder), "attached_s": per_image(model, encoder, ((str(lora), 1.0),)),
            "merged_s": per_image(merged, merged_encoder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "personalization")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--steps", type=int, default=600, help="DreamBooth-LoRA steps")
    parser.add_argument("--ti-steps", type=int, default=600)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--class-images", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=8, help="samples per identifier prompt")
    parser.add_argument("--per-category", type=int, default=25, help="ShapesEval prompts per category")
    parser.add_argument("--speed-images", type=int, default=8)
    parser.add_argument("--algos", default="loha,lokr,dora", help="LyCORIS / DoRA kinds to train beside LoRA")
    args = parser.parse_args()

    from imagine.data.images import load_folder
    from imagine.io.stable_diffusion import save_like
    from imagine.pipelines.generate import Settings
    from imagine.pipelines.request import load_text_model
    from imagine.train.lora import LoraTrainConfig, class_images, train_lora
    from imagine.train.textual_inversion import TextualInversionConfig, train_textual_inversion
    from imagine.weights import default_model

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "results.json"
    results = json.loads(state_path.read_text()) if state_path.exists() else {}

    def stage(name, fn):
        if name not in results:
            print(f"[{name}] ...", flush=True)
            results[name] = fn()
            state_path.write_text(json.dumps(results, indent=2))
        print(f"[{name}] {json.dumps(results[name])[:300]}", flush=True)
        return results[name]

    stage("detector", validate_detector)
    instances = write_instances(work / "instances")
    model, encoder = load_text_model(default_model())
    settings = Settings().with_model_defaults(model.spec, None, None, None)
    data = load_folder(instances, model.spec.image_size, captions=True)
    stage("base_share", lambda: concept_share(model, encoder, settings, args.seeds))
    stage("base_eval", lambda: shapes_eval(model, encoder, settings, args.per_category))

    def train(name: str, prior: bool, algo: str = "lora"):
        out = work / f"{name}.safetensors"
        rank = args.rank // 2 if algo == "loha" else args.rank  # LoHa's two pairs: as many numbers at half rank
        cfg = LoraTrainConfig(rank=rank, targets="attn+ff", steps=args.steps, batch_size=4, lr=1e-3,
                              prior_weight=1.0, checkpoint_every=50, algo=algo)
        tick = time.perf_counter()
        prior_data = class_images(model, encoder, CLASS_PROMPTS, args.class_images, work / "class_images") \
            if prior else None
        drawn = time.perf_counter() - tick
        resume = (work / f"{name}-training" / "latest").exists()
        tick = time.perf_counter()
        train_lora(model, encoder, data, cfg, out, resume=resume, prior=prior_data)
        return {"file": str(out), "bytes": out.stat().st_size, "train_minutes": (time.perf_counter() - tick) / 60,
                "class_image_minutes": drawn / 60, "resumed": resume, "config": cfg.__dict__}

    for name, prior in (("dreambooth_prior", True), ("dreambooth_no_prior", False)):
        info = stage(f"{name}_train", lambda name=name, prior=prior: train(name, prior))
        stage(f"{name}_share", lambda info=info: concept_share(model, encoder, settings, args.seeds,
                                                               lora=info["file"]))
        stage(f"{name}_eval", lambda info=info: shapes_eval(model, encoder, settings, args.per_category,
                                                            lora=info["file"]))
        sample_grid(model, encoder, settings, work / f"{name}.png", lora=info["file"])

    for algo in [a for a in args.algos.split(",") if a]:
        name = f"{algo}_prior"
        info = stage(f"{name}_train", lambda name=name, algo=algo: train(name, True, algo))
        stage(f"{name}_share", lambda info=info: concept_share(model, encoder, settings, args.seeds,
                                                               lora=info["file"]))
        stage(f"{name}_eval", lambda info=info: shapes_eval(model, encoder, settings, args.per_category,
                                                            lora=info["file"]))
        sample_grid(model, encoder, settings, work / f"{name}.png", lora=info["file"])

    def train_ti():
        out = work / "sks.safetensors"
        cfg = TextualInversionConfig(token="sks", vectors=2, init_word="shape", template="{caption}",
                                     steps=args.ti_steps, batch_size=4, lr=5e-3, checkpoint_every=50)
        resume = (work / "sks-training" / "latest").exists()
        tick = time.perf_counter()
        train_textual_inversion(model, encoder, data, cfg, out, resume=resume)
        return {"file": str(out), "bytes": out.stat().st_size, "train_minutes": (time.perf_counter() - tick) / 60,
                "resumed": resume, "config": cfg.__dict__}

    ti = stage("textual_inversion_train", train_ti)
    stage("textual_inversion_share", lambda: concept_share(model, encoder, settings, args.seeds,
                                                           embedding=ti["file"]))
    sample_grid(model, encoder, settings, work / "textual_inversion.png", embedding=ti["file"])

    def merged_speed(key: str = "dreambooth_prior", folder_name: str = "merged"):
        from imagine.adapters.lora import merge, parts_of
        from imagine.io.lora_keys import load_lora

        lora = results[f"{key}_train"]["file"]
        tuned, tuned_encoder = load_text_model(default_model())
        parts = parts_of(tuned, tuned_encoder)
        merge(parts, [(load_lora(lora, parts), 1.0)], text_encoder=tuned_encoder)
        folder = work / folder_name
        if not folder.exists():
            save_like(tuned, default_model(), folder)
        return speed(model, encoder, settings, Path(lora), folder, args.speed_images)

    stage("speed", merged_speed)
    for algo in [a for a in args.algos.split(",") if a]:
        stage(f"{algo}_prior_speed", lambda algo=algo: merged_speed(f"{algo}_prior", f"merged-{algo}"))
    write_report(results, args)


def write_report(results: dict, args) -> None:
    from imagine.evaluation.shapes_eval import CATEGORIES

    base = results["base_eval"]
    report = {k: {kk: vv for kk, vv in v.items() if kk != "passed"} if isinstance(v, dict) else v
              for k, v in results.items()}
    drift = {}
    for name in ("dreambooth_prior", "dreambooth_no_prior"):
        drift[name] = paired_diff(base["passed"], results[f"{name}_eval"]["passed"])
    report["drift"] = drift
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "personalization.json").write_text(json.dumps(report, indent=2))
    det = results["detector"]
    sp = results["speed"]
    md = ["# Personalization on a never-seen concept (a heart)", "",
          f"`python benchmarks/personalization.py` (defaults: DreamBooth-LoRA rank {args.rank}, attn+ff, "
          f"{args.steps} steps of 4 instance (+ 4 class) images at lr 1e-3; textual inversion 2 vectors, "
          f"{args.ti_steps} steps at lr 5e-3; {args.class_images} class images of ordinary single-object "
          f"captions). Base: the shipped model; all sampling at its defaults (DPM++ 2M, 25 steps, CFG 3). "
          "Work files and sample grids (rows: the prompts below; 4 seeds) are in runs/personalization/.", "",
          f"Detector (template IoU over the analyzer's segmentation): {det['hearts_detected']:.0%} of "
          f"{det['heart_renders']} heart renders read as hearts of the right colour; "
          f"{det['false_hearts_per_object']:.1%} of builtin:shapes objects read as hearts "
          f"({det['shapes_scenes']} scenes; all shapes right in {det['shapes_scenes_all_shapes_right']:.0%}).", "",
          "## Identifier prompts: a heart with the asked colour and place", "",
          f"{args.seeds} seeds for each of {len(PROMPTS)} prompts; the target is 80%.", "",
          "| | share right | shows a heart | " + " | ".join(f'"{p}"' for p, _, _ in PROMPTS) + " |",
          "|---|---|---|" + "---|" * len(PROMPTS)]
    for label, key in (("base model", "base_share"), ("DreamBooth-LoRA + prior", "dreambooth_prior_share"),
                       ("DreamBooth-LoRA, no prior", "dreambooth_no_prior_share"),
                       ("textual inversion", "textual_inversion_share")):
        r = results[key]
        md.append(f"| {label} | {r['share']:.0%} ± {r['stderr']:.0%} | {r['shows_concept']:.0%} | "
                  + " | ".join(f"{p['ok']:.0%}" for p in r["prompts"]) + " |")
    md += ["", "## Language drift: ShapesEval on ordinary prompts", "",
           f"{args.per_category} prompts per category, the same prompts and seeds for every model; the difference "
           "is paired (± its standard error). Target: within 0.03 of the base with the prior.", "",
           "| model | overall | vs base | " + " | ".join(CATEGORIES) + " |", "|---|---|---|" + "---|" * len(CATEGORIES)]
    for label, key, d in (("base", "base_eval", None), ("DreamBooth-LoRA + prior", "dreambooth_prior_eval",
                                                       drift["dreambooth_prior"]),
                          ("DreamBooth-LoRA, no prior", "dreambooth_no_prior_eval", drift["dreambooth_no_prior"])):
        r = results[key]
        md.append(f"| {label} | {r['overall']:.3f} ± {r['stderr']:.3f} | "
                  + (f"{d[0]:+.3f} ± {d[1]:.3f}" if d else "") + " | "
                  + " | ".join(f"{r['categories'][c]:.2f}" for c in CATEGORIES) + " |")
    md += ["", "## Cost", "", "| | file | training minutes (this 2-core CPU) |", "|---|---|---|"]
    for label, key in (("DreamBooth-LoRA + prior", "dreambooth_prior_train"),
                       ("DreamBooth-LoRA, no prior", "dreambooth_no_prior_train"),
                       ("textual inversion", "textual_inversion_train")):
        r = results[key]
        extra = (f" (+ {r['class_image_minutes']:.1f} drawing class images)" if r.get("class_image_minutes", 0) > 0.05
                 else "")
        md.append(f"| {label} | {r['bytes'] / 1e3:.0f} kB | {r['train_minutes']:.1f}{extra} |")
    md += ["", f"Generation, seconds per image ({args.speed_images} images, 25 steps): base {sp['base_s']:.2f}, "
           f"LoRA attached {sp['attached_s']:.2f} ({sp['attached_s'] / sp['base_s']:.2f}x), merged "
           f"{sp['merged_s']:.2f} ({sp['merged_s'] / sp['base_s']:.2f}x).", ""]
    algos = [a for a in args.algos.split(",") if a and f"{a}_prior_speed" in results]
    if algos:
        labels = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}
        md += ["## By adapter kind (DreamBooth with the prior)", "",
               f"The same data, steps, targets (attn+ff) and learning rate; LoRA and DoRA at rank {args.rank}, LoHa at "
               f"{args.rank // 2} (two pairs: as many numbers), LoKr at rank {args.rank} with its factors near the "
               "square roots of each side (it is small by construction). `train-lora --algo KIND` trains each.", "",
               "| kind | share right | shows a heart | ShapesEval vs base | file | training minutes | s / image "
               "attached | merged |", "|---|---|---|---|---|---|---|---|"]
        rows = [("lora", "dreambooth_prior", "speed")] + [(a, f"{a}_prior", f"{a}_prior_speed") for a in algos]
        for algo, key, speed_key in rows:
            share, ev, tr, spd = (results[f"{key}_share"], results[f"{key}_eval"], results[f"{key}_train"],
                                  results[speed_key])
            d = paired_diff(base["passed"], ev["passed"])
            md.append(f"| {labels[algo]} | {share['share']:.0%} ± {share['stderr']:.0%} | {share['shows_concept']:.0%} "
                      f"| {d[0]:+.3f} ± {d[1]:.3f} | {tr['bytes'] / 1e3:.0f} kB | {tr['train_minutes']:.1f} | "
                      f"{spd['attached_s']:.2f} ({spd['attached_s'] / spd['base_s']:.2f}x) | "
                      f"{spd['merged_s']:.2f} ({spd['merged_s'] / spd['base_s']:.2f}x) |")
        md.append("")
    (args.out / "personalization.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
