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


def _generate(model, encoder, prompt: str, seed: int, units=(), steps: int = 20, init=None, strength=0.5,
              size: int | None = None) -> np.ndarray:
    import torch

    from imagine.pipelines.generate import Settings, img2img, txt2img
    from imagine.pipelines.unconditional import to_uint8

    s = Settings(prompt=prompt, seed=seed, steps=steps, sampler=model.spec.default_sampler,
                 cfg_scale=model.spec.default_cfg, width=size, height=size, strength=strength)
    with torch.no_grad():
        if init is None:
            return to_uint8(txt2img(model, s, encoder, attachments=list(units)))[0]
        return to_uint8(img2img(model, s, Image.fromarray(init), encoder, attachments=list(units)))[0]


def _unit(model_dir: Path, condition_map: np.ndarray, weight: float = 1.0):
    from imagine.adapters.control import Conditioner, cached_control, condition_tensor

    return Conditioner(cached_control(model_dir), condition_tensor(Image.fromarray(condition_map)), weight)


def _object_scores(scene, image: np.ndarray) -> list[tuple[float, bool]]:
    """Per laid-out object: (best IoU with a region found in the image, whether that region has its colour)."""
    from imagine.data.conditions import regions
    from imagine.data.shapes import COLORS
    from imagine.evaluation.shapes_analyzer import coverage

    labels, count = regions(image)
    _, best = coverage(image)
    names = list(COLORS)
    out = []
    for obj in scene.objects:
        ious = [((labels == k) & obj.mask).sum() / max(1, ((labels == k) | obj.mask).sum())
                for k in range(1, count + 1)]
        if not ious or max(ious) == 0:
            out.append((0.0, False))
            continue
        k = 1 + int(np.argmax(ious))
        colour = names[int(np.bincount(best[labels == k], minlength=len(names)).argmax())]
        out.append((float(max(ious)), colour == obj.color))
    return out


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def measure(work: Path, out_dir: Path, n_scenes: int, results: dict, save) -> None:
    from skimage.metrics import peak_signal_noise_ratio

    from imagine.adapters.control import cached_control
    from imagine.data.conditions import detect
    from imagine.data.shapes import COLORS, ShapesDataset, render
    from imagine.evaluation.shapes_analyzer import analyze
    from imagine.pipelines.request import load_text_model
    from imagine.weights import default_model

    model, encoder = load_text_model(default_model())
    shapes = ShapesDataset(size=model.spec.image_size, seed=HELD_OUT_SEED)
    scenes = [shapes.scene(i) for i in range(n_scenes)]
    m = results.setdefault("measures", {})

    if "ceiling" not in m:  # the measurement on the true renders: what a perfect model would score
        scores = [sc for scene, img in scenes for sc in _object_scores(scene, img)]
        m["ceiling"] = {"iou": _mean_se([x for x, _ in scores]), "colour_in_region": _mean_se([c for _, c in scores])}
        save()
    if "uncontrolled" not in m:  # the base model on the same captions: does it draw the asked colours?
        hits = []
        for i, (scene, _) in enumerate(scenes):
            found = {d.color for d in analyze(_generate(model, encoder, scene.caption, i))}
            hits += [o.color in found for o in scene.objects]
        m["uncontrolled"] = {"colour_drawn": _mean_se(hits)}
        save()
    for name in ("controlnet-segmentation", "controlnet-canny", "adapter-segmentation", "adapter-canny"):
        if name in m or not (work / name).exists():
            continue
        condition = RUNS[name][1]
        ious, colours, drawn = [], [], []
        for i, (scene, img) in enumerate(scenes):
            out = _generate(model, encoder, scene.caption, i, [_unit(work / name, detect(condition, img))])
            for iou, colour in _object_scores(scene, out):
                ious.append(iou)
                colours.append(colour)
            found = {d.color for d in analyze(out)}
            drawn += [o.color in found for o in scene.objects]
        # the prompt still matters: single objects, another colour word, the same condition
        others, asked = list(COLORS), []
        singles = [(scene, img) for scene, img in scenes if len(scene.objects) == 1][:20]
        for j, (scene, img) in enumerate(singles):
            obj = scene.objects[0]
            colour = next(c for c in others[j % len(others):] + others if c != obj.color)
            out = _generate(model, encoder, f"a {colour} {obj.shape}", j, [_unit(work / name, detect(condition, img))])
            recoloured = type(scene)(**{**scene.__dict__, "objects": [type(obj)(**{**obj.__dict__, "color": colour})]})
            asked.append(_object_scores(recoloured, out)[0][1])
        net = cached_control(work / name).model
        m[name] = {"iou": _mean_se(ious), "colour_in_region": _mean_se(colours), "colour_drawn": _mean_se(drawn),
                   "other_colour_followed": _mean_se(asked), "parameters": sum(p.numel() for p in net.parameters())}
        save()
    if "multi" not in m and (work / "controlnet-segmentation").exists() and (work / "controlnet-canny").exists():
        first, second = [], []
        pairs = [(scene, img) for scene, img in scenes if len(scene.objects) >= 2][:20]
        for i, (scene, _) in enumerate(pairs):
            a, b = scene.objects[0], scene.objects[1]
            only = [type(scene)(**{**scene.__dict__, "objects": [o]}) for o in (a, b)]
            units = [_unit(work / "controlnet-segmentation", detect("segmentation", render(only[0], 64)), 1.0),
                     _unit(work / "controlnet-canny", detect("canny", render(only[1], 64)), 0.8)]
            out = _generate(model, encoder, scene.caption, i, units)
            both = _object_scores(type(scene)(**{**scene.__dict__, "objects": [a, b]}), out)
            first.append(both[0][0])
            second.append(both[1][0])
        m["multi"] = {"segmentation_unit_iou": _mean_se(first), "canny_unit_iou": _mean_se(second),
                      "weights": [1.0, 0.8], "pairs": len(pairs)}
        save()
    if "speed" not in m:
        rows = {"uncontrolled": [], "controlnet": [], "t2i_adapter": []}
        scene, img = scenes[0]
        seg = detect("segmentation", img)
        units = {"uncontrolled": [],
                 "controlnet": [_unit(work / "controlnet-segmentation", seg)]
                 if (work / "controlnet-segmentation").exists() else None,
                 "t2i_adapter": [_unit(work / "adapter-segmentation", seg)]
                 if (work / "adapter-segmentation").exists() else None}
        for r in range(6):  # interleaved rounds, 25 steps (the shipped default)
            for key, u in units.items():
                if u is None:
                    continue
                for c in u:
                    c._features = None
                start = time.perf_counter()
                _generate(model, encoder, scene.caption, r, u, steps=25)
                rows[key].append(time.perf_counter() - start)
        m["speed"] = {k: float(np.median(v)) for k, v in rows.items() if v}
        m["speed"]["ratios"] = {k: float(np.median(np.asarray(v) / np.asarray(rows["uncontrolled"])))
                                for k, v in rows.items() if v and k != "uncontrolled"}
        save()
    if "tile" not in m and (work / "controlnet-tile").exists():
        tile = {}
        for size in (128, 256):
            lanczos, tiled = [], []
            for i, (scene, img) in enumerate(scenes[:8]):
                truth = render(scene, size)
                up = np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS))
                out = _generate(model, encoder, scene.caption, i, [_unit(work / "controlnet-tile", detect("tile", up))],
                                init=up, strength=0.4, size=size)
                lanczos.append(peak_signal_noise_ratio(truth, up))
                tiled.append(peak_signal_noise_ratio(truth, out))
                if i == 0:
                    Image.fromarray(np.concatenate([up, out, truth], 1)).save(out_dir / f"control_tile_{size}.png")
            tile[str(size)] = {"lanczos_psnr": _mean_se(lanczos), "tile_psnr": _mean_se(tiled)}
        m["tile"] = tile
        save()
    write_report(results, out_dir, n_scenes)


def write_report(results: dict, out_dir: Path, n_scenes: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "control.json").write_text(json.dumps(results, indent=2))
    m, training = results.get("measures", {}), results.get("training", {})

    def f(pair, pct=False):
        if pair is None:
            return "-"
        mean, se = pair
        return f"{100 * mean:.0f}% ± {100 * se:.0f}%" if pct else f"{mean:.2f} ± {se:.2f}"

    lines = [f"# Spatial control on {n_scenes} held-out builtin:shapes layouts (shipped model)", "",
             "Generated by `python benchmarks/control.py`; mean ± standard error.", "",
             "| model | mean IoU | colour in region | asked colours drawn | other colour word followed | "
             "parameters | training (min) | s / image vs uncontrolled |", "|---|---|---|---|---|---|---|---|"]
    if "ceiling" in m:
        c = m["ceiling"]
        lines.append(f"| the true renders (the measure's ceiling) | {f(c['iou'])} | {f(c['colour_in_region'], True)} "
                     "| - | - | - | - | - |")
    base = m.get("uncontrolled", {})
    lines.append(f"| uncontrolled | - | - | {f(base.get('colour_drawn'), True)} | - | - | - | 1.00 |")
    ratios = m.get("speed", {}).get("ratios", {})
    for name in ("controlnet-segmentation", "controlnet-canny", "adapter-segmentation", "adapter-canny"):
        r = m.get(name)
        if r is None:
            continue
        t = training.get(name, {})
        minutes = (t.get("seconds_per_step") or 0) * t.get("steps", 0) / 60
        ratio = ratios.get("controlnet" if name.startswith("controlnet") else "t2i_adapter")
        lines.append(f"| {name} | {f(r['iou'])} | {f(r['colour_in_region'], True)} | {f(r['colour_drawn'], True)} | "
                     f"{f(r['other_colour_followed'], True)} | {r['parameters'] / 1e6:.2f} M | {minutes:.1f} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
    if "multi" in m:
        mu = m["multi"]
        lines += ["", f"Multi-control ({mu['pairs']} two-object layouts): a segmentation unit (weight 1) lays out "
                  f"the first object, a canny unit (weight 0.8) the second; IoU {f(mu['segmentation_unit_iou'])} and "
                  f"{f(mu['canny_unit_iou'])}."]
    if "tile" in m:
        lines += ["", "| Tile upscale of a 64 px render | Lanczos PSNR (dB) | Tile ControlNet + img2img PSNR (dB) |",
                  "|---|---|---|"]
        for size, r in m["tile"].items():
            lines.append(f"| 64 -> {size} | {f(r['lanczos_psnr'])} | {f(r['tile_psnr'])} |")
    (out_dir / "control.md").write_text("\n".join(lines) + "\n")


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
