"""Offload (pipelines/offload.py) without a GPU: the policy watched through its mover (which moves nothing
here), the pixels unchanged, the plan's figures, and the refusal on the CPU. tests/gpu runs it for real."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagine.adapters.lora import forget_text_cache
from imagine.devices import module_device, text_modules
from imagine.pipelines import memory
from imagine.pipelines.offload import Offload, largest_layer_bytes, network_bytes
from imagine.pipelines.request import Request, load_text_model, run
from imagine.pipelines.settings import Settings
from imagine.weights import DEFAULT_MODEL

S = Settings(prompt="a red circle", steps=3, seed=2, cfg_scale=3.0)


def pixels(model, encoder) -> np.ndarray:
    return run(Request("txt2img", S).check(model), model, encoder)[0].pixels


def test_model_offload_brings_each_network_in_turn_and_keeps_the_pixels():
    model, encoder = load_text_model(DEFAULT_MODEL)
    want = pixels(model, encoder)
    networks = [*text_modules(encoder), model.unet, model.vae]
    # "meta" names home here: the mover moves nothing, so the run computes on the CPU while the log shows the policy
    off = Offload(networks, torch.device("cpu"), "model", home="meta", mover=lambda module, device: None)
    model.offload = off
    assert all(module_device(n) == torch.device("cpu") for n in networks)
    forget_text_cache(encoder)  # the prompt's states were cached by the first run: encode them again
    assert np.array_equal(pixels(model, encoder), want)
    text, unet, vae = (type(n).__name__ for n in (networks[0], model.unet, model.vae))
    assert off.moves == [(text, "cpu"), (text, "meta"), (unet, "cpu"), (unet, "meta"), (vae, "cpu")]
    again = len(off.moves)
    forget_text_cache(encoder)
    pixels(model, encoder)  # a second request: the VAE goes home as the text encoder comes back, and so on
    assert off.moves[again:again + 2] == [(vae, "meta"), (text, "cpu")]
    plan = memory.plan(model, 64, 64, 1, available=8 * 2**30)
    assert plan.offload == "model" and plan.resident == max(map(network_bytes, networks))
    assert "model offload" in "\n".join(plan.lines()) and plan.peak > max(plan.sampling, plan.decode)
    off.close()
    assert not hasattr(model.unet, "_imagine_execution_device")


def test_sequential_offload_streams_every_layer_and_keeps_the_pixels():
    model, encoder = load_text_model(DEFAULT_MODEL)
    want = pixels(model, encoder)
    off = Offload([model.unet], torch.device("cpu"), "sequential", home="meta", mover=lambda module, device: None)
    model.offload = off
    assert np.array_equal(pixels(model, encoder), want)
    ins = sum(where == "cpu" for _, where in off.moves)
    outs = sum(where == "meta" for _, where in off.moves)
    assert ins == outs and ins >= 3 * 2  # every layer in and out at each step (and more layers than steps)
    plan = memory.plan(model, 64, 64, 1, available=8 * 2**30)
    assert plan.offload == "sequential" and plan.resident == largest_layer_bytes(model.unet) < network_bytes(model.unet)


def test_the_choice_follows_the_free_memory():
    nets = [torch.nn.Linear(256, 256), torch.nn.Linear(64, 64)]  # 263 kB and 17 kB
    big, small = network_bytes(nets[0]), network_bytes(nets[1])
    assert memory.offload_choice(nets, 1000, None) == "none"
    assert memory.offload_choice(nets, 1000, int((big + small + 1000) / memory.HEADROOM) + 1) == "none"
    assert memory.offload_choice(nets, 1000, int((big + 1000) / memory.HEADROOM) + 1) == "model"
    assert memory.offload_choice(nets, 1000, big // 2) == "sequential"


def test_offload_on_the_cpu_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="on the CPU they are all in memory already"):
        load_text_model(DEFAULT_MODEL, device="cpu", offload="model")
    with pytest.raises(ValueError, match="offload 'half' unknown"):
        load_text_model(DEFAULT_MODEL, offload="half")
