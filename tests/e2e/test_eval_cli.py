"""`imagine eval shapes` and `imagine eval fid` as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.data.shapes import ShapesDataset
from imagine.models import FIDInceptionV3
from tests.e2e.inprocess import imagine

_cli = imagine  # in-process (tests/e2e/inprocess.py)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two folders of builtin:shapes renders: training scenes 0..23 and 24..47, 64x64."""
    root = tmp_path_factory.mktemp("scenes")
    dataset = ShapesDataset(64)
    for name, indices in (("a", range(24)), ("b", range(24, 48))):
        (root / name).mkdir()
        for i in indices:
            Image.fromarray(dataset.scene(i)[1]).save(root / name / f"{i:03d}.png")
    return root


def test_eval_shapes_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "eval.json"
    run = _cli("eval", "shapes", "--per-category", "1", "--steps", "2", "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    for category in ("single_object", "two_objects", "counting", "colors", "position", "color_attr", "overall"):
        assert category in run.stdout
    data = json.loads(out.read_text())
    assert set(data["categories"]) == {"single_object", "two_objects", "counting", "colors", "position",
                                       "color_attr"}
    assert len(data["verdicts"]) == 6 and data["settings"]["steps"] == 2
    assert 0 <= data["overall"] <= 1
    held = tmp_path / "held.json"
    run = _cli("eval", "shapes", "--per-category", "1", "--steps", "2", "--phrasing", "held-out", "--json", str(held))
    assert run.returncode == 0, run.stderr[-2000:]
    other = json.loads(held.read_text())
    assert other["settings"]["phrasing"] == "held-out"
    pairs = list(zip(data["verdicts"], other["verdicts"], strict=True))
    assert all(a["seed"] == b["seed"] and a["prompt"] != b["prompt"] for a, b in pairs)  # same scenes, other words


def test_eval_shapes_with_rerank_judges_the_kept_candidates(tmp_path):
    out = tmp_path / "rerank.json"
    run = _cli("eval", "shapes", "--per-category", "1", "--steps", "2", "--rerank", "2", "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["settings"]["rerank"] == 2 and len(data["verdicts"]) == 6
    assert _cli("eval", "shapes", "--rerank", "0").returncode == 2


def test_eval_fid_clip_features_builtin_reference_and_cache(tmp_path, scenes):
    cache, out = tmp_path / "cache", tmp_path / "fid.json"
    args = ("eval", "fid", str(scenes / "a"), "builtin:shapes", "--reference-count", "48", "--cache", str(cache),
            "--kid-subset-size", "20")
    first = _cli(*args, "--json", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["n_generated"] == 24 and data["n_reference"] == 48 and data["features"] == "clip"
    low, high = data["kid_interval"]
    assert low < 0 < high  # real scenes against real scenes: no detectable difference
    assert len(list(cache.iterdir())) == 1  # the reference's features
    second = _cli(*args)
    assert second.returncode == 0 and f"FID        {data['fid']:.4f}" in second.stdout
    assert len(list(cache.iterdir())) == 1  # read back, not recomputed into a second file


def test_eval_fid_of_a_folder_against_itself_is_zero(tmp_path, scenes):
    out = tmp_path / "same.json"
    run = _cli("eval", "fid", str(scenes / "a"), str(scenes / "a"), "--cache", str(tmp_path), "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(out.read_text())["fid"] == pytest.approx(0, abs=1e-3)


@pytest.mark.slow  # over 10 s here: `pytest -m slow` runs it (CI's suite stays under 10 minutes)
def test_eval_fid_inception_from_a_local_weight_file(tmp_path, scenes):
    torch.manual_seed(0)
    weights = tmp_path / "pt_inception-test.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)  # random weights in pytorch-fid's layout
    out = tmp_path / "inception.json"
    run = _cli("eval", "fid", str(scenes / "a"), str(scenes / "b"), "--features", "inception", "--inception",
               str(weights), "--cache", str(tmp_path / "cache"), "--kid-subset-size", "10", "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["features"] == "inception" and data["n_generated"] == data["n_reference"] == 24
    assert np.isfinite(data["fid"]) and "biased upward" in run.stdout


def test_eval_fid_errors_say_what_to_do(tmp_path, scenes):
    run = _cli("eval", "fid", str(scenes / "a"), "builtin:shapes", "--features", "inception")
    assert run.returncode == 2 and "--inception" in run.stderr and "downloads nothing" in run.stderr
    run = _cli("eval", "fid", str(tmp_path / "absent"), "builtin:shapes")
    assert run.returncode == 2 and "not a folder of images" in run.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 64)).save(mixed / "a.png")
    Image.new("RGB", (32, 32)).save(mixed / "b.png")
    run = _cli("eval", "fid", str(mixed), str(scenes / "a"), "--cache", str(tmp_path / "c"))
    assert run.returncode == 2 and "differ in size" in run.stderr
    assert _cli("eval", "fid", str(mixed), str(scenes / "a"), "--size", "64", "--cache", str(tmp_path / "c"),
                "--kid-subset-size", "2").returncode == 0
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    run = _cli("eval", "fid", str(scenes / "a"), "builtin:shapes", "--features", "inception", "--inception",
               str(broken))
    assert run.returncode == 2 and "weights_only" in run.stderr
