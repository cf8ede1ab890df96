"""The shapes language: two disjoint halves, deterministic phrasing, and ShapesEval prompts that say the
same scenes in other words."""

from __future__ import annotations

import random

import pytest

from imagine.data import shapes_language as lang
from imagine.data.shapes import COLORS, NUMBERS, RELATIONS, SHAPES
from imagine.evaluation.shapes_eval import CATEGORIES, ground_truth, judge, prompt_set


def test_the_halves_share_no_phrasing_and_cover_every_concept():
    train, held = lang.vocabulary("train"), lang.vocabulary("held_out")
    assert not train & held, sorted(train & held)
    assert set(lang.COLOR_WORDS) == set(COLORS) and set(lang.SHAPE_WORDS) == set(SHAPES)
    assert set(lang.RELATION_WORDS) == set(RELATIONS) and set(lang.COUNT_WORDS) == set(NUMBERS) - {1}
    # builtin:shapes' own caption words are all in the train half, and no held-out phrase contains one
    template_words = set(COLORS) | set(SHAPES) | set(RELATIONS) | {"two", "three", "four", "small", "large"}
    assert template_words <= train
    for phrase in held:
        words = set(phrase.split()) | {w.rstrip("s") for w in phrase.split()}
        assert not words & template_words, phrase


def test_phrasing_is_deterministic_and_grammatical():
    a = lang.phrase_object(random.Random(3), "held_out", "circle", "red", count=3)
    assert a == lang.phrase_object(random.Random(3), "held_out", "circle", "red", count=3)
    assert a.startswith("3 ") and any(w in a for w in ("balls", "orbs")) and any(w in a for w in ("crimson", "ruby"))
    one = lang.phrase_object(random.Random(0), "train", "triangle", "orange")
    assert one.startswith("an ") or one.startswith("a ")
    assert lang.frame(random.Random(0), "train", "two red circles", plural=True).count("there is") == 0


@pytest.mark.parametrize("phrasing", ["in_vocabulary", "held_out"])
def test_rephrased_prompts_are_the_same_scenes_in_that_half(phrasing):
    template, other = prompt_set(6, 0), prompt_set(6, 0, phrasing)
    half = "train" if phrasing == "in_vocabulary" else "held_out"
    foreign = lang.vocabulary("held_out" if half == "train" else "train") - {"and", "with", "over", "under"}
    for t, p in zip(template, other, strict=True):
        assert (t.category, t.wants, t.relation, t.seed) == (p.category, p.wants, p.relation, p.seed)
        words = f" {p.prompt} "
        if half == "held_out":  # every concept in held-out words: no colour or shape word of the templates
            assert not any(f" {c} " in words for c in COLORS), p.prompt
            assert not any(f" {s} " in words or f" {s}s " in words for s in SHAPES), p.prompt
        else:
            assert not any(f" {w} " in words for w in foreign if " " not in w and len(w) > 2), p.prompt
    # the analyzer judges the scene, not the words: the ground truth of each still passes
    for p in other[:: len(CATEGORIES)]:
        assert judge(p, ground_truth(p)).ok, p.prompt
    with pytest.raises(ValueError, match="phrasing 'slang' unknown"):
        prompt_set(2, 0, "slang")


def test_shapes_language_dataset_is_builtin_shapes_in_more_words():
    """builtin:shapes-language: the very same scenes as builtin:shapes, half the captions said in the train
    half of the language, never a held-out phrase."""
    import re

    from imagine.data.images import load_dataset

    plain, worded = load_dataset("builtin:shapes", 32), load_dataset("builtin:shapes-language", 32)
    assert worded.source == "builtin:shapes-language"
    held = sorted(lang.vocabulary("held_out"), key=len, reverse=True)
    changed = 0
    for i in range(300):
        (a, _), (b, _) = plain.scene(i), worded.scene(i)
        assert [(o.shape, o.color, o.center) for o in a.objects] == [(o.shape, o.color, o.center) for o in b.objects]
        assert b.caption == worded.scene(i)[0].caption  # deterministic
        changed += a.caption != b.caption
        for phrase in held:
            assert not re.search(rf"\b{re.escape(phrase)}\b", b.caption), (phrase, b.caption)
    assert 100 <= changed <= 200  # about half


def test_prefetcher_hands_out_the_batches_the_loop_would_make():
    """A GPU run renders builtin:shapes in worker processes ahead of the steps (train/loop.Prefetcher): the
    batches must be the very ones the loop makes itself, in any order of asking, ahead or not."""
    import torch

    from imagine.data.shapes import ShapesDataset
    from imagine.train.loop import Prefetcher

    data = ShapesDataset(size=16, language=True)

    def plan(key):
        return [3 * key + i for i in range(3)], [False] * 3

    prefetch = Prefetcher(data, 2, plan, depth=3)
    try:
        for key in (0, 1, 4, 2):
            images, labels, captions = prefetch.get(key)
            want = data.batch(plan(key)[0])
            assert torch.equal(images, want[0]) and labels is None and captions == want[2]
    finally:
        prefetch.close()
