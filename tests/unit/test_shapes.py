"""builtin:shapes: deterministic, varied, and its labels agree with its pixels and captions."""

from __future__ import annotations

import numpy as np

from imagine.data.shapes import COLORS, SHAPES, ShapesDataset, make_scene


def test_item_i_is_always_the_same():
    a, b = ShapesDataset(64), ShapesDataset(64)
    for i in (0, 7, 123456):
        (sa, ia), (sb, ib) = a.scene(i), b.scene(i)
        assert sa.caption == sb.caption and np.array_equal(ia, ib)
    assert a.scene(1)[0].caption != a.scene(2)[0].caption or not np.array_equal(a.scene(1)[1], a.scene(2)[1])


def test_variety_of_the_world():
    scenes = [make_scene(i) for i in range(600)]
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert len({o.color for s in scenes for o in s.objects}) >= 8 and len(COLORS) >= 8
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    assert {s.kind for s in scenes} == {"single", "count", "pair", "relation"}
    assert {s.background for s in scenes} > {"black"}
    assert {s.relation for s in scenes if s.relation} == {"above", "below", "to the left of", "to the right of"}


def test_labels_match_pixels_and_captions():
    ds = ShapesDataset(64)
    numbers = {2: "two", 3: "three", 4: "four"}
    for i in range(200):
        scene, img = ds.scene(i)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert obj.mask.sum() > 10 and obj.mask[y0:y1, x0:x1].sum() == obj.mask.sum()
            core = img[obj.mask].astype(int)  # the object's pixels carry its colour (antialiased edges aside)
            assert np.median(np.abs(core - np.array(COLORS[obj.color])).sum(1)) < 40
            assert obj.color in scene.caption
        if scene.kind == "count":
            assert scene.caption.startswith(numbers[len(scene.objects)])
        if scene.relation:
            (ax, ay), (bx, by) = scene.objects[0].center, scene.objects[1].center
            expected = {"above": ay < by, "below": ay > by, "to the left of": ax < bx, "to the right of": ax > bx}
            assert expected[scene.relation], scene.caption
            main = abs(ay - by) if scene.relation in ("above", "below") else abs(ax - bx)
            cross = abs(ax - bx) if scene.relation in ("above", "below") else abs(ay - by)
            assert main > cross  # unambiguous: the relation's axis dominates


def test_batch_is_images_and_captions():
    x, labels, captions = ShapesDataset(32).batch([3, 4])
    assert x.shape == (2, 3, 32, 32) and labels is None and len(captions) == 2
    assert x.min() >= -1 and x.max() <= 1
