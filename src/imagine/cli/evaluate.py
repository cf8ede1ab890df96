"""imagine eval shapes, eval fid."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path

import typer

from imagine.cli.app import default_model, eval_app, fail


class Phrasing(str, Enum):
    template = "template"
    in_vocabulary = "in-vocabulary"
    held_out = "held-out"


@eval_app.command("shapes")
def eval_shapes(
    model: Path | None = typer.Option(None, help="A text-to-image model folder (default: the shipped model)."),
    sampler: str | None = typer.Option(None, help="Sampler: ours or A1111's name (default: the model's)."),
    steps: int | None = typer.Option(None, help="Sampling steps (default: the model's)."),
    cfg: float | None = typer.Option(None, help="Classifier-free guidance scale (default: the model's)."),
    per_category: int = typer.Option(25, help="Prompts per category (6 categories, one image each)."),
    seed: int = typer.Option(0, help="Seed of the prompt set (and of each prompt's image)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write every verdict and the scores here."),
    failures: int = typer.Option(5, help="Print this many failures with their reasons."),
    rerank: int = typer.Option(1, help="Judge the best of K candidates per prompt by CLIP score (as generate "
                                       "--rerank K makes them)."),
    clip: Path | None = typer.Option(None, help="CLIP scorer folder for --rerank (default: the shipped one)."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 autocast (does the faster mode cost accuracy?)."),
    fast: bool = typer.Option(False, "--fast", help="Evaluate the shipped latent consistency model (4 steps)."),
    backend: str = typer.Option("torch", help="torch, onnxruntime or onnxruntime-int8 (what does int8 cost?)."),
    phrasing: Phrasing = typer.Option(Phrasing.template, help="How the prompts are worded: builtin:shapes' own "
                                      "templates, or other words from the train (in-vocabulary) or the held-out "
                                      "half of the shapes language (data/shapes_language.py); same scenes."),
) -> None:
    """ShapesEval (GenEval's categories for builtin:shapes): how often images show what the prompt asks."""
    from tqdm import tqdm

    from imagine.evaluation.shapes_eval import evaluate_model, prompt_set
    from imagine.io.checkpoint import CheckpointError
    from imagine.pipelines.request import load_scorer, load_text_model
    from imagine.pipelines.settings import Settings

    try:
        if fast and model is not None:
            raise ValueError("--fast evaluates the shipped LCM; leave out --model")
        from imagine.weights import fast_model

        loaded, encoder = load_text_model(model if model is not None else fast_model() if fast else default_model())
        prompts = prompt_set(per_category, seed, phrasing.value.replace("-", "_"))
        base = Settings(precision=precision, backend=backend).with_model_defaults(loaded.spec, steps, sampler, cfg)
        base = base.validate()
        if rerank < 1:
            raise ValueError(f"--rerank takes K >= 1 candidates per prompt, got {rerank}")
        scorer = load_scorer(clip) if rerank > 1 else None
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        fail(str(err))
    bar = tqdm(total=len(prompts), desc="ShapesEval", unit="image")
    report = evaluate_model(loaded, encoder, prompts, base, rerank, scorer, progress=bar.update)
    bar.close()
    typer.echo(report.table())
    for v in [v for v in report.verdicts if not v.ok][:failures]:
        typer.echo(f"  fail [{v.category}] {v.prompt!r} (seed {v.seed}): {v.reason}")
    if json_path is not None:
        data = {**report.to_json(), "settings": {"model": str(loaded.path), "sampler": base.sampler,
                                                 "steps": base.steps, "cfg": base.cfg_scale,
                                                 "per_category": per_category, "seed": seed, "rerank": rerank,
                                                 "precision": precision, "phrasing": phrasing.value}}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=2))
        typer.echo(f"written: {json_path}")


class FeatureSpace(str, Enum):
    clip = "clip"
    inception = "inception"


@eval_app.command("fid")
def eval_fid(
    generated: Path = typer.Argument(..., help="Folder of generated images (png, jpg, webp)."),
    reference: str = typer.Argument(..., help="Folder of reference images, or builtin:shapes (held-out scenes "
                                              "rendered by the dataset at the generated images' size)."),
    features: FeatureSpace = typer.Option(FeatureSpace.clip, help="Feature space: clip (the shipped shapes "
                                          "scorer, or --clip DIR) or inception (pytorch-fid's, needs --inception)."),
    clip: Path | None = typer.Option(None, help="A CLIP-style model folder (default: the shipped shapes-clip)."),
    inception: Path | None = typer.Option(None, envvar="IMAGINE_INCEPTION_WEIGHTS",
                                          help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (a local file: "
                                               "imagine downloads nothing)."),
    size: int | None = typer.Option(None, help="Resize every image to SIZE x SIZE first (default: keep their "
                                               "size; the feature extractor resizes, as pytorch-fid does)."),
    reference_count: int = typer.Option(1000, help="How many scenes builtin:shapes renders as the reference."),
    kid_subsets: int = typer.Option(50, help="KID: random subsets averaged."),
    kid_subset_size: int = typer.Option(100, help="KID: images per subset (capped at the smaller set)."),
    cache: Path | None = typer.Option(None, help="Where reference features are cached (default: "
                                                 "$XDG_CACHE_HOME/imagine/fid)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the figures here."),
) -> None:
    """FID and KID of a folder of images against a reference, in CLIP or Inception feature space."""
    from imagine.evaluation.fid import (
        cached_reference,
        compare,
        extract,
        feature_extractor,
        folder_batches,
        reference_source,
    )
    from imagine.io.checkpoint import CheckpointError

    if cache is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imagine" / "fid"
    try:
        extractor, extractor_id = feature_extractor(features.value, clip, inception)
        source_id, reference_batches = reference_source(reference, generated, size, reference_count)
        extractor_id += f":{size}"
        ref = cached_reference(extractor, extractor_id, source_id, reference_batches, cache)
        gen = extract(extractor, folder_batches(generated, size))
        result = compare(gen, ref, kid_subsets, kid_subset_size)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        fail(str(err))
    low, high = result.kid.interval
    typer.echo(f"features   {features.value} ({extractor_id.split(':')[1]})")
    typer.echo(f"images     {result.n_generated} generated, {result.n_reference} reference ({reference})")
    typer.echo(f"FID        {result.fid:.4f}")
    typer.echo(f"KID        {result.kid.mean:.6f} +- {result.kid.std:.6f} "
               f"(95% interval {low:.6f} .. {high:.6f}, {result.kid.subsets} subsets)")
    if min(result.n_generated, result.n_reference) < 2048 and features is FeatureSpace.inception:
        typer.echo("note: FID is biased upward below a few thousand images; compare KID, which is unbiased")
    if json_path is not None:
        data = {**result.to_json(), "features": features.value, "extractor": extractor_id, "reference": reference,
                "generated": str(generated)}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=2))
        typer.echo(f"written: {json_path}")
