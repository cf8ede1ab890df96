"""Weights that ship inside the package: the default text-to-image model (builtin:shapes world).

Its recipe is `imagine train --preset shapes-default --out DIR`; `imagine export DIR
src/imagine/weights/shapes-default` writes it here in fp16."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "shapes-default"
DEFAULT_CLIP = Path(__file__).parent / "shapes-clip"
FAST_MODEL = Path(__file__).parent / "shapes-lcm"  # the default model distilled: `imagine distill-lcm`
SR_MODEL = Path(__file__).parent / "shapes-sr"  # 64 -> 256 super-resolution: `imagine train-sr`


def default_model() -> Path:
    """The shipped model folder; a clear error when this install lacks it."""
    if not (DEFAULT_MODEL / "diffusion.json").exists():
        raise FileNotFoundError(f"the default model is missing from this install ({DEFAULT_MODEL}); pass --model DIR "
                                "or reinstall imagine")
    return DEFAULT_MODEL


def fast_model() -> Path:
    """The shipped latent consistency model (the default model distilled for 1 to 4 steps)."""
    if not (FAST_MODEL / "diffusion.json").exists():
        raise FileNotFoundError(f"the fast model is missing from this install ({FAST_MODEL}); reinstall imagine, "
                                "or distil one: imagine distill-lcm --out DIR")
    return FAST_MODEL


def sr_model() -> Path:
    """The shipped super-resolution stage (64 -> 256 px, text-conditioned, for the default model)."""
    if not (SR_MODEL / "diffusion.json").exists():
        raise FileNotFoundError(f"the super-resolution stage is missing from this install ({SR_MODEL}); reinstall "
                                "imagine, or train one: imagine train-sr --out DIR")
    return SR_MODEL


def default_clip() -> Path:
    """The shipped CLIP-style scorer (``imagine train-clip``)."""
    if not (DEFAULT_CLIP / "model.safetensors").exists():
        raise FileNotFoundError(f"the default CLIP scorer is missing from this install ({DEFAULT_CLIP}); pass --clip "
                                "DIR (from `imagine train-clip`)")
    return DEFAULT_CLIP


def shipped() -> list[tuple[str, str, Path]]:
    """What ships inside the package, as (kind, name, path): the models `imagine models` lists first."""
    rows = [("text-to-image", "shapes-default", DEFAULT_MODEL), ("fast (LCM)", "shapes-lcm", FAST_MODEL),
            ("super-resolution", "shapes-sr", SR_MODEL), ("CLIP scorer", "shapes-clip", DEFAULT_CLIP)]
    rows += [("IP-Adapter", p.stem, p) for p in sorted((Path(__file__).parent / "ip-adapter").glob("*.safetensors"))]
    return [row for row in rows if row[2].exists()]
