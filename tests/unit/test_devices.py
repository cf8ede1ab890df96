"""Devices (issue 35): --device names a device that exists here or is one clear error; and the pipeline places
everything on the network's device. Without a GPU the placement is proven on the meta device: the networks
moved there compute shapes only, and any tensor the pipeline made on the CPU and mixed with theirs (noise,
conditioning, masks, init latents, a LoRA's layers) fails the run, as it would on a GPU."""

from __future__ import annotations

import pytest
import torch

from imagine.devices import module_device, resolve_device, to_device


def test_devices_resolve_or_say_why_not():
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")  # this machine: no GPU
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1", "CUDA:0"):
            with pytest.raises(ValueError, match=r"no CUDA GPU that torch can use.*--device cpu, or auto"):
                resolve_device(name)
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="MPS is not available here"):
            resolve_device("mps")
    for name in ("banana", "cuda:x"):
        with pytest.raises(ValueError, match="unknown; choose auto, cpu, cuda, cuda:N or mps"):
            resolve_device(name)
    with pytest.raises(ValueError, match="not one imagine runs on"):
        resolve_device("meta")


def test_to_device_moves_nested_conditioning():
    cond = {"a": torch.ones(2), "b": [torch.zeros(1), 3], "c": None}
    moved = to_device(cond, torch.device("meta"))
    assert moved["a"].is_meta and moved["b"][0].is_meta and moved["b"][1] == 3 and moved["c"] is None
    assert module_device(torch.nn.Identity()) == torch.device("cpu")


def test_a_runs_device_auto_takes_this_processs_gpu_or_the_cpu(monkeypatch):
    from imagine.train.loop import training_device

    assert training_device(None) == training_device("auto") == torch.device("cpu")  # no GPU here
    assert training_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device("auto") == torch.device("cuda", 1)  # under torchrun: this rank's GPU


def test_placed_on_the_cpu_moves_nothing():
    from imagine.devices import placed

    layer, extra = torch.nn.Linear(2, 2), torch.zeros(3, requires_grad=True)
    before = layer.weight
    with placed([layer], [extra], torch.device("cpu")):
        assert layer.weight is before and extra.device.type == "cpu"
