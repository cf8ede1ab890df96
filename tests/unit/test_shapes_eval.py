"""ShapesEval is proven before it judges: on ground-truth renders of its own prompts it agrees with the
labels in >= 99% of cases per category, and it rejects images that show something else, with a reason."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from imagine.data.shapes import BACKGROUNDS
from imagine.evaluation.shapes_analyzer import Detected
from imagine.evaluation.shapes_eval import (
    CATEGORIES,
    Report,
    evaluate,
    ground_truth,
    judge,
    prompt_set,
    relation_holds,
)

PER_CATEGORY = 120


@pytest.fixture(scope="module")
def prompts():
    return prompt_set(PER_CATEGORY)


def test_prompt_set_is_fixed_and_covers_every_category(prompts):
    assert prompt_set(PER_CATEGORY) == prompts
    assert prompt_set(PER_CATEGORY, seed=1) != prompts
    assert [p.category for p in prompts[::PER_CATEGORY]] == list(CATEGORIES)
    assert len({p.seed for p in prompts}) == len(prompts)
    by = {c: [p.prompt for p in prompts if p.category == c] for c in CATEGORIES}
    assert all(" above " in t or " below " in t or " left of " in t or " right of " in t for t in by["position"])
    assert all(t.split()[0] in ("two", "three", "four") for t in by["counting"])
    with pytest.raises(ValueError, match="per_category"):
        prompt_set(0)


def test_analyzer_agrees_with_ground_truth_in_every_category(prompts):
    report = Report([judge(p, ground_truth(p)) for p in prompts])
    for category, accuracy in report.categories().items():
        assert accuracy >= 0.99, (category, [v.reason for v in report.verdicts if not v.ok][:3])


def _by_category(prompts, category):
    return [p for p in prompts if p.category == category]


def test_images_of_other_prompts_fail_with_a_reason(prompts):
    """Each category's judge must say no to a render of a different prompt of that category."""
    for category in CATEGORIES:
        mine = _by_category(prompts, category)[:40]
        rejected = 0
        for p, other in zip(mine, mine[1:] + mine[:1], strict=True):
            differs = {(w.shape, w.color if w.judge_color else None, w.count) for w in p.wants} != \
                {(w.shape, w.color if w.judge_color else None, w.count) for w in other.wants}
            if differs or p.relation != other.relation:
                v = judge(p, ground_truth(other))
                rejected += not v.ok
                if not v.ok:
                    assert (v.reason and "found" in v.reason) or "not" in v.reason
        assert rejected >= 20, category


def test_swapped_relation_fails(prompts):
    for p in _by_category(prompts, "position")[:20]:
        opposite = {"above": "below", "below": "above", "to the left of": "to the right of",
                    "to the right of": "to the left of"}[p.relation]
        v = judge(dataclasses.replace(p, relation=opposite), ground_truth(p))
        assert not v.ok and f"is not {opposite}" in v.reason


def test_wrong_count_fails(prompts):
    for p in _by_category(prompts, "counting")[:10]:
        want = p.wants[0]
        fewer = dataclasses.replace(p, wants=(dataclasses.replace(want, count=want.count - 1),))
        v = judge(p, ground_truth(fewer))
        assert not v.ok and f"expected {want.count} objects" in v.reason


def test_relation_geometry():
    def at(x, y):
        return Detected("circle", "red", (x, y), 50, 0.8, 1.1, 0.2)

    assert relation_holds(at(0.5, 0.2), at(0.5, 0.8), "above")
    assert relation_holds(at(0.5, 0.8), at(0.55, 0.2), "below")
    assert relation_holds(at(0.2, 0.5), at(0.8, 0.4), "to the left of")
    assert not relation_holds(at(0.2, 0.2), at(0.3, 0.8), "to the left of")  # mostly below, not left
    assert not relation_holds(at(0.5, 0.5), at(0.52, 0.5), "to the left of")  # too close to call


def test_blank_image_fails_everything_and_report_math(prompts):
    blank = np.zeros((64, 64, 3), np.uint8) + np.array(BACKGROUNDS["black"], np.uint8)
    picked = prompts[::PER_CATEGORY // 2]
    report = evaluate(picked, lambda chunk: np.stack([blank] * len(chunk)), batch=3)
    assert report.overall == 0 and all(v.reason.startswith("expected") for v in report.verdicts)
    good = evaluate(picked, lambda chunk: np.stack([ground_truth(p) for p in chunk]))
    assert good.overall == 1.0 and good.to_json()["categories"] == dict.fromkeys(CATEGORIES, 1.0)
    half = Report(good.verdicts[::2] + report.verdicts[1::2])  # one right, one wrong per category
    assert half.overall == pytest.approx(0.5)
    assert half.stderr()["single_object"] == pytest.approx(0.5 / np.sqrt(2))
