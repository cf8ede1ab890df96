"""Which denoiser learns the shapes language best at equal training compute: the UNet (v or flow), PixArt's
DiT (cross-attention), SD3's MMDiT (joint attention) or Flux's (double- then single-stream blocks)? Issue 32's
question, measured on builtin:shapes-language
in the shipped model's VAE latents (64 px images, 16 x 16 x 4 latents).

Compute: each network's training FLOPs per step (forward and backward, counted by torch's FlopCounterMode on one
batch) fix its step count so that every run spends the same ``--budget`` (in TFLOPs); the wall time each took
on this machine is reported beside it. Quality, comparable across parametrizations: the **denoising error** on
held-out scenes (items 10^8 onward, never read by training), E||D(x_s, s) - x0||^2 of each model's denoiser at
the same noise levels (VE sigma s; a flow model's t = s / (1 + s)), with standard errors over scenes; and, with
``--shapes-eval N``, ShapesEval on N prompts (prompt following, per category).

    python benchmarks/transformer_vs_unet.py --budget 20 --out runs/arch-compare    # minutes per run on 2 cores
    python benchmarks/transformer_vs_unet.py --budget 2000 --shapes-eval 150 ...     # the real comparison (a GPU)

Runs are resumable (rerun the same command); results go to docs/benchmarks/transformer_vs_unet.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from imagine.data.images import load_dataset
from imagine.data.shapes import language_caption, make_scene
from imagine.diffusion.model_sampling import model_sampling
from imagine.evaluation.shapes_eval import CATEGORIES, evaluate_model, prompt_set
from imagine.families import of_network
from imagine.io.model_folder import load_model_folder
from imagine.models.text_encoders import load_text_encoder
from imagine.pipelines.settings import Settings
from imagine.train.config import preset
from imagine.train.loop import make_network, read_log
from imagine.train.recipe import train_model
from imagine.weights import default_model

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # name -> (arch, prediction, other TrainConfig fields: the text-conditioning ablations)
    "unet-v": ("unet", "v", {}),
    "unet-flow": ("unet", "flow", {}),
    "pixart-flow": ("pixart", "flow", {}),
    "mmdit-flow": ("mmdit", "flow", {}),
    "flux-flow": ("flux", "flow", {}),
    "unet-flow-textnoise": ("unet", "flow", {"text_noise": 0.3}),  # noise on the text states in training
    "mmdit-flow-textnoise": ("mmdit", "flow", {"text_noise": 0.3}),
}
SIGMAS = (0.1, 0.3, 1.0, 3.0, 10.0)  # VE noise levels of the held-out denoising error
HELD_OUT = 10**8  # the first held-out item index of builtin:shapes-language


def config(name: str, steps: int):
    arch, prediction, extra = RUNS[name]
    cfg = replace(preset("t2i"), **extra)
    return replace(cfg, arch=arch, prediction=prediction, steps=steps, data="builtin:shapes-language",
                   min_snr_gamma=cfg.min_snr_gamma if prediction != "flow" else None, sample_every=0,
                   checkpoint_every=max(1, steps // 4), warmup_steps=min(cfg.warmup_steps, max(1, steps // 10)))


def step_flops(cfg, text_encoder, vae) -> float:
    """FLOPs of one training step: forward and backward of the network on one batch (the frozen encoders left
    out: every run pays them alike)."""
    side = cfg.image_size // vae.config.downscale
    net = make_network(cfg, vae.config.latent_channels, 0, text_encoder.dim, side=side)
    b = cfg.batch_size
    text = text_encoder.encode(["a red circle above a blue square"] * b)
    x = torch.randn(b, vae.config.latent_channels, side, side)
    kwargs = {"encoder_hidden_states": text.context, "encoder_attention_mask": text.mask,
              **of_network(net).conditioning(text.pooled, cfg.image_size, cfg.image_size, text.context, text.mask)}
    with FlopCounterMode(display=False) as counter:
        net(x, torch.full((b,), 500.0), **kwargs).float().pow(2).mean().backward()
    return float(counter.get_total_flops()), sum(p.numel() for p in net.parameters())


@torch.no_grad()
def denoising_error(model_dir: Path, text_encoder, n: int = 64) -> dict:
    """E||D(x_s, s) - x0||^2 per VE noise level over n held-out scenes, with standard errors."""
    model = load_model_folder(model_dir)
    plan = model_sampling(model.spec)
    data = load_dataset("builtin:shapes-language", model.spec.image_size, 3, captions=True)
    images, _, captions = data.batch(list(range(HELD_OUT, HELD_OUT + n)))
    x0 = model.vae.to_latent(model.vae.encode(images).mean)
    text = text_encoder.encode(list(captions))
    cond = {"encoder_hidden_states": text.context, "encoder_attention_mask": text.mask,
            **model.family.conditioning(text.pooled, 64, 64, text.context, text.mask)}
    other = text_encoder.encode(list(captions[1:]) + list(captions[:1]))
    # the same scenes said in the held-out half of the shapes language (words and orders no caption trained on)
    held = text_encoder.encode([language_caption(make_scene(i), i, half="held_out", always=True)
                                for i in range(HELD_OUT, HELD_OUT + n)])
    paraphrased = {"encoder_hidden_states": held.context, "encoder_attention_mask": held.mask,
                   **model.family.conditioning(held.pooled, 64, 64, held.context, held.mask)}
    shifted = {"encoder_hidden_states": other.context, "encoder_attention_mask": other.mask,
               **model.family.conditioning(other.pooled, 64, 64, other.context, other.mask)}
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    denoiser = plan.denoiser(model.unet)
    out = {}
    for s in SIGMAS:
        if plan.signal is None:  # VE view: x = x0 + s eps
            sigma, x = torch.full((n,), s), x0 + s * noise
        else:  # flow time of the same noise-to-signal ratio: x_t = (1 - t) x0 + t eps
            t = s / (1 + s)
            sigma, x = torch.full((n,), t), (1 - t) * x0 + t * noise
        err = (denoiser(x, sigma, cond) - x0).pow(2).flatten(1).mean(1)
        # the same scenes under another scene's caption: how much worse the model does is how much it reads
        # its prompt (0 for a model that ignores the text)
        wrong = (denoiser(x, sigma, shifted) - x0).pow(2).flatten(1).mean(1) - err
        # and under a held-out phrasing of its own caption: 0 if the model reads the new words as well as the
        # trained ones, the text gain if it reads nothing of them
        gap = (denoiser(x, sigma, paraphrased) - x0).pow(2).flatten(1).mean(1) - err
        out[str(s)] = {"mean": float(err.mean()), "se": float(err.std() / math.sqrt(n)),
                       "text_gain": float(wrong.mean()), "text_gain_se": float(wrong.std() / math.sqrt(n)),
                       "phrasing_gap": float(gap.mean()), "phrasing_gap_se": float(gap.std() / math.sqrt(n))}
    out["mean"] = float(np.mean([out[str(s)]["mean"] for s in SIGMAS]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=20.0, help="training compute per run, TFLOPs")
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "arch-compare")
    ap.add_argument("--shapes-eval", type=int, default=0, help="ShapesEval prompts per model (0: skip)")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks")
    ap.add_argument("--name", default="transformer_vs_unet", help="the results' file name (json and md)")
    ap.add_argument("--shipped", action="store_true", help="also measure the shipped default model (trained far "
                                                           "longer: the scale the runs are aiming at)")
    ap.add_argument("--include", type=Path, help="an earlier results JSON at the same budget whose runs are not "
                                                 "measured anew: they join the table as they were")
    args = ap.parse_args()
    vae_dir = default_model() / "vae"
    text_encoder = load_text_encoder(preset("t2i").text_encoder)
    vae = load_model_folder(default_model()).vae
    rows = []
    for name in args.runs:
        per_step, params = step_flops(config(name, 1), text_encoder, vae)
        steps = max(1, int(args.budget * 1e12 / per_step))
        cfg = config(name, steps)
        out = args.out / name
        start = time.perf_counter()
        finished = (out / "unet" / "model.safetensors").exists() and (out / "log.jsonl").exists() and \
            read_log(out / "log.jsonl")[-1]["step"] >= steps
        if not finished:  # a new run, or one cut short: resumed from its last checkpoint
            train_model(cfg, "builtin:shapes-language", out, vae=vae_dir, resume=(out / "checkpoints").is_dir(),
                        log=lambda _: None)
        log = read_log(out / "log.jsonl")
        # the log keeps every log_every-th step's time: the run's wall time is the steps times their mean
        wall = steps * float(np.mean([r["seconds"] for r in log])) if log else time.perf_counter() - start
        row = {"run": name, "arch": cfg.arch, "prediction": cfg.prediction, "params_m": params / 1e6,
               "gflops_per_step": per_step / 1e9, "steps": steps, "tflops": steps * per_step / 1e12,
               "wall_s": wall, "denoising_error": denoising_error(out, text_encoder)}
        if args.shapes_eval:
            model = load_model_folder(out)
            prompts = prompt_set(per_category=max(1, args.shapes_eval // len(CATEGORIES)))
            report = evaluate_model(model, text_encoder, prompts, Settings(steps=25, sampler="euler", cfg_scale=3.0))
            row["shapes_eval"] = report.to_json()
        rows.append(row)
        print(json.dumps(row))
    if args.shipped:  # not trained here: its error and text figures only, for scale
        rows.append({"run": "shipped-default", "arch": "unet", "prediction": "v", "reference": True,
                     "params_m": sum(p.numel() for p in load_model_folder(default_model()).unet.parameters()) / 1e6,
                     "gflops_per_step": float("nan"), "steps": 0, "tflops": float("nan"), "wall_s": float("nan"),
                     "denoising_error": denoising_error(default_model(), text_encoder)})
    if args.include is not None:
        earlier = json.loads(args.include.read_text())
        if earlier["budget_tflops"] != args.budget:
            raise SystemExit(f"{args.include} was measured at {earlier['budget_tflops']} TFLOPs, not {args.budget}")
        measured = {r["run"] for r in rows}
        rows = [r for r in earlier["runs"] if r["run"] not in measured] + rows
        rows.sort(key=lambda r: list(RUNS).index(r["run"]) if r["run"] in RUNS else len(RUNS))
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / f"{args.name}.json").write_text(json.dumps({"budget_tflops": args.budget, "runs": rows},
                                                                   indent=2) + "\n")
    head = "| run | params (M) | GFLOPs/step | steps | wall (s) | " + \
        " | ".join(f"err @ s={s}" for s in SIGMAS) + " | mean |"
    lines = [f"# Denoisers at equal training compute ({args.budget:g} TFLOPs each), builtin:shapes-language", "",
             f"Command: `python benchmarks/transformer_vs_unet.py --budget {args.budget:g}"
             f"{' --shapes-eval ' + str(args.shapes_eval) if args.shapes_eval else ''}`. Held-out denoising "
             "error E||D(x_s, s) - x0||^2 in the shipped VAE's latents (64 held-out scenes; +- one standard "
             "error), lower is better.", "", head, "|" + "---|" * (6 + len(SIGMAS))]
    for r in rows:
        e = r["denoising_error"]
        cells = " | ".join(f"{e[str(s)]['mean']:.4f} +- {e[str(s)]['se']:.4f}" for s in SIGMAS)
        lines.append(f"| {r['run']} | {r['params_m']:.2f} | {r['gflops_per_step']:.1f} | {r['steps']} | "
                     f"{r['wall_s']:.0f} | {cells} | {e['mean']:.4f} |")
    lines += ["", "**How much each model reads its prompt**: the error's rise when each scene is denoised under "
              "another scene's caption (higher: the text steers more; +- one standard error).", "",
              "| run | " + " | ".join(f"gain @ s={s}" for s in SIGMAS) + " |", "|" + "---|" * (1 + len(SIGMAS))]
    for r in rows:
        e = r["denoising_error"]
        lines.append(f"| {r['run']} | " + " | ".join(
            f"{e[str(s)].get('text_gain', float('nan')):.4f} +- {e[str(s)].get('text_gain_se', float('nan')):.4f}"
            for s in SIGMAS) + " |")
    lines += ["", "**Held-out phrasing**: the error's rise when each scene is denoised under its own caption said in "
              "the held-out half of the shapes language (0: the new words read as well as the trained ones; the text "
              "gain above: read as nothing), at the noise levels where the text decides most.", "",
              "| run | gap @ s=3.0 | gain @ s=3.0 | gap / gain @ 3 | gap @ s=10.0 | gain @ s=10.0 | gap / gain @ 10 |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["denoising_error"]
        if "phrasing_gap" not in e["3.0"]:
            continue
        cells = []
        for s in ("3.0", "10.0"):
            gap, gain = e[s]["phrasing_gap"], e[s]["text_gain"]
            cells += [f"{gap:.4f} +- {e[s]['phrasing_gap_se']:.4f}", f"{gain:.4f}", f"{gap / gain:.2f}"]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    if any("shapes_eval" in r for r in rows):
        cats = list(CATEGORIES)
        lines += ["", "**ShapesEval** (template wording, seed 0, Euler 25 steps, CFG 3; +- one standard error of "
                  "the overall score).", "", "| run | overall | " + " | ".join(cats) + " |",
                  "|" + "---|" * (2 + len(cats))]
        for r in rows:
            if "shapes_eval" in r:
                se = r["shapes_eval"]
                lines.append(f"| {r['run']} | {se['overall']:.2f} +- {se['stderr']['overall']:.2f} | " +
                             " | ".join(f"{se['categories'].get(c, float('nan')):.2f}" for c in cats) + " |")
    (args.docs / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
