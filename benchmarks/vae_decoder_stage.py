"""The VAE decoder stage, measured: what 4,000 more steps on the decoder alone (encoder frozen, Stability's
ft-MSE idea) did for the shipped shapes VAE and for the shipped model drawn through it.

1. Retrains stage 1 of the shipped VAE (`vae-shapes`: 1,500 steps, seed 0, decoder_steps 0) into
   --work/stage1 (resumable: run it again to continue). It is the same run that `imagine train --preset
   shapes-default` made first, so its encoder equals the shipped encoder (to fp16 rounding): checked.
2. Reconstructions: ShapesEval's ground-truth renders of its own prompts (the dataset's renderer drawing
   exactly what each prompt says), encoded and decoded by each VAE, then judged: the share that still
   shows what the prompt says.
3. The shipped UNet's ShapesEval with each decoder at CFG 5 and at its default CFG 3 (the encoder, hence the
   latents, being the same, the samples are the same: only the decoding differs).

    python benchmarks/vae_decoder_stage.py    # writes docs/benchmarks/vae_decoder_stage.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from imagine.data.images import load_dataset
from imagine.evaluation.shapes_eval import evaluate_model, ground_truth, judge, prompt_set
from imagine.io.model_folder import DiffusionModel
from imagine.models import load_vae
from imagine.pipelines.generate import Settings
from imagine.pipelines.request import load_text_model
from imagine.train.checkpoint import checkpoint_step, latest_checkpoint
from imagine.train.vae import train_vae, vae_preset
from imagine.weights import default_model

ROOT = Path(__file__).resolve().parent.parent


def reconstruction_pass_rate(vae, prompts) -> float:
    ok = 0
    for p in prompts:
        image = torch.from_numpy(ground_truth(p, 64).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            recon = vae.decode(vae.encode(image).mean).clamp(-1, 1)
        pixels = ((recon[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        ok += judge(p, pixels).ok
    return ok / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "vae-stage1")
    parser.add_argument("--per-category", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    cfg = replace(vae_preset("vae-shapes"), decoder_steps=0, seed=0, image_size=64)
    stage1 = args.work / "stage1"
    last = latest_checkpoint(stage1 / "checkpoints")
    if not (stage1 / "model.safetensors").exists() or (last is not None and checkpoint_step(last) < cfg.steps):
        started = time.time()
        train_vae(cfg, load_dataset("builtin:shapes", 64), stage1, resume=last is not None)
        print(f"stage 1 trained in {time.time() - started:.0f} s", flush=True)
    shipped = default_model()
    model, encoder = load_text_model(shipped)
    before = load_vae(stage1).eval()
    after = model.vae
    enc_diff = max(float((a.float() - b.float()).abs().max()) for (_, a), (_, b) in zip(
        sorted((k, v) for k, v in before.state_dict().items() if k.startswith(("encoder.", "quant_conv."))),
        sorted((k, v) for k, v in after.state_dict().items() if k.startswith(("encoder.", "quant_conv."))),
        strict=True))
    prompts = prompt_set(args.per_category, 0)
    report = {"per_category": args.per_category, "prompts": len(prompts), "encoder_max_abs_difference": enc_diff,
              "reconstruction_pass_rate": {"stage 1 (1,500 steps)": reconstruction_pass_rate(before, prompts),
                                           "with the decoder stage (+4,000)": reconstruction_pass_rate(after,
                                                                                                       prompts)}}
    print(json.dumps(report, indent=2), flush=True)
    evals = {}
    for cfg_scale in (5.0, 3.0):
        settings = Settings(cfg_scale=cfg_scale).with_model_defaults(model.spec, None, None, cfg_scale)
        for name, vae in (("stage 1", before), ("with the decoder stage", after)):
            drawn = DiffusionModel(model.unet, vae, model.spec, model.path)
            r = evaluate_model(drawn, encoder, prompts, settings)
            evals[f"{name}, CFG {cfg_scale:g}"] = {"overall": r.overall, "stderr": r.stderr()["overall"],
                                                   "categories": r.categories()}
            print(f"{name}, CFG {cfg_scale:g}: {r.overall:.3f}", flush=True)
    report["shipped_unet_shapes_eval"] = evals
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_decoder_stage.json").write_text(json.dumps(report, indent=2))
    rec = report["reconstruction_pass_rate"]
    md = ["# The VAE decoder stage", "",
          f"`python benchmarks/vae_decoder_stage.py`: stage 1 of the shipped VAE retrained (its encoder equals the "
          f"shipped one to {enc_diff:.1e}, fp16 rounding), against the shipped VAE, which trained its decoder "
          f"4,000 steps more with the encoder frozen. {len(prompts)} ShapesEval prompts ({args.per_category} per "
          "category, seed 0).", "",
          "| | stage 1 | with the decoder stage |", "|---|---|---|",
          f"| ground-truth renders, encoded and decoded, still pass | {rec['stage 1 (1,500 steps)']:.2f} | "
          f"{rec['with the decoder stage (+4,000)']:.2f} |"]
    for cfg_scale in ("5", "3"):
        a, b = evals[f"stage 1, CFG {cfg_scale}"], evals[f"with the decoder stage, CFG {cfg_scale}"]
        md.append(f"| the shipped UNet's ShapesEval, CFG {cfg_scale} | {a['overall']:.2f} ± {a['stderr']:.2f} | "
                  f"{b['overall']:.2f} ± {b['stderr']:.2f} |")
    md.append("")
    (args.out / "vae_decoder_stage.md").write_text("\n".join(md))
    print("\n".join(md))



if __name__ == "__main__":
    main()
