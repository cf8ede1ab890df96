"""Which device runs the networks: ``--device auto|cpu|cuda|cuda:N|mps`` on every command that runs one.

``auto`` takes the best this machine has (a CUDA GPU, then Apple's MPS, then the CPU). A device that is not
there is one clear error, never a traceback from deep inside torch. Whatever the device, the starting noise is
drawn by CPU generators (samplers/common.py) and moved, so a seed gives the same image on any device up to the
device's arithmetic, which the PNG records (its ``device``).
"""

from __future__ import annotations

import contextlib

import torch

DEVICES = "auto, cpu, cuda, cuda:N or mps"
EXECUTION_DEVICE = "_imagine_execution_device"  # set on a network under offload (pipelines/offload.py)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``name`` as a torch device that exists here; None and "auto" pick the best available."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {name!r} unknown; choose {DEVICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch can use (torch "
                             f"{torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'}); use "
                             "--device cpu, or auto")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps():
            raise ValueError(f"--device {name}: Apple's MPS is not available here; use --device cpu, or auto")
        return device
    raise ValueError(f"device {name!r} is not one imagine runs on; choose {DEVICES}")


def _mps() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def to_device(value, device: torch.device):
    """Tensors (in dicts, lists and tuples, as conditioning holds them) on ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: its weights' device (the CPU for one without any), or, under offload, the device
    its weights are brought to when it runs."""
    placed_at = getattr(module, EXECUTION_DEVICE, None)
    if placed_at is not None:
        return placed_at
    if not isinstance(module, torch.nn.Module):  # a runtime's session standing in for one (ONNX Runtime's)
        return torch.device(getattr(module, "device", "cpu"))
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when enabled; no autocast context at all otherwise (a device torch has no
    autocast for, such as meta, then runs as it is)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def text_modules(encoder) -> list[torch.nn.Module]:
    """A text encoder's transformers (CLIPs, T5, MiniLM), whatever its kind."""
    found = [m for m in getattr(encoder, "models", None) or [] if isinstance(m, torch.nn.Module)]
    for name in ("model", "t5"):
        part = getattr(encoder, name, None)
        part = getattr(part, "model", part) if name == "t5" else part
        if isinstance(part, torch.nn.Module) and all(part is not m for m in found):
            found.append(part)
    return found


@contextlib.contextmanager
def placed(modules, tensors, device: torch.device):
    """Training on ``device``: the modules moved there (their parameters keep their identity, so an optimizer
    holding them follows) and any other trained tensor (LoRA factors, textual-inversion vectors) moved in
    place; all back to the CPU at the end, whatever happens, so what is saved afterwards is on the CPU."""
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    if device.type == "cpu":
        yield
        return
    try:
        for module in modules:
            module.to(device)
        for tensor in tensors:
            if tensor.device != device:
                tensor.data = tensor.data.to(device)
        yield
    finally:
        for module in modules:
            module.to("cpu")
        for tensor in tensors:
            if tensor.device.type != "cpu":
                tensor.data = tensor.data.to("cpu")
