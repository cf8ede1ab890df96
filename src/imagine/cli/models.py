"""imagine export, export-onnx, convert, models, samplers, version."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from imagine import __version__
from imagine.cli.app import GENERATE, MODELS, app, fail


class ConvertTo(str, Enum):
    diffusers = "diffusers"
    single_file = "single-file"
    gguf = "gguf"


@app.command(rich_help_panel=GENERATE)
def samplers(
    as_json: bool = typer.Option(False, "--json", help="Print JSON with each sampler's A1111 aliases."),
) -> None:
    """List the sampler names, one per line (or as JSON with their A1111 aliases)."""
    from imagine.a1111 import a1111_aliases
    from imagine.samplers import SAMPLERS

    if as_json:
        rows = [
            {"name": name, "a1111_aliases": a1111_aliases(name), "stochastic": info.stochastic,
             "description": info.description}
            for name, info in SAMPLERS.items()
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    for name in SAMPLERS:
        typer.echo(name)


@app.command(rich_help_panel=MODELS)
def export(
    model: Path = typer.Argument(..., help="A model folder written by `imagine train`."),
    out: Path = typer.Argument(..., help="Where the exported folder goes (must not exist)."),
    dtype: str = typer.Option("fp16", help="Weights precision: fp16, bf16 or fp32."),
    step: int | None = typer.Option(None, help="Export the run's checkpoint at this step (its EMA weights) "
                                               "instead of its final model: a run still going, or an earlier "
                                               "point of a finished one."),
) -> None:
    """Copy a model folder for distribution: UNet (its EMA weights), VAE and spec only, in fp16 by default.
    Training state, checkpoints, samples and logs are left behind."""
    from imagine.io.checkpoint import CheckpointError
    from imagine.train.checkpoint import export_model

    try:
        size = export_model(model, out, dtype, step=step)
    except (ValueError, CheckpointError) as err:
        fail(str(err))
    typer.echo(f"exported {model}{f' at step {step}' if step is not None else ''} -> {out} ({dtype}, "
               f"{size / 1e6:.1f} MB)")


@app.command("export-onnx", rich_help_panel=MODELS)
def export_onnx_cmd(
    out: Path | None = typer.Option(None, help="The folder to write (default: where --backend onnxruntime looks, "
                                               "~/.cache/imagine/onnx/NAME-HASH; must not exist)."),
    model: str | None = typer.Option(None, help="A model: folder, checkpoint or name in the models folder "
                                                "(default: the shipped one)."),
    fast: bool = typer.Option(False, "--fast", help="Export the shipped latent consistency model."),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="Also write the UNet dynamically quantized to int8."),
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder (default: ./models)."),
) -> None:
    """Export the UNet, VAE decoder and text encoder to ONNX for --backend onnxruntime (and onnxruntime-int8)."""
    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.io.onnx import default_onnx_folder, export_onnx
    from imagine.pipelines.request import load_text_model
    from imagine.weights import default_model, fast_model

    try:
        if fast and model is not None:
            raise ValueError("--fast exports the shipped LCM; leave out --model")
        folder = models_dir if models_dir is not None else md.default_models_dir()
        path = md.resolve(model, folder) if model else fast_model() if fast else default_model()
        loaded, encoder = load_text_model(path)
        target = out if out is not None else default_onnx_folder(loaded)
        export_onnx(loaded, encoder, target, int8=int8)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    typer.echo(f"exported {path} -> {target} ({size / 1e6:.1f} MB): use it with --backend onnxruntime"
               + (" or onnxruntime-int8" if int8 else "")
               + ("" if out is None else f" after copying it to {path}/onnx (or the default cache folder)"))


@app.command(rich_help_panel=MODELS)
def convert(
    source: Path = typer.Argument(..., help="A Stable Diffusion checkpoint: .safetensors file or diffusers folder."),
    out: Path = typer.Argument(..., help="Where the converted model goes (must not exist)."),
    to: ConvertTo = typer.Option(None, help="diffusers (a pipeline folder), single-file (one .safetensors) or "
                                            "gguf (one .gguf, the denoiser quantized); default: the other one of "
                                            "diffusers and single-file."),
    dtype: str | None = typer.Option(None, help="Save weights as fp16, bf16 or fp32 (default: as they are)."),
    quant: str = typer.Option("Q8_0", help="With --to gguf: the denoiser's block type: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 "
                                           "or F16 (K-quants are read, not written)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read a .ckpt pickle (weights only)."),
) -> None:
    """Convert between a diffusers pipeline folder and an original-layout single file (A1111, ComfyUI), in
    either direction (a round trip gives back the same tensors bit for bit), or to GGUF (--to gguf --quant
    Q8_0: the single-file layout with the denoiser's matrices block-quantized, as ComfyUI-GGUF and Forge run
    them; imagine runs it with --model OUT.gguf)."""
    from imagine.io import stable_diffusion as sd
    from imagine.io.checkpoint import CheckpointError

    try:
        if out.exists():
            raise ValueError(f"{out} exists; convert writes a new file or folder")
        kind = sd.kind_of(source)
        target = to.value if to is not None else ("diffusers" if kind == "single-file" else "single-file")
        model = sd.load_any(source, allow_pickle=allow_pickle)
        if target == "diffusers":
            sd.save_diffusers_pipeline(model, out, dtype)
        elif target == "gguf":
            counts = sd.save_gguf(model, out, quant.upper())
            typer.echo("tensors: " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
        else:
            sd.save_single_file(model, out, dtype)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{source} ({sd.ARCH_LABELS.get(model.arch, model.arch)}) -> {out} ({target})")


@app.command("merge-lora", rich_help_panel=MODELS)
def merge_lora(
    model: str = typer.Option(..., help="The base model: a folder, a checkpoint file or a name in the models folder."),
    lora: list[str] = typer.Option(..., "--lora", help="NAME_OR_FILE[:WEIGHT]; repeat to fold in several."),
    out: Path = typer.Option(..., help="The merged model: a .safetensors single file (Stable Diffusion models) or "
                                       "a folder of the base model's kind."),
    dtype: str | None = typer.Option(None, help="Save weights as fp16, bf16 or fp32 (default: fp32)."),
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder (default: ./models)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read .ckpt pickles (weights only)."),
) -> None:
    """Fold LoRAs into a model's weights (W + w (alpha / r) B A): the merged model draws what the base with
    the LoRAs attached draws, at the base model's speed."""
    from imagine.adapters.lora import merge, parts_of
    from imagine.cli.generate import _lora_option
    from imagine.io import models_dir as md
    from imagine.io import stable_diffusion as sd
    from imagine.io.checkpoint import CheckpointError
    from imagine.io.lora_keys import load_lora
    from imagine.pipelines.request import load_text_model

    try:
        if out.exists():
            raise ValueError(f"{out} exists; merge-lora writes a new file or folder")
        folder = models_dir if models_dir is not None else md.default_models_dir()
        base = md.resolve(model, folder)
        loaded, encoder = load_text_model(base, allow_pickle=allow_pickle)
        parts = parts_of(loaded, encoder)
        loras = []
        for item in lora:
            name, weight = _lora_option(item)
            loras.append((load_lora(md.resolve(name, folder, "lora"), parts, allow_pickle=allow_pickle), weight))
        if loaded.text_encoder is None and any(p != "unet" for lo, _ in loras for p in lo.parts()):
            raise ValueError("this LoRA changes the text encoder, which an imagine model folder does not hold: "
                             "attach it with --lora instead of merging")
        merge(parts, loras, text_encoder=encoder)
        sd.save_like(loaded, base, out, dtype)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{base} + {', '.join(lora)} -> {out}")


@app.command(rich_help_panel=MODELS)
def merge(
    a: str = typer.Argument(..., help="Model A (folder, checkpoint file or name in the models folder)."),
    b: str = typer.Argument(..., help="Model B, or an adapter file or name in Lora/ (LoRA, LyCORIS, DoRA, OFT, "
                                      "IA3): then A + M x its update, in either mode."),
    c: str | None = typer.Argument(None, help="Model C (add-difference only)."),
    mode: str = typer.Option("weighted-sum", help="weighted-sum: A (1 - M) + B M; add-difference: A + (B - C) M."),
    multiplier: float = typer.Option(0.5, help="M."),
    out: Path = typer.Option(..., help="The merged model: a .safetensors single file (Stable Diffusion) or a folder "
                                       "of A's kind."),
    dtype: str | None = typer.Option(None, help="Save weights as fp16, bf16 or fp32 (default: fp32)."),
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder (default: ./models)."),
) -> None:
    """A1111's checkpoint merger: weighted sum or add difference of same-architecture models."""
    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.train.merge import merge_files

    try:
        folder = models_dir if models_dir is not None else md.default_models_dir()
        paths = [md.resolve(a, folder)]
        try:
            paths.append(md.resolve(b, folder))
        except FileNotFoundError:  # B may be an adapter in Lora/: A + M dW
            paths.append(md.resolve(b, folder, "lora"))
        if c is not None:
            paths.append(md.resolve(c, folder))
        merge_files(paths, out, mode=mode, multiplier=multiplier, dtype=dtype)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{mode} of {', '.join(str(p) for p in paths)} (M = {multiplier:g}) -> {out}")


@app.command("models", rich_help_panel=MODELS)
def list_models(
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder (default: ./models)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the models shipped inside imagine, then the models folder (when there is one): checkpoints with
    architecture, size and A1111 hash; VAEs, LoRAs, ControlNets and embeddings by name."""
    from imagine.io import models_dir as md
    from imagine.io import stable_diffusion as sd
    from imagine.io.checkpoint import CheckpointError
    from imagine.weights import shipped

    rows = []
    for kind, name, path in shipped():  # hashed and sized as the models folder's entries are
        entry = md.Entry(name, path)
        rows.append({"section": "shipped", "name": name, "kind": kind, "path": str(path), "bytes": entry.bytes,
                     "hash": entry.short_hash})
    folder = models_dir if models_dir is not None else md.default_models_dir()
    if models_dir is not None and not models_dir.is_dir():
        fail(f"no models folder at {models_dir}: pass --models-dir DIR (with Stable-diffusion/, VAE/, Lora/, "
             "ControlNet/, embeddings/)")
    for section in md.SECTIONS if folder is not None and folder.is_dir() else ():
        for entry in md.entries(folder, section):
            row = {"section": section, "name": entry.name, "path": str(entry.path), "bytes": entry.bytes,
                   "hash": entry.short_hash}
            if section == "checkpoints":
                try:
                    row["arch"] = sd.describe_file(entry.path)["arch"]
                except CheckpointError as err:
                    row["arch"], row["error"] = None, str(err)
            rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        arch = f"  {sd.ARCH_LABELS.get(row.get('arch'), row.get('arch') or '')}" if "arch" in row else ""
        kind = f"  {row['kind']}" if "kind" in row else ""
        typer.echo(f"{row['section']:<12} {row['name']}  [{row['hash']}]  {row['bytes'] / 1e6:.1f} MB{arch}{kind}")
    if folder is None or not folder.is_dir():
        typer.echo("(no models folder: put Stable Diffusion checkpoints, LoRAs, ... under ./models, or pass "
                   "--models-dir DIR)", err=True)


@app.command(rich_help_panel=MODELS)
def version() -> None:
    """Print the version."""
    typer.echo(__version__)
