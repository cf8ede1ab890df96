"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import pytest

from tests.e2e.inprocess import imagine


@pytest.fixture(scope="session")
def tiny_t2i_dir(tmp_path_factory):
    """A text-to-image model folder trained for seconds (tiny-t2i preset): for serving tests."""
    out = tmp_path_factory.mktemp("served") / "tiny-shapes"
    run = imagine("train", "--data", "builtin:shapes", "--preset", "tiny-t2i", "--out", str(out), "--steps", "10")
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def t2i_model(tiny_t2i_dir):
    """The tiny model loaded once, for tests that call the pipeline directly (and do not change it)."""
    from imagine.io.model_folder import load_model_folder

    return load_model_folder(tiny_t2i_dir)


@pytest.fixture(scope="session")
def t2i_encoder():
    from imagine.models.text_encoders import default_text_encoder

    return default_text_encoder()
