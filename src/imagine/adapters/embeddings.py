"""Textual-inversion embeddings (Gal et al. 2022): a few learned word vectors, used by writing their name
in the prompt (STYLE rule 13: one way to add them to a text encoder, one to take them away).

An ``Embedding`` holds K vectors per text-encoder input, keyed as A1111's files key them (``emb_params``;
SDXL: ``clip_l`` and ``clip_g``). ``using`` adds embeddings to an encoder for a block and restores what
it had, after checking that each fits (a wrong width is an error that says which model it was made for).
Embeddings in the models folder's ``embeddings/`` are found by the name written in the prompt, as A1111
finds them; files given explicitly are always in use."""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from imagine.adapters.attachment import Attachment
from imagine.io.checkpoint import CheckpointError
from imagine.io.embeddings import Embedding, header_aliases, load_embedding
from imagine.io.models_dir import entries, resolve
from imagine.models.text_encoders import NAME_AFTER, NAME_BEFORE

# what a width usually means, for error messages
WIDTH_NAMES = {384: "imagine's all-MiniLM-L6-v2", 768: "SD 1.x's CLIP ViT-L", 1024: "SD 2.x's OpenCLIP ViT-H",
               1280: "SDXL's OpenCLIP ViT-bigG"}


def _made_for(vectors: dict[str, torch.Tensor]) -> str:
    if set(vectors) == {"clip_l", "clip_g"}:
        return "SDXL (clip_l and clip_g)"
    width = next(iter(vectors.values())).shape[1]
    return WIDTH_NAMES.get(width, f"a text encoder of width {width}")


def check_fits(encoder, embedding: Embedding) -> None:
    """A CheckpointError unless ``embedding`` has exactly the vectors ``encoder`` takes."""
    if not hasattr(encoder, "embedding_widths"):
        raise ValueError(f"the text encoder {getattr(encoder, 'identity', encoder)!r} does not take embeddings")
    want = encoder.embedding_widths()
    have = {k: v.shape[1] for k, v in embedding.vectors.items()}
    if have != want:
        raise CheckpointError(
            f"embedding {embedding.name!r} ({embedding.path or 'in memory'}) holds {embedding.shape_text()}, made "
            f"for {_made_for(embedding.vectors)}, but this model's text encoder ({encoder.identity}) takes "
            + " + ".join(f"{k} of width {w}" for k, w in want.items())
            + ": use an embedding trained for this model (imagine textual-inversion --model ...)")
    lens = {v.shape[0] for v in embedding.vectors.values()}
    if len(lens) != 1:
        raise CheckpointError(f"embedding {embedding.name!r}: its parts have different vector counts {sorted(lens)}")
    if embedding.count > 75:
        raise CheckpointError(f"embedding {embedding.name!r} has {embedding.count} vectors; a prompt window holds 75")


@contextmanager
def using(encoder, embeddings: Iterable[Embedding]):
    """``encoder`` reads each embedding's names in prompts for the block; what it had before comes back."""
    embeddings = list(embeddings)
    if not embeddings:
        yield
        return
    for emb in embeddings:
        check_fits(encoder, emb)
    before = dict(encoder.embeddings)
    table = dict(before)
    for emb in embeddings:
        for name in emb.names:
            table[name.lower()] = emb
    encoder.set_embeddings(table)
    try:
        yield
    finally:
        encoder.set_embeddings(before)


def _pattern(name: str) -> re.Pattern:
    return re.compile(NAME_BEFORE + re.escape(name) + NAME_AFTER, re.IGNORECASE)


def named_in(text: str, name: str) -> bool:
    """Whether ``name`` is written in ``text`` as a word of its own (how the encoder will find it)."""
    return bool(_pattern(name).search(text))


def folder_embeddings(models_dir: Path | None) -> dict[str, Path]:
    """Name -> file for every embedding in the models folder's ``embeddings/`` (names as A1111's: stems)."""
    return {Path(e.name).name: e.path for e in entries(models_dir, "embeddings") if e.path.is_file()}


def _calls(name: str, path: Path) -> tuple[str, ...]:
    """The words that call a folder embedding: its stem, and the token a safetensors file was trained as
    (read from the header alone)."""
    return (name, *header_aliases(path))


@dataclass(frozen=True)
class EmbeddingUse(Attachment):
    """An embedding a request uses: its words are added to the text encoder for the request."""

    kind: ClassVar[str] = "embedding"
    record_key: ClassVar[str] = "embeddings"

    embedding: Embedding
    source: str  # "option" (asked for by file or name: always in use) or "prompt" (its name is written there)

    @property
    def label(self) -> str:
        return f"embedding {self.embedding.name!r}"

    def record(self) -> dict:
        return self.embedding.record(self.source)

    @classmethod
    def attach(cls, units, model, text_encoder):
        block = using(text_encoder, [u.embedding for u in units])
        block.__enter__()
        return lambda: block.__exit__(None, None, None)

    @classmethod
    def a1111(cls, records, first_unit):
        return {"TI hashes": ", ".join(f"{e['name']}: {e['sha256_10']}" for e in records)}  # as A1111 writes


def resolve_embeddings(texts: Iterable[str], models_dir: Path | None, asked: Iterable[str] = (),
                       confined: bool = False) -> list[EmbeddingUse]:
    """The embeddings a request uses, each with its source: ``asked`` (files or names in the models folder,
    always used: "option"), then every folder embedding whose name the prompts write ("prompt")."""
    out: list[EmbeddingUse] = []
    seen: set[Path] = set()
    for item in asked:
        try:
            path = resolve(item, models_dir, "embeddings", confined=confined)
        except FileNotFoundError as err:
            raise ValueError(f"embedding {err}") from None
        out.append(EmbeddingUse(load_embedding(path), "option"))
        seen.add(path.resolve())
    texts = [t for t in texts if t]
    for name, path in folder_embeddings(models_dir).items():
        if path.resolve() not in seen and any(named_in(t, word) for t in texts for word in _calls(name, path)):
            out.append(EmbeddingUse(load_embedding(path, name), "prompt"))
            seen.add(path.resolve())
    return out


def listing(models_dir: Path | None, encoder) -> tuple[dict, dict]:
    """A1111's /sdapi/v1/embeddings: (loaded, skipped), name -> {step, sd_checkpoint, sd_checkpoint_name,
    shape, vectors}; embeddings that do not fit ``encoder`` (or cannot be read) are skipped. ``encoder`` None (a
    node that loads no model): every readable file is listed as loaded."""
    loaded, skipped = {}, {}
    for name, path in folder_embeddings(models_dir).items():
        try:
            emb = load_embedding(path, name)
        except (CheckpointError, FileNotFoundError) as err:
            skipped[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                             "vectors": 0, "error": str(err)}
            continue
        entry = {"step": emb.step, "sd_checkpoint": emb.checkpoint, "sd_checkpoint_name": emb.checkpoint_name,
                 "shape": next(iter(emb.vectors.values())).shape[1], "vectors": emb.count}
        try:
            if encoder is not None:
                check_fits(encoder, emb)
            loaded[name] = entry
        except (CheckpointError, ValueError):
            skipped[name] = entry
    return loaded, skipped
