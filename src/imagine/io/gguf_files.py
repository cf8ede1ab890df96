"""GGUF files (the ggml project's format; city96's ComfyUI-GGUF, Forge and diffusers run diffusion models from
them), read and written with the ``gguf`` package, ggml's own Python reader.

Reading (io/checkpoint.open_gguf, which open_weights calls for a .gguf file): every tensor by name, as the
file holds it. Block-quantized tensors (Q8_0, Q5_K, Q4_K, ...) stay
packed (nn/compact.Packed) and are dequantized layer by layer at compute time; F32, F16 and BF16 tensors are
plain tensors. The keys are the checkpoint's own, as ComfyUI-GGUF's conversions keep them: a Flux transformer
in Black Forest Labs' layout (``double_blocks.N...``), SD3's in Stability's (``joint_blocks.N...``), so a GGUF
file loads through the same key maps as the safetensors file it was made from. ComfyUI-GGUF's
``comfy.gguf.orig_shape.NAME`` entries (tensors it stored reshaped) are honoured.

Writing (``imagine convert --to gguf --quant Q8_0``): the large matrices in the type asked (those whose rows
hold whole blocks), the rest (norms, biases, convolution kernels, embeddings) in F16, vectors in F32, as
ComfyUI-GGUF's convert does; ``general.architecture`` names the family as ComfyUI-GGUF does (``flux``,
``sd3``, ``sd1``, ``sdxl``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from imagine.io.checkpoint import ORIG_SHAPE
from imagine.nn.compact import WRITABLE, packable, quantize


def write_gguf(tensors: Mapping[str, torch.Tensor], path: Path, arch: str, quant: str,
               metadata: Mapping[str, str] = (), rest: Mapping[str, torch.Tensor] = ()) -> dict[str, int]:
    """Write ``tensors`` (keys as given) to ``path`` atomically: packable matrices in ``quant`` (or kept in F16
    with ``quant`` "F16"), the rest in F16, vectors in F32; ``rest`` (other parts: text encoders, a VAE) in F16
    and F32 whatever ``quant``. Returns how many tensors went to each type."""
    if quant != "F16" and quant not in WRITABLE:
        raise ValueError(f"imagine writes GGUF as {', '.join(('F16', *WRITABLE))}; {quant} is not one of them "
                         "(K-quants such as Q4_K are read, not written: the gguf package cannot quantize them)")
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    counts: dict[str, int] = {}
    writer = GGUFWriter(str(tmp), arch=arch)
    try:
        writer.add_quantization_version(GGML_QUANT_VERSION)
        for key, value in dict(metadata).items():
            writer.add_string(key, str(value))
        every = [(k, v, quant) for k, v in tensors.items()] + [(k, v, "F16") for k, v in dict(rest).items()]
        for key, tensor, kind in every:
            tensor = tensor.detach().cpu()
            if kind != "F16" and packable(tensor, kind):
                packed = quantize(tensor, quant)
                writer.add_tensor(key, packed.data.numpy(), raw_dtype=GGMLQuantizationType[quant])
                if tensor.ndim != 2:  # stored as rows of blocks: its shape kept as ComfyUI-GGUF keeps it
                    writer.add_array(ORIG_SHAPE + key, [int(d) for d in tensor.shape])
                kind = quant
            elif tensor.ndim <= 1 or not tensor.is_floating_point():
                writer.add_tensor(key, tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy())
                kind = "F32" if tensor.is_floating_point() else str(tensor.dtype)
            else:
                writer.add_tensor(key, tensor.to(torch.float16).numpy())
                kind = "F16"
            counts[kind] = counts.get(kind, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return counts
