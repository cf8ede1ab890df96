"""Memory, planned before work (issue 35): what a request will hold at its peak, stage by stage, checked before
anything is allocated and shown by ``--plan`` without running.

The stages of a text-to-image request, beyond the networks' weights (resident from loading on):
- sampling: the denoiser's widest activations at one step (both branches of guidance; bounded by the tile when
  sampling in tiles) and the sampler's state (the sample, its estimates and history);
- decode: the VAE decoder's activations over the whole image (tiles do not bound it: the latent is decoded
  whole) and the images it makes; when a batch does not fit, the VAE decodes a few images at a time (VAE
  slicing), which gives the same pixels.
The peak is the larger of the two. The coefficients are fitted on measured peaks of the shipped model and SD
1.5 at several sizes (benchmarks/memory_plan.py, docs/benchmarks/memory_plan.md); a request that would not fit
in 90% of the memory the device has free is refused with the figures and the largest size that fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imagine.devices import module_device
from imagine.io.model_folder import DiffusionModel

GB = 2**30
HEADROOM = 0.9  # of the free memory a plan may use
OVERHEAD = 32 * 2**20  # what any stage holds besides its tensors (workspaces, the allocator's slack)


def weights_bytes(model: DiffusionModel, text_encoder=None) -> int:
    """What the loaded networks hold: the denoiser, the VAE and the text encoder's transformers."""
    modules = [model.unet, model.vae, *(getattr(text_encoder, "models", None) or [])]
    seen, total = set(), 0
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def sampling_bytes(model: DiffusionModel, width: int, height: int, n: int, tile: int | None = None) -> int:
    """One step's activations (both guidance branches; the tile's when tiled) and the sampler's state."""
    f = model.latent_factor
    net = model.unet.config  # its widest activations per latent position: a UNet's first level, a DiT's tokens
    per_position = net.block_out_channels[0] if hasattr(net, "block_out_channels") else \
        net.inner_dim * 4 // net.patch_size**2  # attention and the 4x MLP, per token
    # live copies at the first level: 20 for convolutions alone, 34 where a transformer block (its attention and
    # GEGLU feed-forward) runs there too (SD 1.x); fitted on benchmarks/memory_plan.py's measured peaks
    blocks = getattr(net, "down_block_types", ("CrossAttnDownBlock2D",))
    copies = 34 if "CrossAttn" in blocks[0] else 20
    w, h = (min(width, tile), min(height, tile)) if tile else (width, height)
    step = 2 * n * 4 * copies * per_position * (w // f) * (h // f) + OVERHEAD
    channels = model.vae.config.latent_channels if model.vae is not None else model.spec.image_channels
    state = 8 * n * 4 * channels * (width // f) * (height // f)  # the sample, noise, estimates, history
    return step + state


def decode_bytes(model: DiffusionModel, width: int, height: int, n: int, rows: int | None = None) -> int:
    """The VAE decoder's activations over whole images, ``rows`` at a time (all n by default; a lone image is
    decoded beside a copy of itself, generate.decode), and the n images (float and uint8 copies)."""
    rows = max(2, min(n, rows or n))
    # about 8 live copies of the decoder's full-resolution width (fitted on the measured peaks)
    vae = rows * 4 * 8 * model.vae.config.block_out_channels[0] * width * height if model.vae is not None else 0
    return vae + n * 3 * width * height * (4 * 3 + 1) + 2 * OVERHEAD


def decode_rows(model: DiffusionModel, width: int, height: int, n: int, available: int | None) -> int:
    """How many images the VAE decodes at a time: all of them when they fit, else the most that do (VAE
    slicing: the same pixels, as every batch of two rows or more computes a row the same), at least two."""
    if available is None or n <= 2:
        return n
    for rows in range(n, 2, -1):
        if decode_bytes(model, width, height, n, rows) <= HEADROOM * available:
            return rows
    return 2


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now: a GPU's (torch.cuda.mem_get_info), the machine's otherwise (Linux's
    MemAvailable); None where it is not known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class MemoryPlan:
    width: int
    height: int
    n: int
    tile: int | None
    device: str
    weights: int  # held by the loaded networks (already resident when the plan is made)
    sampling: int
    decode: int  # at ``rows`` images a time
    available: int | None  # free on the device now, beyond the weights
    rows: int = 0  # images the VAE decodes at a time (VAE slicing below n)

    @property
    def peak(self) -> int:
        return max(self.sampling, self.decode)

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak <= HEADROOM * self.available

    @property
    def binding(self) -> str:
        return "sampling" if self.sampling >= self.decode else "decoding"

    def lines(self) -> list[str]:
        """The plan as ``--plan`` prints it."""
        size = f"{self.width}x{self.height}" + (f" x {self.n} images" if self.n > 1 else "")
        free = f"{self.available / GB:.2f} GB free" if self.available is not None else "free memory unknown"
        return [f"memory plan for {size} on {self.device}{f', in {self.tile} px tiles' if self.tile else ''}:",
                f"  weights (resident)  {self.weights / GB:8.2f} GB",
                f"  sampling            {self.sampling / GB:8.2f} GB  (one step's activations, the sampler's state)",
                f"  decoding            {self.decode / GB:8.2f} GB  (the VAE over the whole image, the images"
                + (f"; {self.rows} images at a time: VAE slicing" if self.rows < self.n else "") + ")",
                f"  peak beyond weights {self.peak / GB:8.2f} GB  ({self.binding}); {free}",
                f"  {'fits' if self.fits else 'does not fit'} ({HEADROOM:.0%} of the free memory may be used)"]


def plan(model: DiffusionModel, width: int, height: int, n: int, tile: int | None = None,
         available: int | None = None, text_encoder=None) -> MemoryPlan:
    device = module_device(model.unet)
    free = available_bytes(device) if available is None else available
    rows = decode_rows(model, width, height, n, free)
    return MemoryPlan(width, height, n, tile, str(device), weights_bytes(model, text_encoder),
                      sampling_bytes(model, width, height, n, tile), decode_bytes(model, width, height, n, rows), free,
                      rows)


def largest_side(model: DiffusionModel, n: int, tile: int | None, available: int) -> int:
    """The largest square side (a multiple of the latent factor) whose plan fits in ``available``."""
    f = model.latent_factor
    low, high = 0, 1 << 20
    while high - low > 1:
        mid = (low + high) // 2
        s = mid * f
        fits = max(sampling_bytes(model, s, s, n, tile), decode_bytes(model, s, s, n, 2)) <= HEADROOM * available
        low, high = (mid, high) if fits else (low, mid)
    return max(f, low * f)


def check(model: DiffusionModel, width: int, height: int, n: int, tile: int | None = None,
          available: int | None = None) -> MemoryPlan:
    """The plan, or a refusal (ValueError) before anything is allocated: the figures, the largest size that
    fits, and tiles when sampling is what does not fit (tiles bound the sampling, not the decoding)."""
    p = plan(model, width, height, n, tile, available)
    if p.fits:
        return p
    side = largest_side(model, n, tile, p.available)
    hint = ""
    if p.binding == "sampling" and not tile:
        hint = "; or sample in tiles (--tile 512, the APIs' tile) to bound memory"
    raise ValueError(f"{width}x{height}{f' x {n} images' if n > 1 else ''} would need about {p.peak / GB:.1f} GB "
                     f"for its activations ({p.binding}), and this machine has {p.available / GB:.1f} GB free: at "
                     f"most about {side}x{side} fits{hint}")
