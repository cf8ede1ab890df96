"""Our FID Inception against torch-fidelity's (a pure-torch port of the same TF graph, with pytorch-fid's
module names and weight-file layout), on random weights written in that layout.

torch-fidelity declares torchvision, whose PyPI wheel is built for CUDA torch and does not import beside
the CPU wheel, so it is installed with ``pip install --no-deps torch-fidelity==0.4.0`` and imported without
its package __init__ (which pulls torchvision in). CI installs it and sets IMAGINE_REQUIRE_ORACLES=1, so
there this test fails rather than skips."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch

from imagine.io.checkpoint import CheckpointError
from imagine.io.networks import load_fid_inception
from imagine.models import FIDInceptionV3


def _fidelity_inception():
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        if os.environ.get("IMAGINE_REQUIRE_ORACLES"):
            pytest.fail("the Inception parity test needs torch-fidelity: pip install --no-deps torch-fidelity==0.4.0")
        pytest.skip("torch-fidelity not installed (pip install --no-deps torch-fidelity==0.4.0)")
    if "torch_fidelity" not in sys.modules:  # its submodules, without the __init__ that imports torchvision
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
    """Random weights in the weight file's layout: batch-norm statistics calibrated on random images (so
    activations neither vanish nor explode through 94 layers), random affine terms, and the 1008-way head."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None  # cumulative: one training-mode pass sets the running statistics to the batch's
    model.train()
    with torch.no_grad():
        model.network(torch.rand(2, 3, 299, 299) * 2 - 1)
    model.eval()
    state = model.state_dict()
    for key in [k for k in state if k.endswith("bn.weight") or k.endswith("bn.bias")]:
        state[key] = state[key] + 0.1 * torch.randn_like(state[key])
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return path


def test_pool_features_match_torch_fidelity(weight_file):
    theirs = _fidelity_inception()("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weight_file))
    ours = load_fid_inception(weight_file)
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (expected,) = theirs(images)
        got = ours.network((images.float() - 128) / 128)  # torch-fidelity's normalization, at the input size
    assert got.shape == (2, 2048)
    assert expected.abs().mean() > 0.05  # the random network passes a signal through
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_forward_resizes_like_pytorch_fid(weight_file):
    """pytorch-fid resizes [0, 1] images to 299 (bilinear, align_corners=False) and maps them to [-1, 1];
    resizing commutes with that affine map, so images already in [-1, 1] are resized and used as they are."""
    model = load_fid_inception(weight_file)
    images01 = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pytorch_fid_input = 2 * torch.nn.functional.interpolate(images01, size=(299, 299), mode="bilinear",
                                                                align_corners=False) - 1
        torch.testing.assert_close(model(images01 * 2 - 1), model.network(pytorch_fid_input), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="RGB"):
        model(torch.zeros(1, 1, 64, 64))


def test_foreign_and_damaged_files_are_refused_with_the_keys(tmp_path, weight_file):
    state = torch.load(weight_file, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointError) as err:
        load_fid_inception(broken)
    message = str(err.value)
    for needle in ("1 missing: Mixed_7c.branch_pool.conv.weight", "1 unexpected: AuxLogits.fc.weight",
                   "Mixed_5b.branch1x1.conv.weight: checkpoint (1, 1, 1, 1) vs model (64, 192, 1, 1)",
                   "pt_inception-2015-12-05-6726825d.pth"):
        assert needle in message
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weight_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="weights_only"):
        load_fid_inception(truncated)
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        load_fid_inception(tmp_path / "absent.pth")
