"""tests/gpu run only where torch sees a CUDA GPU (a lent machine); everywhere else they are skipped, so CI on
the CPU stays green and the same command runs them on a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.conftest import tiny_t2i_dir  # noqa: F401 (the trained tiny model, for the GPU runs too)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here (tests/gpu run on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
