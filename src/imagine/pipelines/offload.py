"""Offload: networks kept in the CPU's memory and brought to the device only to compute, for models whose
weights do not fit on the device beside their activations (diffusers' enable_model_cpu_offload and
enable_sequential_cpu_offload; Forge's and ComfyUI's automatic offload).

- model offload: each network (the text encoders' transformers, the denoiser, the VAE, a refiner, a ControlNet)
  moves to the device when it is called and the one there before goes back: the device holds the largest
  network, not all of them. A request moves each network once (text, steps, decode), so it costs a copy of each
  per request.
- sequential offload: every layer's weights go to the device for that layer's call and come back after: the
  device holds one layer's weights; every step copies the whole denoiser (slow: for when nothing else fits).

The pipelines need not know: a network under offload reports its execution device (devices.module_device), so
inputs, the sampler's state and conditioning are made there, and forward hooks move the weights in time. The
arithmetic is the device's own, so an offloaded image is the same as one computed with the network resident.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from imagine.devices import EXECUTION_DEVICE

MODES = ("none", "model", "sequential")


def _move(module: nn.Module, device: torch.device) -> None:
    module.to(device)


class Offload:
    """Hooks on ``networks`` that keep them on ``home`` (the CPU) and bring them to ``device`` as they run.
    ``mover(module, device)`` moves a module (replaceable, so tests can watch the policy without a GPU)."""

    def __init__(self, networks: Iterable[nn.Module], device: torch.device, mode: str = "model",
                 home: str | torch.device = "cpu", mover: Callable[[nn.Module, torch.device], None] = _move):
        if mode not in MODES[1:]:
            raise ValueError(f"offload {mode!r} unknown; choose {', '.join(MODES)}")
        self.device, self.mode, self.home, self.mover = torch.device(device), mode, torch.device(home), mover
        self.networks = [n for n in dict.fromkeys(networks) if isinstance(n, nn.Module)]
        self.resident: nn.Module | None = None
        self.moves: list[tuple[str, str]] = []  # (what, where): the policy, as it ran
        self._handles = []
        for net in self.networks:
            self.mover(net, self.home)
            setattr(net, EXECUTION_DEVICE, self.device)
            if mode == "model":  # any of its modules called first brings the whole network (a VAE's decode() runs
                # its decoder, never its own forward)
                bring = self._bring(net)
                self._handles.extend(m.register_forward_pre_hook(bring) for m in net.modules())
            else:
                for layer in _leaves(net):
                    self._handles.append(layer.register_forward_pre_hook(self._stream_in(layer)))
                    self._handles.append(layer.register_forward_hook(self._stream_out(layer)))
        for net in self.networks:
            for sub in net.modules():  # a part called on its own (a VAE's decoder) knows where it runs too
                if sub is not net:
                    setattr(sub, EXECUTION_DEVICE, self.device)

    def _record(self, module: nn.Module, where: torch.device) -> None:
        self.moves.append((type(module).__name__, str(where)))
        self.mover(module, where)

    def _bring(self, net: nn.Module):
        def hook(module, args):
            if self.resident is not net:
                if self.resident is not None:
                    self._record(self.resident, self.home)
                self._record(net, self.device)
                self.resident = net
        return hook

    def _stream_in(self, layer: nn.Module):
        def hook(module, args):
            self._record(layer, self.device)
        return hook

    def _stream_out(self, layer: nn.Module):
        def hook(module, args, output):
            self._record(layer, self.home)
        return hook

    def close(self) -> None:
        """Remove the hooks; every network back home, placed as it was before offload."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for net in self.networks:
            self.mover(net, self.home)
            for sub in net.modules():
                if hasattr(sub, EXECUTION_DEVICE):
                    delattr(sub, EXECUTION_DEVICE)
        self.resident = None


def _leaves(net: nn.Module) -> list[nn.Module]:
    """The modules that hold weights of their own (their parameters and buffers directly)."""
    return [m for m in net.modules() if any(True for _ in m.parameters(recurse=False))
            or any(True for _ in m.buffers(recurse=False))]


def network_bytes(net: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])


def largest_layer_bytes(net: nn.Module) -> int:
    return max((sum(t.numel() * t.element_size() for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
                for m in _leaves(net)), default=0)
