from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.data.images import DataError, load_dataset, load_digits, load_folder


def _write(path, color, size=(20, 12), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path, format=fmt)


def test_folder_of_mixed_formats_with_classes_from_subfolders(tmp_path):
    _write(tmp_path / "cats" / "a.jpg", 255)
    _write(tmp_path / "cats" / "b.webp", 200)
    _write(tmp_path / "dogs" / "c.png", 0)
    data = load_folder(tmp_path, size=8, class_from_subfolders=True)
    assert data.images.shape == (3, 3, 8, 8) and data.class_names == ("cats", "dogs")
    assert data.labels.tolist() == [0, 0, 1]
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert torch.allclose(data.images[2], torch.full((3, 8, 8), -1.0))


def test_a_single_image_is_enough_and_crop_is_centered(tmp_path):
    img = np.zeros((10, 30, 3), dtype=np.uint8)
    img[:, 10:20] = 255  # a white band in the middle third
    Image.fromarray(img).save(tmp_path / "one.png")
    data = load_folder(tmp_path, size=10)
    assert len(data) == 1 and data.num_classes == 1
    assert data.images[0].mean() > 0.9  # the crop kept the centre


def test_flips_mirror_only_flagged_rows(tmp_path):
    data = load_digits(8)
    x, _, _ = data.batch([0, 1], torch.tensor([True, False]))
    assert torch.equal(x[0], data.images[0].flip(-1)) and torch.equal(x[1], data.images[1])


def test_digits_are_the_sklearn_set():
    data = load_digits(16)
    assert data.images.shape == (1797, 1, 16, 16) and data.num_classes == 10
    assert set(data.labels.tolist()) == set(range(10))


def test_bad_data_is_refused(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        load_folder(tmp_path, 8)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read .*broken\.png"):
        load_folder(tmp_path, 8)
    with pytest.raises(DataError, match="unknown built-in dataset"):
        load_dataset("builtin:cifar", 8)
    _write(tmp_path / "flat" / "x.png", 10)
    with pytest.raises(DataError, match="no sub-folders"):
        load_folder(tmp_path / "flat", 8, class_from_subfolders=True)


def test_captions_from_txt_files_or_metadata_jsonl(tmp_path):
    import json

    _write(tmp_path / "a.png", 10)
    _write(tmp_path / "b.png", 20)
    (tmp_path / "a.txt").write_text("a red circle\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "two blue squares"}) + "\n")
    data = load_folder(tmp_path, 8, captions=True)
    assert data.captions == ("a red circle", "two blue squares")
    _, _, caps = data.batch([1, 0])
    assert caps == ["two blue squares", "a red circle"]
    _write(tmp_path / "c.png", 30)
    with pytest.raises(DataError, match="1 images have no caption"):
        load_folder(tmp_path, 8, captions=True)
    (tmp_path / "metadata.jsonl").write_text("{broken\n")
    with pytest.raises(DataError, match=r"metadata\.jsonl:1"):
        load_folder(tmp_path, 8, captions=True)
