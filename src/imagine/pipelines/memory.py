"""Memory, planned before work (issue 35): what a request will hold at its peak, stage by stage, checked before
anything is allocated and shown by ``--plan`` without running.

The stages of a text-to-image request, beyond the networks' weights (resident from loading on):
- sampling: the denoiser's widest activations at one step (both branches of guidance; bounded by the tile when
  sampling in tiles) and the sampler's state (the sample, its estimates and history);
- decode: the VAE decoder's activations over the whole image (sampling tiles do not bound it) and the images
  it makes; when a batch does not fit, the VAE decodes a few images at a time (VAE slicing), which gives the
  same pixels; when even two images do not fit, it decodes in overlapping tiles (VAE tiling, the largest tile
  that fits: the pixels differ slightly from a whole decode, so the tile is recorded and --from repeats it).
The peak is the larger of the two. The coefficients are fitted on measured peaks of the shipped model and SD
1.5 at several sizes (benchmarks/memory_plan.py, docs/benchmarks/memory_plan.md); a request that would not fit
in 90% of the memory the device has free is refused with the figures and the largest size that fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imagine.devices import module_device
from imagine.io.model_folder import DiffusionModel
from imagine.nn.compact import compute_dtypes
from imagine.pipelines.offload import largest_layer_bytes, network_bytes

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
    # GEGLU feed-forward) runs there too (SD 1.x); for a transformer over patches, 6 of its 4x-wide MLP per token
    # (PixArt-alpha at 512); fitted on benchmarks/memory_plan.py's measured peaks
    if hasattr(net, "block_out_channels"):
        copies = 34 if "CrossAttn" in net.down_block_types[0] else 20
    else:
        copies = 6
    w, h = (min(width, tile), min(height, tile)) if tile else (width, height)
    elem = 2 if compute_dtypes(model.unet) == {torch.bfloat16} else 4  # bf16 weights: bf16 activations
    step = 2 * n * elem * copies * per_position * (w // f) * (h // f) + OVERHEAD
    channels = model.vae.config.latent_channels if model.vae is not None else model.spec.image_channels
    state = 8 * n * 4 * channels * (width // f) * (height // f)  # the sample, noise, estimates, history
    return step + state


def decode_bytes(model: DiffusionModel, width: int, height: int, n: int, rows: int | None = None,
                 vae_tile: int | None = None) -> int:
    """The VAE decoder's activations over whole images (over one tile of ``vae_tile`` pixels a side when tiled),
    ``rows`` at a time (all n by default; a lone image is decoded beside a copy of itself, generate.decode), and
    the n images (float and uint8 copies; when tiled, the blended sum and its weights too)."""
    rows = max(2, min(n, rows or n))
    w, h = (min(width, vae_tile), min(height, vae_tile)) if vae_tile else (width, height)
    # about 8 live copies of the decoder's full-resolution width (fitted on the measured peaks)
    vae = rows * 4 * 8 * model.vae.config.block_out_channels[0] * w * h if model.vae is not None else 0
    images = n * 3 * width * height * (4 * 3 + 1) + (rows * 3 * width * height * 4 * 2 if vae_tile else 0)
    return vae + images + 2 * OVERHEAD


def decode_rows(model: DiffusionModel, width: int, height: int, n: int, available: int | None,
                vae_tile: int | None = None) -> int:
    """How many images the VAE decodes at a time: all of them when they fit, else the most that do (VAE
    slicing: the same pixels, as every batch of two rows or more computes a row the same), at least two."""
    if available is None or n <= 2:
        return n
    for rows in range(n, 2, -1):
        if decode_bytes(model, width, height, n, rows, vae_tile) <= HEADROOM * available:
            return rows
    return 2


VAE_TILES = (1024, 768, 512, 384, 256, 192, 128)  # the sizes the plan tries, largest (fewest seams) first


def vae_tile_for(model: DiffusionModel, width: int, height: int, n: int, available: int | None) -> int | None:
    """None when the VAE can decode the images whole (sliced to two rows at least), else the largest tile
    side that fits (None again when none does: the plan then refuses)."""
    if available is None or model.vae is None or decode_bytes(model, width, height, n, 2) <= HEADROOM * available:
        return None
    for tile in VAE_TILES:
        if tile < max(width, height) and decode_bytes(model, width, height, n, 2, tile) <= HEADROOM * available:
            return tile
    return None


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
    vae_tile: int | None = None  # VAE tiling: decoded in tiles of this many pixels a side
    picked: bool = False  # the plan chose the VAE tile (the request did not)
    offload: str = "none"  # model or sequential: networks brought to the device only to run (pipelines/offload.py)
    resident: int = 0  # under offload: the weights on the device while the peak runs (the largest network or layer)

    @property
    def peak(self) -> int:
        return max(self.sampling, self.decode) + self.resident

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
                f"  decoding            {self.decode / GB:8.2f} GB  ("
                + (f"the VAE over {self.vae_tile} px tiles: VAE tiling" + (", as the whole would not fit"
                                                                           if self.picked else "")
                   if self.vae_tile else "the VAE over the whole image") + ", the images"
                + (f"; {self.rows} images at a time: VAE slicing" if self.rows < self.n else "") + ")",
                *([f"  offload             {self.resident / GB:8.2f} GB  ({self.offload} offload: "
                   + ("each network on the device only while it runs; the largest counted in the peak)"
                      if self.offload == "model" else "one layer's weights on the device at a time)")]
                  if self.offload != "none" else []),
                f"  peak beyond weights {self.peak / GB:8.2f} GB  ({self.binding}); {free}",
                f"  {'fits' if self.fits else 'does not fit'} ({HEADROOM:.0%} of the free memory may be used)"]


def plan(model: DiffusionModel, width: int, height: int, n: int, tile: int | None = None,
         available: int | None = None, text_encoder=None, vae_tile: int | None = None) -> MemoryPlan:
    """The plan; when decoding whole would not fit (and the request named no VAE tile), VAE tiling at the
    largest tile that fits."""
    device = module_device(model.unet)
    free = available_bytes(device) if available is None else available
    picked = False
    if vae_tile is None:
        vae_tile = vae_tile_for(model, width, height, n, free)
        picked = vae_tile is not None
    rows = decode_rows(model, width, height, n, free, vae_tile)
    offload = getattr(model, "offload", None)
    mode, resident = "none", 0
    if offload is not None:
        mode = offload.mode
        resident = max(map(network_bytes, offload.networks)) if mode == "model" else \
            max(map(largest_layer_bytes, offload.networks))
    return MemoryPlan(width, height, n, tile, str(device), weights_bytes(model, text_encoder),
                      sampling_bytes(model, width, height, n, tile),
                      decode_bytes(model, width, height, n, rows, vae_tile), free, rows, vae_tile, picked, mode,
                      resident)


def offload_choice(networks: list[torch.nn.Module], activations: int, free: int | None) -> str:
    """What a model loaded onto a device should do with its networks: "none" when all of them fit beside the
    work (``activations``: a request's peak at the model's own size), "model" when the largest does, else
    "sequential" (one layer at a time). Unknown free memory: none."""
    if free is None:
        return "none"
    sizes = [network_bytes(n) for n in networks]
    if sum(sizes) + activations <= HEADROOM * free:
        return "none"
    if max(sizes) + activations <= HEADROOM * free:
        return "model"
    return "sequential"


def largest_side(model: DiffusionModel, n: int, tile: int | None, available: int) -> int:
    """The largest square side (a multiple of the latent factor) whose plan fits in ``available``, decoding in
    the smallest VAE tiles where need be."""
    f = model.latent_factor
    low, high = 0, 1 << 20
    while high - low > 1:
        mid = (low + high) // 2
        s = mid * f
        decoding = decode_bytes(model, s, s, n, 2, VAE_TILES[-1] if s > VAE_TILES[-1] and model.vae else None)
        fits = max(sampling_bytes(model, s, s, n, tile), decoding) <= HEADROOM * available
        low, high = (mid, high) if fits else (low, mid)
    return max(f, low * f)


def check(model: DiffusionModel, width: int, height: int, n: int, tile: int | None = None,
          available: int | None = None, vae_tile: int | None = None) -> MemoryPlan:
    """The plan (with VAE tiling picked when decoding whole would not fit), or a refusal (ValueError) before
    anything is allocated: the figures, the largest size that fits, and tiles when sampling is what does not
    fit (--tile bounds the sampling, VAE tiles the decoding)."""
    p = plan(model, width, height, n, tile, available, vae_tile=vae_tile)
    if p.fits:
        return p
    side = largest_side(model, n, tile, p.available)
    hint = ""
    if p.binding == "sampling" and not tile:
        hint = "; or sample in tiles (--tile 512, the APIs' tile) to bound memory"
    raise ValueError(f"{width}x{height}{f' x {n} images' if n > 1 else ''} would need about {p.peak / GB:.1f} GB "
                     f"for its activations ({p.binding}{f', in {p.vae_tile} px VAE tiles' if p.vae_tile else ''}), "
                     f"and this machine has {p.available / GB:.1f} GB free: at most about {side}x{side} fits{hint}")
