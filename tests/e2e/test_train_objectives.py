"""Each training objective the core offers runs through the trainer and learns (tiny runs)."""

from __future__ import annotations

import numpy as np
import pytest

from imagine.data.images import load_digits
from imagine.train.config import preset
from imagine.train.loop import read_log, train


@pytest.mark.parametrize("overrides", [
    dict(prediction="v", schedule="cosine"),
    dict(prediction="x0"),
    dict(min_snr_gamma=5.0, offset_noise=0.1),
    dict(learned_variance=True),
    dict(precision="bf16", grad_accum=2),
])
def test_objective_trains(tmp_path, overrides):
    cfg = preset("tiny").with_overrides(steps=25, checkpoint_every=0, class_conditional=True, **overrides)
    train(cfg, load_digits(16), tmp_path)
    losses = [r["loss"] for r in read_log(tmp_path / "log.jsonl")]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
