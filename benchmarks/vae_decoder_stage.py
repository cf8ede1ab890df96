"""The VAE decoder stage, measured: what 4,000 more steps on the decoder alone (encoder frozen, Stability's
ft-MSE idea) did for the shipped shapes VAE and for the shipped model drawn through it.

1. Retrains stage 1 of the shipped VAE's recipe (`vae-shapes`: 1,500 steps, seed 0, no decoder stage) into
   --work/stage1 (resumable: run it again to continue), and reports how far its encoder is from the shipped
   one's.
2. Reconstructions: ShapesEval's ground-truth renders of its own prompts (the dataset's renderer drawing
   exactly what each prompt says), encoded and decoded by each VAE, then judged: the share that still
   shows what the prompt says. Each VAE decodes its own encoder's latents, so this comparison holds
   whatever the encoders.
3. Only where the retrained encoder equals the shipped one (to fp16 rounding, max difference < 1e-2): the
   shipped UNet's ShapesEval drawn through each decoder, at CFG 5 and 3 (same latents, only the decoding
   differs). Where it does not, the shipped UNet's latents belong to the shipped encoder alone and this
   part is skipped, with the reason in the report.

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
from imagine.io.networks import load_vae
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
    same_encoder = enc_diff < 1e-2
    if not same_encoder:
        report["shipped_unet_skipped"] = (f"the retrained stage-1 encoder differs from the shipped one (max "
                                          f"{enc_diff:.3f}): the shipped UNet's latents cannot be decoded by it")
    for cfg_scale in (5.0, 3.0) if same_encoder else ():
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
          "`python benchmarks/vae_decoder_stage.py`: a VAE trained by stage 1 of the shipped recipe (1,500 steps) "
          "against the shipped VAE (stage 1, then 4,000 steps on its decoder with the encoder frozen). "
          f"{len(prompts)} ShapesEval prompts ({args.per_category} per category, seed 0): their ground-truth "
          "renders, encoded and decoded by each VAE, judged by the ShapesEval analyzer.", "",
          "| | stage 1 | with the decoder stage |", "|---|---|---|",
          f"| ground-truth renders, encoded and decoded, still pass | {rec['stage 1 (1,500 steps)']:.2f} | "
          f"{rec['with the decoder stage (+4,000)']:.2f} |"]
    for cfg_scale in ("5", "3") if same_encoder else ():
        a, b = evals[f"stage 1, CFG {cfg_scale}"], evals[f"with the decoder stage, CFG {cfg_scale}"]
        md.append(f"| the shipped UNet's ShapesEval, CFG {cfg_scale} | {a['overall']:.2f} ± {a['stderr']:.2f} | "
                  f"{b['overall']:.2f} ± {b['stderr']:.2f} |")
    if not same_encoder:
        md += ["", f"The retrained stage-1 encoder differs from the shipped one (max weight gap {enc_diff:.2f}): "
               "the shipped VAE's own stage 1 was not kept, and a retrain today does not reproduce it bit for bit. "
               "The shipped UNet was trained on the shipped encoder's latents, so it cannot be drawn through a "
               "stage-1 decoder here; that comparison is left out rather than made on mismatched latents."]
    md.append("")
    (args.out / "vae_decoder_stage.md").write_text("\n".join(md))
    print("\n".join(md))



if __name__ == "__main__":
    main()
