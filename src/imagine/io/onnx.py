"""ONNX: a model's UNet, VAE decoder and text encoder exported to ONNX files, and run with ONNX Runtime.

``export_onnx`` writes a folder: unet.onnx, vae_decoder.onnx, text_encoder.onnx (the MiniLM default) and,
with int8, unet.int8.onnx (ONNX Runtime's dynamic quantization: int8 weights, activations quantized per
call), plus onnx.json naming the model and its UNet hash. The UNet is exported for calls of exactly two
rows (an image's unconditional and conditional rows), with free height, width and token count; the runtime
side evaluates any batch as consecutive pairs, so an image's arithmetic does not depend on its batch here
either (pipelines/generate.py's two-row floor). The sessions are presented as the torch modules they
replace: ``OnnxUNet(x, t, **cond)``, ``OnnxVAEDecoder.decode(z)``, ``OnnxTextModel(input_ids, attention_mask)``.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch

from imagine.io.checkpoint import CheckpointError, atomic_write_bytes, fresh_folder
from imagine.io.png import file_hash
from imagine.models.text_encoders import MiniLMTextEncoder

Backend = Literal["torch", "onnxruntime", "onnxruntime-int8"]
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "onnxruntime-int8")
MANIFEST = "onnx.json"
OPSET = 18
ROWS = 2  # every UNet and VAE call is two rows
INT8_OPS = ["MatMul", "Gemm"]  # dynamic int8: the linear layers (int8 convolutions measured slower, benchmarks/)


def _require_onnx(export: bool = True) -> None:
    """The packages ONNX needs: onnxruntime to run, and onnx and onnxscript to export (``export``)."""
    try:
        for name in ("onnxruntime", "onnx", "onnxscript") if export else ("onnxruntime",):
            importlib.import_module(name)
    except ImportError as err:
        raise ValueError(f"the ONNX backend needs onnxruntime, onnx and onnxscript ({err.name} is missing): "
                         "pip install 'imagine[onnx]'") from None


def check_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} unknown; choose one of: {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


class _UNetInputs(torch.nn.Module):
    """The UNet with positional inputs, as the exporter wants them."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask, timestep_cond=None):
        return self.unet(sample, timestep, encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                         timestep_cond=timestep_cond)


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent)


class _TextModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _export(module: torch.nn.Module, args: tuple, path: Path, names: list[str], dynamic: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=dynamic, input_names=names,
                                    output_names=["output"], opset_version=OPSET, verbose=False)
        program.save(str(path))


def export_onnx(model, text_encoder, out: Path | str, *, int8: bool = True) -> Path:
    """Export ``model`` (a loaded text-to-image DiffusionModel) and its MiniLM ``text_encoder`` to ``out``,
    a fresh folder written whole or not at all. Returns ``out``."""
    _require_onnx()
    out = Path(out)
    unet = model.unet
    cfg = unet.config
    if cfg.addition_embed_type == "text_time" or cfg.num_class_embeds or not cfg.cross_attention_dim:
        raise ValueError("ONNX export covers text-conditioned UNets without SDXL's micro-conditioning or class "
                         "labels (imagine's own models, SD 1.x and 2.x); use --backend torch for this one")
    if next(unet.parameters()).dtype != torch.float32:
        raise ValueError("ONNX export needs fp32 weights (load the model with --weights-dtype fp32)")
    f = model.vae.config.downscale if model.vae is not None else 1
    h = w = model.spec.image_size // f
    channels = cfg.in_channels
    if text_encoder is None:
        raise ValueError("ONNX export needs the model's text encoder (it runs on the exported UNet's inputs)")
    context = text_encoder.encode(["a", ""])
    args = [torch.randn(ROWS, channels, h, w), torch.tensor([500.0, 250.0]), context.context, context.mask]
    one_row = [a[:1] for a in args]
    names = ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    height, width = torch.export.Dim("height", min=1, max=1024), torch.export.Dim("width", min=1, max=1024)
    tokens = torch.export.Dim("tokens", min=1, max=77 * 32)
    dynamic = {"sample": {2: height, 3: width}, "timestep": None, "encoder_hidden_states": {1: tokens},
               "encoder_attention_mask": {1: tokens}, "timestep_cond": None}
    if cfg.time_cond_proj_dim is not None:
        args.append(torch.zeros(ROWS, cfg.time_cond_proj_dim))
        one_row.append(args[-1][:1])
        names.append("timestep_cond")
    else:
        del dynamic["timestep_cond"]
    with fresh_folder(out, "export-onnx") as tmp:
        tmp.mkdir(parents=True)
        _export(_UNetInputs(unet), tuple(args), tmp / "unet.onnx", names, dynamic)
        files = ["unet.onnx"]
        if model.vae is not None:
            vc = model.vae.config
            latent = torch.randn(ROWS, vc.latent_channels, h, w)
            lh = torch.export.Dim("latent_height", min=1, max=1024)
            lw = torch.export.Dim("latent_width", min=1, max=1024)
            _export(_Decoder(model.vae), (latent,), tmp / "vae_decoder.onnx", ["latent"], {"latent": {2: lh, 3: lw}})
            files.append("vae_decoder.onnx")
        if isinstance(text_encoder, MiniLMTextEncoder):
            ids = torch.tensor([[101, 1037, 2417, 102], [101, 102, 0, 0]])
            batch, length = torch.export.Dim("windows", min=1, max=64), torch.export.Dim("length", min=2, max=512)
            _export(_TextModel(text_encoder.model), (ids, (ids > 0).long()), tmp / "text_encoder.onnx",
                    ["input_ids", "attention_mask"], {"input_ids": {0: batch, 1: length},
                                                      "attention_mask": {0: batch, 1: length}})
            files.append("text_encoder.onnx")
        if int8:
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # dynamic quantization scales activations by each call's whole tensor, so a row beside another would
            # depend on it: the int8 UNet is exported for one row per call. The quantizer re-infers shapes and
            # trips over some the dynamo exporter recorded: start it without them (and some MatMul outputs then
            # stay untyped; they are all float)
            _export(_UNetInputs(unet), tuple(one_row), tmp / "unet.1row.onnx", names, dynamic)
            plain = onnx.load(str(tmp / "unet.1row.onnx"))
            del plain.graph.value_info[:]
            onnx.save(plain, str(tmp / "unet.plain.onnx"))
            quantize_dynamic(str(tmp / "unet.plain.onnx"), str(tmp / "unet.int8.onnx"), weight_type=QuantType.QInt8,
                             op_types_to_quantize=INT8_OPS, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            (tmp / "unet.plain.onnx").unlink()
            (tmp / "unet.1row.onnx").unlink()
            files.append("unet.int8.onnx")
        manifest = {"model": model.name, "unet_sha256": file_hash(model.weights_file), "opset": OPSET,
                    "rows": ROWS, "files": files, "text_encoder": getattr(text_encoder, "identity", None)}
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
    return out


def default_onnx_folder(model) -> Path:
    """Where a model's ONNX export lives when the user names none: IMAGINE_CACHE (default ~/.cache/imagine)
    / onnx / NAME-HASH, so an export is made once per model and reused."""
    root = Path(os.environ.get("IMAGINE_CACHE", Path.home() / ".cache" / "imagine"))
    return root / "onnx" / f"{model.name}-{file_hash(model.weights_file)[:10]}"


def read_manifest(folder: Path, model) -> dict:
    """The folder's onnx.json, checked against ``model`` (an export of another model is refused)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{folder} is not an ONNX export (no {MANIFEST}); make one with imagine export-onnx")
    manifest = json.loads(path.read_text())
    if manifest.get("unet_sha256") != file_hash(model.weights_file):
        raise CheckpointError(f"{folder} was exported from another model ({manifest.get('model')}); export this "
                              f"one with imagine export-onnx --model {model.path}")
    return manifest


def _session(path: Path):
    _require_onnx(export=False)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxUNet:
    """An exported UNet as the torch one is called: (x (B, C, h, w), t (B,), **cond) -> (B, C', h, w),
    evaluated as consecutive pairs of rows (the last row of an odd batch beside a copy of itself), or row by row
    for an export made for one row."""

    def __init__(self, path: Path):
        self.session = _session(path)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.rows = self.session.get_inputs()[0].shape[0]  # rows per call, fixed at export (2, or 1 for int8)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        extra = sorted(set(cond) - {"encoder_hidden_states", "encoder_attention_mask", "timestep_cond"})
        if extra:
            raise ValueError(f"the onnxruntime backend runs the UNet alone, without {', '.join(extra)}: ControlNets, "
                             "T2I-Adapters and image prompts need --backend torch")
        feeds = {"sample": x, "timestep": torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(len(x)), **cond}
        if "timestep_cond" in self.inputs and "timestep_cond" not in feeds:
            raise ValueError("this exported UNet embeds the guidance scale (an LCM): pass timestep_cond")
        arrays = {k: _numpy(feeds[k], k) for k in self.inputs}
        return torch.from_numpy(_in_chunks(self.session, arrays, self.rows)).to(x.dtype)


def _in_chunks(session, arrays: dict[str, np.ndarray], rows: int) -> np.ndarray:
    """Run ``session`` on consecutive chunks of ``rows`` rows of every input (the last chunk filled up with
    copies of its last row, whose outputs are dropped) and stack the first outputs."""
    outs = []
    for start in range(0, len(next(iter(arrays.values()))), rows):
        chunk = {k: v[start: start + rows] for k, v in arrays.items()}
        n = len(next(iter(chunk.values())))
        if n < rows:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], rows - n, axis=0)]) for k, v in chunk.items()}
        outs.append(session.run(None, chunk)[0][:n])
    return np.concatenate(outs)


def _numpy(v: torch.Tensor, name: str) -> np.ndarray:
    if name == "encoder_attention_mask":
        return v.to(torch.bool).numpy()
    return v.detach().float().contiguous().numpy()


class OnnxVAEDecoder:
    """An exported VAE decoder: decode(z (B, c, h, w)) -> (B, 3, H, W), in pairs of rows."""

    def __init__(self, path: Path):
        self.session = _session(path)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(_in_chunks(self.session, {"latent": z.detach().float().numpy()}, ROWS))


class OnnxTextModel:
    """An exported MiniLM, called as the transformers model is: (input_ids, attention_mask) -> .last_hidden_state."""

    def __init__(self, path: Path):
        self.session = _session(path)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False):
        if output_hidden_states:
            raise ValueError("the ONNX text encoder gives its last layer only: clip skip needs --backend torch")
        out = self.session.run(None, {"input_ids": input_ids.numpy().astype(np.int64),
                                      "attention_mask": attention_mask.numpy().astype(np.int64)})[0]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(out))

    def get_input_embeddings(self):
        raise ValueError("textual-inversion embeddings run on the torch text encoder: use --backend torch")


class OnnxModel(SimpleNamespace):
    """The sessions of one export: unet (OnnxUNet), vae (OnnxVAEDecoder or None), text (OnnxTextModel or None)."""

    def text_encoder_for(self, encoder):
        """``encoder`` (the model's torch text encoder) with its transformer run by ONNX Runtime: a copy with its
        own prompt cache; the encoder itself when the export has no text encoder (CLIP stays in torch)."""
        if self.text is None or not isinstance(encoder, MiniLMTextEncoder):
            return encoder
        if getattr(self, "_encoder", None) is None or self._encoder[0] is not encoder:
            twin = copy.copy(encoder)
            twin.model, twin._cache = self.text, OrderedDict()
            self._encoder = (encoder, twin)
        return self._encoder[1]


def load_onnx(folder: Path, model, int8: bool = False) -> OnnxModel:
    """Sessions for ``model``'s export in ``folder`` (checked to be this model's)."""
    manifest = read_manifest(folder, model)
    name = "unet.int8.onnx" if int8 else "unet.onnx"
    if name not in manifest["files"]:
        raise CheckpointError(f"{folder} has no {name}; export again with imagine export-onnx --int8")
    folder = Path(folder)
    return OnnxModel(unet=OnnxUNet(folder / name),
                     vae=OnnxVAEDecoder(folder / "vae_decoder.onnx") if "vae_decoder.onnx" in manifest["files"]
                     else None,
                     text=OnnxTextModel(folder / "text_encoder.onnx") if "text_encoder.onnx" in manifest["files"]
                     else None)
