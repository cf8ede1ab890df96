"""The ShapesEval analyzer is proven on ground truth first: on the dataset's own renders it must agree
with the labels (every object's shape and colour, and where it is) in >= 99% of scenes of every kind."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from imagine.data.shapes import ShapesDataset
from imagine.evaluation.shapes_analyzer import analyze, background_name


@pytest.fixture(scope="module")
def scenes():
    ds = ShapesDataset(64)
    return [ds.scene(i) for i in range(1200)]


def test_analyzer_agrees_with_labels_in_every_kind_of_scene(scenes):
    agree, total = collections.Counter(), collections.Counter()
    for scene, image in scenes:
        found = analyze(image)
        ok = sorted((d.shape, d.color) for d in found) == sorted((o.shape, o.color) for o in scene.objects)
        if ok:  # and every object is found where it is
            for obj in scene.objects:
                match = min((d for d in found if (d.shape, d.color) == (obj.shape, obj.color)),
                            key=lambda d: np.hypot(d.center[0] - obj.center[0], d.center[1] - obj.center[1]))
                ok &= bool(np.hypot(match.center[0] - obj.center[0], match.center[1] - obj.center[1]) < 0.05)
        agree[scene.kind] += ok
        total[scene.kind] += 1
    for kind in total:
        assert agree[kind] / total[kind] >= 0.99, f"{kind}: {agree[kind]}/{total[kind]}"


def test_backgrounds_are_named(scenes):
    assert all(background_name(image) == scene.background for scene, image in scenes[:300])


def test_an_empty_picture_has_no_objects():
    assert analyze(np.zeros((64, 64, 3), dtype=np.uint8)) == []
