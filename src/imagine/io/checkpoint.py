"""Weights on disk: safetensors plus config.json, written atomically, read loudly.

Our model folder: ``config.json`` and ``model.safetensors``, the config also in the safetensors metadata
so the weights file describes itself (STYLE rule 4). Pickles are never unpickled: a .bin/.pt/.ckpt file
loads only through torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from imagine import __version__
from imagine.nn.compact import BLOCKS, FP8, Packed, attach, packable, to_fp8

WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # read only with allow_pickle, and then weights_only
CONFIG_NAME = "config.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, corrupt, foreign or mismatched."""


# torch's CPU allocator aligns every tensor to 64 bytes; its vectorised kernels (oneDNN, the BLAS) take other
# code paths, which round differently, for data at other addresses. A tensor that is a view of a mapped file
# sits wherever the file put it (safetensors aligns offsets to 8 bytes at most), so the same weights read from
# a diffusers folder and from a single file would give images that differ in the last bits.
ALIGNMENT = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its data is 64-byte aligned, else a copy in memory that is: the same weights
    give the same pixels whichever file (and offset in it) they came from."""
    if isinstance(tensor, Packed):  # compact weights are kept as their bytes
        return tensor
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash leaves the
    old file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; a saved model is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def fresh_folder(out: Path, what: str = "write", replace: bool = False):
    """Yield a temporary sibling of ``out`` to fill; on success it becomes ``out`` in one rename, so a folder
    appears whole or not at all. ``out`` must not exist (a stale partial one is cleared first), unless
    ``replace``: then the old folder is moved aside and removed only once the new one is in place."""
    out = Path(out)
    if out.exists() and not replace:
        raise ValueError(f"{out} exists; {what} writes a fresh folder")
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    yield tmp
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        # mkstemp makes 0600 and safetensors keeps it: a saved model is an ordinary file (set after writing)
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: nn.Module, config: dict[str, Any], folder: Path, kind: str, dtype: str | None = None) -> Path:
    """Write ``folder``/config.json and model.safetensors. ``dtype``: save weights as fp16 or bf16."""
    folder = Path(folder)
    state = model.state_dict()
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} unknown; choose one of: {', '.join(DTYPES)}")
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}

    full = {"_class": kind, "_imagine_version": __version__, **config}
    text = json.dumps(full, indent=2)
    atomic_save_safetensors(state, folder / WEIGHTS_NAME, {"config": json.dumps(full), "format": "pt"})
    atomic_write_bytes(folder / CONFIG_NAME, text.encode())
    return folder


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return {k: aligned(v) for k, v in load_file(str(path)).items()}, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it may be truncated or "
                              "corrupt: re-download or re-save it") from err


def read_pickle_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """A .bin/.pt/.ckpt state dict, loaded without unpickling arbitrary objects."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(
            f"refusing {path}: it cannot be loaded with torch.load(weights_only=True) ({type(err).__name__}). "
            "imagine never unpickles arbitrary objects; convert it to safetensors in a trusted environment"
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path} as JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every tensor or fail listing what is missing, unexpected or mis-shaped (STYLE rule 12)."""
    own = model.state_dict()
    check_keys({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


@dataclass(frozen=True)
class Ref:
    """One tensor of a checkpoint, read only when asked: a large file is never held twice."""

    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]  # the tensor, 64-byte aligned (a view of the file where it already is)
    # the tensor as the file holds it, maybe unaligned: for readers that slice or convert it before keeping it
    # (a copy of the whole of a fused tensor just to align it would be thrown away at once)
    view: Callable[[], torch.Tensor] | None = None

    def raw(self) -> torch.Tensor:
        return self.view() if self.view is not None else self.read()


Weights = dict[str, Ref]


# --- GGUF (the ggml project's format), read with its own package; io/gguf_files.py writes it ---------------

ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF: the shape of a tensor it stored reshaped
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _field_value(field):
    """A GGUF key-value's value (strings decoded, single numbers unwrapped, arrays as lists)."""
    import gguf  # late: 0.2 s of imports (PyYAML among them), for GGUF files only

    values = [field.parts[i] for i in field.data]
    kind = field.types[0] if field.types else None
    if kind == gguf.GGUFValueType.STRING:
        return bytes(values[0]).decode("utf-8", "replace")
    if kind == gguf.GGUFValueType.ARRAY:
        inner = field.types[-1]
        if inner == gguf.GGUFValueType.STRING:
            return [bytes(v).decode("utf-8", "replace") for v in values]
        return [v.tolist()[0] if hasattr(v, "tolist") else v for v in values]
    value = values[0]
    return value.tolist()[0] if hasattr(value, "tolist") and len(value) == 1 else value


def open_gguf(path: Path) -> tuple[Weights, dict[str, str]]:
    """A GGUF file's tensors by key (packed ones as Packed) and its metadata as strings; a file that is no
    GGUF, or holds a tensor type imagine cannot compute with, is refused naming it."""
    import gguf  # late: as above

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); it may be "
                              "truncated or corrupt: re-download or re-convert it") from None
    metadata: dict[str, str] = {}
    for name, field in reader.fields.items():
        try:
            value = _field_value(field)
        except (IndexError, ValueError, UnicodeDecodeError):
            continue
        metadata[name] = value if isinstance(value, str) else str(value)
    refs: Weights = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if ORIG_SHAPE + t.name in metadata:
            shape = tuple(int(x) for x in metadata[ORIG_SHAPE + t.name].strip("[]() ").split(",") if x.strip())
        if qtype in PLAIN:
            def read(t=t, shape=shape, qtype=qtype) -> torch.Tensor:
                data = np.array(t.data)  # a copy: the memory map is let go
                if qtype == "BF16":  # numpy has no bfloat16: its bits, viewed
                    return torch.from_numpy(data.view(np.uint16)).view(torch.bfloat16).reshape(shape)
                return torch.from_numpy(data).reshape(shape)
        elif qtype in BLOCKS:
            def read(t=t, shape=shape, qtype=qtype) -> Packed:
                data = torch.from_numpy(np.array(t.data, dtype=np.uint8))
                return Packed(data.reshape(shape[0], -1), qtype, shape)
        else:
            raise CheckpointError(f"{path}: tensor {t.name} is stored as {qtype}, a type imagine does not compute "
                                  f"with; it reads F32, F16, BF16 and {', '.join(BLOCKS)}")
        if t.name in refs:
            raise CheckpointError(f"{path} holds tensor {t.name} twice")
        refs[t.name] = Ref(shape, read)
    return refs, metadata


def open_weights(path: Path, allow_pickle: bool = False) -> tuple[Weights, dict[str, str]]:
    """A checkpoint's tensors by key, memory-mapped (safetensors), and its metadata. Pickles (.ckpt, .pt,
    .bin) are refused unless ``allow_pickle``, and even then read with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.suffix == ".gguf":
        return open_gguf(path)
    if path.suffix != ".safetensors":
        if path.suffix not in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path.name} is not a checkpoint imagine reads: weights come as .safetensors "
                                  f"(or, with --allow-pickle, {'/'.join(PICKLE_SUFFIXES)} pickles)")
        if not allow_pickle:
            raise CheckpointError(
                f"{path} is a pickle ({path.suffix}); imagine reads .safetensors only, because unpickling a "
                "file can run code. Convert it where you trust it, or pass --allow-pickle to read it with "
                "torch.load(weights_only=True), which loads tensors and nothing else")
        state = read_pickle_weights_only(path)
        return {k: Ref(tuple(v.shape), lambda v=v: v) for k, v in state.items()}, {}

    try:
        handle = safe_open(str(path), framework="pt")
        metadata = handle.metadata() or {}
        reader = _MappedReader(path)
        refs = {k: Ref(tuple(handle.get_slice(k).get_shape()), lambda k=k: aligned(reader.read(k)),
                       lambda k=k: reader.read(k)) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it may be truncated or "
                              "corrupt: re-download or re-save it") from err
    return refs, metadata


class _MappedReader:
    """Tensors of a safetensors file, memory-mapped. Every tensor the file gives is a view of one mapping of
    the whole file, and any view kept alive keeps every page read through that mapping resident: so the
    mapping is re-opened every ``REOPEN_BYTES`` read (the pages read so far are let go once nothing views
    them), and the loaders copy what they keep (``build_and_fill``). A model built from a file then holds its
    weights and a few hundred MB of pages at most, never a second copy of the checkpoint."""

    REOPEN_BYTES = 256 * 2**20

    def __init__(self, path: Path):
        self.path, self.handle, self.bytes = path, None, 0

    def read(self, key: str) -> torch.Tensor:
        if self.handle is None or self.bytes >= self.REOPEN_BYTES:
            self.handle, self.bytes = safe_open(str(self.path), framework="pt"), 0
        tensor = self.handle.get_tensor(key)
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in memory of its own, 64-byte aligned: a copy when it views a larger storage (a memory-mapped
    file, a fused tensor it was sliced from), which would otherwise stay resident behind it."""
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone()
    return aligned(tensor)


def check_keys(own: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Fail listing what is missing, unexpected or mis-shaped (STYLE rule 12)."""
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(found[k])} vs model {tuple(own[k])}"
                    for k in set(own) & set(found) if tuple(own[k]) != tuple(found[k]))
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:20]) + (f" (and {len(items) - 20} more)" if len(items) > 20 else "")

        parts = [f"{len(missing)} missing: {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {show(unexpected)}" if unexpected else "",
                 f"{len(shapes)} mis-shaped: {show(shapes)}" if shapes else ""]
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(p for p in parts if p))


def build_and_fill(factory: Callable[[], nn.Module], weights: Weights, source: str,
                   dtype: torch.dtype = torch.float32, restore: Callable[[nn.Module], None] | None = None
                   ) -> nn.Module:
    """``factory()`` built without memory (on the meta device), then every parameter and persistent buffer
    read from ``weights`` one tensor at a time and cast to ``dtype``: peak memory is the model plus one
    tensor, never a second copy of the checkpoint. Keys and shapes are checked first, strictly.
    Compact weights (nn/compact.py) stay compact: a GGUF file's packed tensors as they are, and with ``dtype``
    float8_e4m3fn every large matrix stored in scaled fp8; both computed in bf16 (GGUF's in ``dtype``).
    ``restore`` recreates the factory's non-persistent buffers (not in any checkpoint) on the CPU."""
    with torch.device("meta"):
        model = factory()
    own = model.state_dict()
    check_keys({k: tuple(v.shape) for k, v in own.items()}, {k: r.shape for k, r in weights.items()}, source)
    fp8 = dtype == torch.float8_e4m3fn  # fp8 storage: the large weights in e4m3fn, the rest and the compute bf16
    compute = torch.bfloat16 if fp8 else dtype
    for key in own:
        prefix, _, name = key.rpartition(".")
        module = model.get_submodule(prefix)
        tensor = weights[key].raw()  # one copy at most: owned() makes it, aligned
        if isinstance(tensor, Packed) and name not in module._parameters:
            tensor = tensor.dequantize(compute)  # a buffer is never compact
        if isinstance(tensor, Packed) or (fp8 and name in module._parameters and packable(tensor, FP8)):
            if isinstance(tensor, Packed):
                packed = tensor
            elif tensor.dtype == torch.float8_e4m3fn:  # a file stored in e4m3fn (Flux's, SD3's fp8): kept as it is
                packed = Packed(tensor, FP8, tuple(tensor.shape))
            else:
                packed = to_fp8(tensor)
            attach(module, name, Packed(owned(packed.data), packed.qtype, packed.shape, packed.scale), compute)
            continue
        tensor = owned(tensor.to(compute) if tensor.is_floating_point() else tensor)
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[name] = tensor
    if restore is not None:
        restore(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} has tensors no checkpoint holds and nothing restored: {left}")
    return model
