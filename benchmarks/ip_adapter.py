"""Image prompts measured on scenes the training never drew (builtin:shapes under another seed), starting from
the shipped model and its shipped IP-Adapters (content: the scorer's image tower; palette; intensity):

- fidelity: the image prompt alone (empty text): the share of generated images that contain every object of
  the reference (shape and colour, by the ShapesEval analyzer) and the mean CLIP-image similarity to the
  reference, beside the floor (the same images against another scene's reference; the model without the
  image prompt);
- the scale sweep: lambda from 0 to 1 with a text prompt that asks for another scene's objects: the share
  of images with the reference's objects and the share with the text's;
- composition: image prompt + "on a navy background": the reference's objects, the navy background, both;
- palette: the distance between the reference's and the output's CIELab palettes (1 - histogram
  intersection), with and without the palette condition; intensity: the correlation of the 8 x 8 luminance
  layouts, with and without the intensity condition;
- InstantID's recipe in our parts: the reference's objects placed by a keypoint ControlNet (trained here)
  on another layout: objects kept and objects at the asked places, for each part alone and both;
- cost: parameters added, training minutes (from the runs' logs), seconds per image against the base model.

    python benchmarks/ip_adapter.py              # writes docs/benchmarks/ip_adapter.{json,md}
    python benchmarks/ip_adapter.py --quick      # a smoke run

Stages are cached in --work (default runs/ip/): the keypoint ControlNet's training resumes exactly.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT_SEED = 7919
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _mean_se(values) -> list[float]:
    v = np.asarray(values, dtype=float)
    return [float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0]


def _has(objects, image: np.ndarray) -> list[bool]:
    """Per (shape, colour) asked: whether the analyzer finds such an object in the image."""
    from imagine.evaluation.shapes_analyzer import analyze

    found = {(d.shape, d.color) for d in analyze(image)}
    return [(o.shape, o.color) in found for o in objects]


def _placed(objects, image: np.ndarray, tolerance: float = 0.15) -> list[bool]:
    """Per object: whether one of its shape and colour is found within ``tolerance`` of its centre."""
    from imagine.evaluation.shapes_analyzer import analyze

    found = analyze(image)
    return [any((d.shape, d.color) == (o.shape, o.color) and np.hypot(d.center[0] - o.center[0],
                                                                         d.center[1] - o.center[1]) < tolerance
                for d in found) for o in objects]


def _prompt(path: Path, image: np.ndarray, scale: float = 1.0):
    from imagine.adapters.image_prompt import Prompted, cached_ip_adapter, encode_reference

    file = cached_ip_adapter(path)
    return Prompted(file, encode_reference(file, Image.fromarray(image)), scale)


def _generate(model, encoder, prompt: str, seed: int, prompts=(), controls=(), steps: int = 20) -> np.ndarray:
    import torch

    from imagine.pipelines.generate import Settings, txt2img
    from imagine.pipelines.unconditional import to_uint8

    s = Settings(prompt=prompt, seed=seed, steps=steps, sampler=model.spec.default_sampler,
                 cfg_scale=model.spec.default_cfg)
    with torch.no_grad():
        return to_uint8(txt2img(model, s, encoder, attachments=[*controls, *prompts]))[0]


def train_keypoints(work: Path, steps: int, results: dict, save) -> Path:
    from imagine.data.shapes import ShapesDataset
    from imagine.pipelines.request import load_text_model
    from imagine.train.control import ControlTrainConfig, train_control
    from imagine.weights import default_model

    out = work / "controlnet-keypoints"
    if "keypoints" in results.get("training", {}) and out.exists():
        return out
    model, encoder = load_text_model(default_model())
    cfg = ControlTrainConfig(condition="keypoints", kind="controlnet", steps=steps, batch_size=8, lr=1e-4,
                             checkpoint_every=100, log_every=20)
    resume = (work / "controlnet-keypoints-training" / "latest").exists()
    print(f"training a keypoint ControlNet ({steps} steps){' (resumed)' if resume else ''}", flush=True)
    train_control(model, encoder, ShapesDataset(size=model.spec.image_size), cfg, out, resume=resume)
    cost = _log_cost(work / "controlnet-keypoints-training")
    results.setdefault("training", {})["keypoints"] = {"steps": steps, **cost}
    save()
    return out


def _log_cost(folder: Path) -> dict:
    log_path = folder / "log.jsonl"
    if not log_path.exists():
        return {}
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    per_step = float(np.median([e["seconds"] for e in log]))
    return {"seconds_per_step": per_step, "minutes": per_step * log[-1]["step"] / 60, "steps": log[-1]["step"],
            "batch": None}


def measure(adapters: dict[str, Path], keypoint_net: Path, work: Path, n: int, steps: int, results: dict,
            save) -> None:
    import torch

    from imagine.adapters.control import Conditioner, cached_control, condition_tensor
    from imagine.data.conditions import detect
    from imagine.data.shapes import ShapesDataset, compose, render
    from imagine.evaluation.shapes_analyzer import background_name
    from imagine.models.image_encoders import intensity, palette, palette_distance
    from imagine.pipelines.request import load_scorer, load_text_model
    from imagine.weights import default_model

    model, encoder = load_text_model(default_model())
    clip = load_scorer().model
    data = ShapesDataset(size=model.spec.image_size, seed=HELD_OUT_SEED)
    scenes = [data.scene(i) for i in range(n)]
    m = results.setdefault("measures", {})

    def tensor(img):
        return torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]

    def embed(img):
        with torch.no_grad():
            return clip.encode_image(tensor(img))[0]

    def stage(name, fn):
        if name not in m:
            start = time.perf_counter()
            m[name] = fn()
            m[name]["seconds"] = time.perf_counter() - start
            save()
            print(f"{name}: done in {m[name]['seconds']:.0f} s", flush=True)

    content = adapters["content"]

    def fidelity():
        has, sim, floor, base_has = [], [], [], []
        refs = [embed(img) for _, img in scenes]
        for i, (scene, img) in enumerate(scenes):
            out = _generate(model, encoder, "", i, [_prompt(content, img)], steps=steps)
            base = _generate(model, encoder, "", i, steps=steps)
            has.append(all(_has(scene.objects, out)))
            base_has.append(all(_has(scene.objects, base)))
            e = embed(out)
            sim.append(float(e @ refs[i]))
            floor.append(float(e @ refs[(i + 1) % n]))
        return {"contains_all": _mean_se(has), "base_contains_all": _mean_se(base_has),
                "clip_similarity": _mean_se(sim), "random_pair_similarity": _mean_se(floor)}

    stage("fidelity", fidelity)

    def sweep():
        out = {}
        for scale in SCALES:
            image_kept, text_kept = [], []
            for i, (scene, img) in enumerate(scenes):
                other, _ = scenes[(i + n // 2) % n]
                gen = _generate(model, encoder, other.caption, i, [_prompt(content, img, scale)], steps=steps)
                image_kept.append(all(_has(scene.objects, gen)))
                text_kept.append(all(_has(other.objects, gen)))
            out[f"{scale:g}"] = {"image_objects": _mean_se(image_kept), "text_objects": _mean_se(text_kept)}
        return out

    stage("scale_sweep", sweep)

    def composition():
        out = {}
        chosen = [(s, img) for s, img in scenes if s.background != "navy"]
        for scale in (0.5, 1.0):
            objs, navy, both = [], [], []
            for i, (scene, img) in enumerate(chosen):
                gen = _generate(model, encoder, "on a navy background", i, [_prompt(content, img, scale)], steps=steps)
                o, b = all(_has(scene.objects, gen)), background_name(gen) == "navy"
                objs.append(o)
                navy.append(b)
                both.append(o and b)
            out[f"{scale:g}"] = {"objects": _mean_se(objs), "navy": _mean_se(navy), "both": _mean_se(both),
                                 "scenes": len(chosen)}
        return out

    stage("composition", composition)

    def global_conditions():
        pal_with, pal_without, int_with, int_without = [], [], [], []
        for i, (_, img) in enumerate(scenes):
            ref = tensor(img)
            base = _generate(model, encoder, "", i, steps=steps)
            with_palette = _generate(model, encoder, "", i, [_prompt(adapters["palette"], img)], steps=steps)
            with_intensity = _generate(model, encoder, "", i, [_prompt(adapters["intensity"], img)], steps=steps)
            pal_with.append(float(palette_distance(palette(ref), palette(tensor(with_palette)))))
            pal_without.append(float(palette_distance(palette(ref), palette(tensor(base)))))
            r = intensity(ref)[0, :64]
            int_with.append(float(np.corrcoef(r, intensity(tensor(with_intensity))[0, :64])[0, 1]))
            int_without.append(float(np.corrcoef(r, intensity(tensor(base))[0, :64])[0, 1]))
        return {"palette_distance_with": _mean_se(pal_with), "palette_distance_without": _mean_se(pal_without),
                "intensity_correlation_with": _mean_se(np.nan_to_num(int_with)),
                "intensity_correlation_without": _mean_se(np.nan_to_num(int_without))}

    stage("global_conditions", global_conditions)

    def instant_id():
        import random

        net = cached_control(keypoint_net)
        out = {"image_prompt": ([], []), "keypoints": ([], []), "both": ([], [])}
        for i, (scene, img) in enumerate(scenes):
            rng = random.Random(f"instantid:{i}")
            try:
                target = compose([(o.shape, o.color, o.size) for o in scene.objects], rng,
                                 background=scene.background)
            except ValueError:
                continue
            target_img = render(target, data.size)
            points = Image.fromarray(detect("keypoints", target_img))
            unit = Conditioner(net, condition_tensor(points))
            for name, prompts, controls in (("image_prompt", [_prompt(content, img)], []),
                                            ("keypoints", [], [unit]),
                                            ("both", [_prompt(content, img)], [unit])):
                gen = _generate(model, encoder, "", i, prompts, controls, steps=steps)
                out[name][0].append(all(_has(scene.objects, gen)))
                out[name][1].append(float(np.mean(_placed(target.objects, gen))))
        return {k: {"objects_kept": _mean_se(a), "placed": _mean_se(b)} for k, (a, b) in out.items()}

    stage("instant_id", instant_id)

    def cost():
        scene, img = scenes[0]
        prompt = _prompt(content, img)
        times = {"base": [], "image_prompt": []}
        for _ in range(5):
            for name, prompts in (("base", []), ("image_prompt", [prompt])):
                start = time.perf_counter()
                _generate(model, encoder, scene.caption, 0, prompts, steps=steps)
                times[name].append(time.perf_counter() - start)
        base, with_ip = float(np.median(times["base"])), float(np.median(times["image_prompt"]))
        params = {k: sum(p.numel() for p in _prompt(path, img).file.model.parameters()) for k, path in adapters.items()}
        training = {k: _log_cost(work / f"{enc}-training") for k, enc in
                    (("content", "shapes-clip"), ("palette", "palette"), ("intensity", "intensity"))}
        return {"seconds_base": base, "seconds_image_prompt": with_ip, "ratio": with_ip / base, "parameters": params,
                "training": training}

    stage("cost", cost)


def write_report(results: dict, out_dir: Path, n: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ip_adapter.json").write_text(json.dumps(results, indent=2))
    m = results.get("measures", {})

    def pct(pair):
        return "-" if pair is None else f"{100 * pair[0]:.0f}% ± {100 * pair[1]:.0f}%"

    def num(pair):
        return "-" if pair is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"

    lines = [f"# Image prompts on {n} held-out builtin:shapes scenes (shipped model, shipped IP-Adapters)", "",
             "Generated by `python benchmarks/ip_adapter.py`; mean ± standard error, one image per scene, "
             f"{results.get('steps', 20)} steps.", ""]
    if "fidelity" in m:
        f = m["fidelity"]
        lines += ["## Fidelity: the image prompt alone (empty text)", "",
                  "| | images with every reference object | CLIP-image similarity to the reference |", "|---|---|---|",
                  f"| with the image prompt (scale 1) | {pct(f['contains_all'])} | {num(f['clip_similarity'])} |",
                  f"| floor: the same images against another scene's reference | - | "
                  f"{num(f['random_pair_similarity'])} |",
                  f"| floor: the model without it (empty text) | {pct(f['base_contains_all'])} | - |", ""]
    if "scale_sweep" in m:
        lines += ["## The scale against a text prompt that asks for another scene's objects", "",
                  "| scale | images with the reference's objects | images with the text's objects |", "|---|---|---|"]
        for scale, r in m["scale_sweep"].items():
            if not isinstance(r, dict):  # the stage's own seconds
                continue
            lines.append(f"| {scale} | {pct(r['image_objects'])} | {pct(r['text_objects'])} |")
        lines.append("")
    if "composition" in m:
        lines += ["## Composition: image prompt + \"on a navy background\"", "",
                  "| scale | reference's objects | navy background | both |", "|---|---|---|---|"]
        for scale, r in m["composition"].items():
            if not isinstance(r, dict):
                continue
            lines.append(f"| {scale} | {pct(r['objects'])} | {pct(r['navy'])} | {pct(r['both'])} |")
        lines.append("")
    if "global_conditions" in m:
        g = m["global_conditions"]
        lines += ["## Composer's global conditions (empty text)", "", "| | with the condition | without |",
                  "|---|---|---|",
                  f"| palette distance to the reference (1 - histogram intersection; lower is closer) | "
                  f"{num(g['palette_distance_with'])} | {num(g['palette_distance_without'])} |",
                  f"| 8 x 8 luminance correlation with the reference | {num(g['intensity_correlation_with'])} | "
                  f"{num(g['intensity_correlation_without'])} |", ""]
    if "instant_id" in m:
        lines += ["## InstantID's recipe: the reference's objects, placed by a keypoint ControlNet", "",
                  "Keypoints from the same objects laid out anew; placed: the share of objects found (shape and "
                  "colour) within 0.15 of the asked centre.", "",
                  "| parts | images with every reference object | objects placed |", "|---|---|---|"]
        for name, label in (("image_prompt", "image prompt alone"), ("keypoints", "keypoint ControlNet alone"),
                            ("both", "both (`--image-prompt ref.png --control keypoints:points.png`)")):
            r = m["instant_id"][name]
            lines.append(f"| {label} | {pct(r['objects_kept'])} | {pct(r['placed'])} |")
        lines.append("")
    if "cost" in m:
        c = m["cost"]
        lines += ["## Cost", "", "| adapter | parameters | training (min, this CPU) |", "|---|---|---|"]
        for k, p in c["parameters"].items():
            t = c["training"].get(k, {})
            minutes = f"{t['minutes']:.1f} ({t['steps']} steps)" if t else "-"
            lines.append(f"| {k} | {p / 1e6:.2f} M | {minutes} |")
        lines += ["", f"Seconds per image ({results.get('steps', 20)} steps, median of 5): "
                  f"base {c['seconds_base']:.2f}, with one image prompt {c['seconds_image_prompt']:.2f} "
                  f"({c['ratio']:.2f}x)."]
    (out_dir / "ip_adapter.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ip")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--adapters", type=Path, default=None, help="folder with content/palette/intensity "
                        ".safetensors (default: the shipped ones)")
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--keypoint-steps", type=int, default=800)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.scenes, args.steps, args.keypoint_steps = 3, 4, 4
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / ("results-quick.json" if args.quick else "results.json")
    results = json.loads(cache.read_text()) if cache.exists() else {}
    results["steps"] = args.steps

    def save() -> None:
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(cache)

    from imagine.adapters.image_prompt import builtin_ip_adapters

    folder = args.adapters
    found = {p.stem: p for p in (sorted(folder.glob("*.safetensors")) if folder else builtin_ip_adapters())}
    adapters = {}
    for kind in ("content", "palette", "intensity"):
        match = [p for stem, p in found.items() if kind in stem or (kind == "content" and "clip" in stem)]
        if not match:
            raise SystemExit(f"no {kind} IP-Adapter among {sorted(found)}")
        adapters[kind] = match[0]
    work = args.work / "quick" if args.quick else args.work
    work.mkdir(parents=True, exist_ok=True)
    keypoint_net = train_keypoints(work, args.keypoint_steps, results, save)
    measure(adapters, keypoint_net, args.work, args.scenes, args.steps, results, save)
    write_report(results, args.out if not args.quick else work, args.scenes)
    print(f"wrote {(args.out if not args.quick else work) / 'ip_adapter.md'}")


if __name__ == "__main__":
    main()
