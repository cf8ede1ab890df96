"""Textual-inversion embedding files as people have them, read into and written from imagine's
``Embedding`` (STYLE rule 15):

- A1111 ``.safetensors``: ``emb_params`` (K, D) for a one-encoder model (SD 1.x: 768, SD 2.x: 1024,
  imagine's MiniLM: 384); SDXL files carry ``clip_l`` (K, 768) and ``clip_g`` (K, 1280).
- A1111 / the original textual-inversion ``.pt``: ``{"string_to_param": {"*": (K, D)}, "name", "step",
  "sd_checkpoint", ...}``, read with ``torch.load(weights_only=True)`` only (a file holding Python objects
  is refused, never unpickled).
- diffusers' ``learned_embeds.safetensors`` / ``.bin``: one key, the token, holding (D,) or (K, D).

Written files are A1111's safetensors layout with the name, step and base model in the metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from imagine.io.checkpoint import CheckpointError, atomic_save_safetensors, read_safetensors
from imagine.io.png import file_hash

SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(eq=False)
class Embedding:
    name: str  # the word written in the prompt (A1111: the file's stem)
    vectors: dict[str, torch.Tensor]  # "emb_params" (or "clip_l" and "clip_g") -> (K, width)
    path: Path | None = None
    aliases: tuple[str, ...] = ()  # other words that call it (the token it was trained under)
    step: int | None = None
    checkpoint: str | None = None  # hash of the model it was trained on
    checkpoint_name: str | None = None

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def shape_text(self) -> str:
        return " + ".join(f"{k} {tuple(v.shape)}" for k, v in self.vectors.items())

    def record(self, source: str) -> dict:
        return {"name": self.name, "path": str(self.path.resolve()) if self.path else None, "vectors": self.count,
                "sha256_10": file_hash(self.path) if self.path and self.path.is_file() else None, "source": source}


def _vectors(value, path: Path, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{path}: {key} is not a tensor ({type(value).__name__})")
    value = value.detach().float()
    if value.ndim == 1:
        value = value[None]
    if value.ndim != 2 or value.shape[0] < 1:
        raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}; an embedding is (vectors, width)")
    if not torch.isfinite(value).all():
        raise CheckpointError(f"{path}: {key} holds NaN or infinite values")
    return value.contiguous()


def _from_state(state: dict, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """(A1111 key -> vectors, the token a diffusers file names) from a file's top-level dict."""
    if "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param must hold one tensor, found {type(params).__name__}")
        return {"emb_params": _vectors(next(iter(params.values())), path, "string_to_param")}, None
    if "emb_params" in state:
        return {"emb_params": _vectors(state["emb_params"], path, "emb_params")}, None
    if all(k in state for k in SDXL_KEYS):
        return {k: _vectors(state[k], path, k) for k in SDXL_KEYS}, None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(state) == 1:  # diffusers: {"<token>": (D,)}
        token, value = next(iter(tensors.items()))
        return {"emb_params": _vectors(value, path, token)}, token
    keys = list(state)[:6]
    hint = ""
    if any("lora" in str(k) for k in state):
        hint = " It looks like a LoRA: pass it with --lora."
    elif len(state) > 20:
        hint = " It looks like a model checkpoint, not an embedding."
    raise CheckpointError(f"{path} is not a textual-inversion embedding: expected emb_params, clip_l and "
                          f"clip_g, string_to_param, or one token's tensor; found {len(state)} keys "
                          f"({', '.join(map(str, keys))}).{hint}")


def header_aliases(path: Path) -> tuple[str, ...]:
    """The token a .safetensors embedding was trained as (imagine's metadata, or diffusers' one key), from
    its header alone; () for other files or unreadable ones (loading reports those). Every request scans
    the embeddings folder, so each file version's header is read once per process."""
    if path.suffix != ".safetensors":
        return ()
    st = path.stat()
    return _header_aliases(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4096)
def _header_aliases(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
    except Exception:  # a broken file is reported when it is loaded
        return ()
    try:
        token = json.loads(meta.get("imagine_embedding", "{}") or "{}").get("token")
    except json.JSONDecodeError:
        token = None
    if len(keys) == 1 and keys[0] != "emb_params":
        token = token or keys[0]
    return (token,) if token else ()


def load_embedding(path: Path | str, name: str | None = None):
    """An embedding file as an ``Embedding`` named ``name`` (default: the file's stem, as A1111 names
    them); the token it was trained under (imagine's or diffusers' files) becomes an alias."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding {path} does not exist")
    meta: dict = {}
    if path.suffix == ".safetensors":
        state, metadata = read_safetensors(path)
        meta = dict(metadata)
    elif path.suffix in (".pt", ".bin"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, RuntimeError, EOFError...
            raise CheckpointError(
                f"refusing {path}: it cannot be loaded with torch.load(weights_only=True) "
                f"({type(err).__name__}): it holds Python objects, which imagine never unpickles. Re-save "
                "it as .safetensors with emb_params where you trust the file") from err
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a dict ({type(state).__name__})")
        for field in ("name", "step", "sd_checkpoint", "sd_checkpoint_name"):
            if isinstance(state.get(field), (str, int)):
                meta[field] = str(state[field])
    else:
        raise CheckpointError(f"{path}: embeddings are .safetensors, .pt or .bin files")
    vectors, token = _from_state(state, path)
    info = json.loads(meta.get("imagine_embedding", "{}") or "{}")
    aliases = tuple(a for a in {token, info.get("token")} if a and a != (name or path.stem))
    step = meta.get("step")
    return Embedding(name or path.stem, vectors, path=path, aliases=aliases,
                     step=int(step) if step and str(step).isdigit() else None,
                     checkpoint=meta.get("sd_checkpoint") or None, checkpoint_name=meta.get("sd_checkpoint_name"))


def save_embedding(embedding, path: Path | str, *, info: dict | None = None) -> Path:
    """Write A1111's safetensors layout (``emb_params``, or ``clip_l`` and ``clip_g``), atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: an embedding is written as .safetensors")
    metadata = {"name": embedding.name, "imagine_embedding": json.dumps(info or {})}
    if embedding.step is not None:
        metadata["step"] = str(embedding.step)
    if embedding.checkpoint:
        metadata["sd_checkpoint"] = embedding.checkpoint
    if embedding.checkpoint_name:
        metadata["sd_checkpoint_name"] = embedding.checkpoint_name
    atomic_save_safetensors({k: v.detach().float() for k, v in embedding.vectors.items()}, path, metadata)
    return path
