"""Reranking (as DALL-E did with CLIP): make K candidates per image, keep the one a CLIP scorer likes best.

Candidate j of image i uses seed ``seed + i * K + j``; the kept image records its own seed, so it can be
regenerated alone (pipelines are batch-invariant)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from imagine.io.model_folder import DiffusionModel
from imagine.pipelines.generate import txt2img
from imagine.pipelines.settings import Settings


@dataclass
class Reranked:
    image: torch.Tensor  # (C, H, W) in [-1, 1]
    seed: int  # of the kept candidate
    scores: list[float]  # CLIP score of every candidate
    chosen: int


def txt2img_reranked(model: DiffusionModel, s: Settings, text_encoder, scorer, k: int,
                     callback: Callable[[dict], None] | None = None,
                     cancel: Callable[[], bool] | None = None, attachments: Sequence = ()) -> list[Reranked]:
    """``s.n`` images, each the best of ``k`` candidates by ``scorer.score(images, prompts)``."""
    if k < 1:
        raise ValueError(f"rerank needs K >= 1 candidates, got {k}")
    out = []
    for i in range(s.n):
        first = s.seed + i * k
        candidates = txt2img(model, replace(s, seed=first, n=k), text_encoder, callback=callback, cancel=cancel,
                             attachments=attachments)
        scores = scorer.score(candidates, [s.prompt] * k)
        best = int(scores.argmax())
        out.append(Reranked(candidates[best], first + best, [float(v) for v in scores], best))
    return out
