"""Textual inversion (Gal et al. 2022): learn K word vectors for a new token from a few images, with the
model and text encoder frozen. The vectors stand in for the token's word embeddings at the text
encoder's input (``adapters/embeddings.py``); the loss is the model's own diffusion loss on prompts that
write the token. The loop, checkpoints and exact resume are the adapter trainer's (``train/lora.py``)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from imagine.adapters.embeddings import Embedding, named_in, using
from imagine.io.embeddings import save_embedding
from imagine.train.loop import Hook
from imagine.train.lora import AdapterTrainConfig, base_record, checkpoint_dir, fit


@dataclass(frozen=True)
class TextualInversionConfig(AdapterTrainConfig):
    token: str = "<concept>"  # the word that calls the embedding in prompts
    vectors: int = 1  # K: how many word vectors the token stands for
    init_word: str = "*"  # the vectors start as this word's token embeddings (cycled to K)
    template: str = "a {token}"  # the training prompt; {caption} is the image's own caption
    lr: float = 5e-3

    def __post_init__(self):
        super().__post_init__()
        if not self.token or re.search(r"\s", self.token):
            raise ValueError(f"the token must be one word without spaces, got {self.token!r}")
        if not 1 <= self.vectors <= 75:
            raise ValueError(f"vectors must be 1 to 75 (a prompt window), got {self.vectors}")
        if "{token}" not in self.template and "{caption}" not in self.template:
            raise ValueError(f"the template {self.template!r} must write {{token}} (or {{caption}}, captions that "
                             "write the token)")


def initial_vectors(text_encoder, init_word: str, count: int) -> dict[str, torch.Tensor]:
    """K vectors per embedding key: the init word's token embeddings, cycled (its first token when K = 1)."""
    tables = text_encoder.embedding_inputs()
    ids = text_encoder.tokenizer(init_word, add_special_tokens=False)["input_ids"] if init_word else []
    out = {}
    for key, table in tables.items():
        weight = table.weight.detach().float()
        if ids:
            rows = [weight[ids[k % len(ids)]] for k in range(count)]
            out[key] = torch.stack(rows).clone()
        else:  # no init word: small vectors at the table's scale
            out[key] = torch.randn(count, weight.shape[1], generator=torch.Generator().manual_seed(0)) * weight.std()
    return out


def train_textual_inversion(model, text_encoder, data, cfg: TextualInversionConfig, out: Path | str, *,
                            resume: bool = False, hooks: tuple[Hook, ...] = (),
                            device: str | torch.device = "cpu") -> Path:
    """Learn ``cfg.vectors`` vectors for ``cfg.token`` on ``data`` (images at the model's size; captions
    only when the template writes {caption}) and write them to ``out`` as an A1111 embedding (.safetensors).
    Checkpoints, the log and sample grids go to OUT-training/ beside it."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: an embedding is written as .safetensors")
    if model.spec.text_encoder is None or text_encoder is None or not hasattr(text_encoder, "embedding_inputs"):
        raise ValueError("textual inversion needs a text-to-image model and its text encoder")
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    model.unet.requires_grad_(False)
    vectors = {k: v.requires_grad_(True) for k, v in initial_vectors(text_encoder, cfg.init_word, cfg.vectors).items()}
    base = base_record(model)
    embedding = Embedding(cfg.token, vectors, checkpoint=base["base_model_hash"], checkpoint_name=model.name)

    if hasattr(data, "captions") and data.captions is None:  # a folder of images without captions
        if "{caption}" in cfg.template:
            raise ValueError(f"the template {cfg.template!r} writes {{caption}}, but {data.source} has no captions")
        data.captions = ("",) * len(data)

    def prompt(caption: str) -> str:
        text = cfg.template.format(token=cfg.token, caption=caption)
        if not named_in(text, cfg.token):
            raise ValueError(f"the training prompt {text!r} does not write the token {cfg.token!r}: put {{token}} "
                             "in --template, or the token in every caption")
        return text

    with using(text_encoder, [embedding]):
        fit(model, text_encoder, data, cfg, root, {f"embedding.{k}": v for k, v in vectors.items()},
            text_grad=True, resume=resume, hooks=hooks, prompt=prompt,
            must_match={"token": cfg.token, "vectors": cfg.vectors}, context={"embedding": embedding}, device=device)
    embedding.step = cfg.steps
    save_embedding(embedding, out, info={**asdict(cfg), **base})
    return out
