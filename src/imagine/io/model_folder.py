"""A trained diffusion model on disk: ``unet/``, optionally ``vae/``, and ``diffusion.json``, which says how
the UNet was trained (schedule, parametrization, image size, classes) so it can be sampled correctly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from imagine import __version__
from imagine.diffusion.parametrization import Prediction, check_prediction
from imagine.diffusion.schedules import BetaSchedule, make_alphas_cumprod
from imagine.families import Family, family, of_network
from imagine.io.checkpoint import CheckpointError, atomic_write_bytes, fresh_folder, read_json
from imagine.io.networks import load_unet, load_vae, save_unet, save_vae
from imagine.nn.config import config_from_dict

SPEC_NAME = "diffusion.json"
CASCADE = "cascade.json"  # a cascade folder: its stages in order (imagine train-cascade)
# the words of the training captions (data/vocabulary.py), when the model was trained on text here
VOCABULARY_NAME = "vocabulary.json"


@dataclass(frozen=True)
class DiffusionSpec:
    schedule: BetaSchedule = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    zero_terminal_snr: bool = False
    prediction: Prediction = "eps"
    learned_variance: bool = False
    image_size: int = 32
    image_channels: int = 3
    latent: bool = False  # diffusion runs on the VAE's scaled latents
    class_names: tuple[str, ...] = ()
    text_encoder: str | None = None  # "minilm" or "clip:PATH[:skip]" for text-to-image models
    # training steps use these timesteps; sampling's default spacing follows
    default_sampler: str = "dpmpp_2m"
    default_steps: int = 25
    default_cfg: float = 5.0  # what generation uses when the user names no guidance scale
    zero_empty_negative: bool = False  # SDXL: an empty negative prompt is a zero context, not encoded ""
    consistency: bool = False  # a latent consistency model (LCM): its denoiser applies the boundary scalings
    flow_shift: float = 1.0  # a flow model (prediction "flow"): the shift of its sampling times (SD3 uses 3)
    # Flux's resolution-dependent shift instead: e^mu, mu linear in the image's tokens (its 2 x 2 latent patches)
    # from flow_shift_range[0] at flow_token_range[0] tokens to [1] at [1] (diffusers' use_dynamic_shifting)
    flow_dynamic_shift: bool = False
    flow_shift_range: tuple[float, float] = (0.5, 1.15)
    flow_token_range: tuple[int, int] = (256, 4096)
    flow_grid_end: str = "train"  # the unshifted grid's last time: the last training time, or 1 / steps (Flux's)
    distilled_guidance: bool = False  # the denoiser embeds a distilled guidance scale (Flux [dev]): no CFG
    # channels the UNet reads beside the noisy latent: 5, an inpainting model's mask and masked-image latents
    conditioning_channels: int = 0
    # a super-resolution stage (diffusion/superres.py): it makes images `upscale` times larger, its UNet
    # taking the upsampled low-resolution image as extra input channels and its augmentation level (0 to
    # noise_levels - 1) as a class label; default_noise_level is the level generation uses unless told
    upscale: int = 1
    noise_levels: int = 0
    default_noise_level: int = 0

    def __post_init__(self):
        check_prediction(self.prediction)

    def alphas_cumprod(self):
        return make_alphas_cumprod(self.schedule, self.num_train_timesteps, self.beta_start, self.beta_end,
                                   self.zero_terminal_snr)

    @classmethod
    def from_dict(cls, data: dict) -> DiffusionSpec:
        try:
            return config_from_dict(cls, data, SPEC_NAME, ignore=frozenset({"_imagine_version"}))
        except (TypeError, ValueError) as err:
            raise CheckpointError(str(err)) from err


def save_spec(spec: DiffusionSpec, folder: Path) -> None:
    atomic_write_bytes(Path(folder) / SPEC_NAME,
                       json.dumps({"_imagine_version": __version__, **asdict(spec)}, indent=2).encode())


@dataclass
class DiffusionModel:
    """What ``imagine sample`` loads: the UNet, the VAE when the model is latent, and the spec. Stable
    Diffusion checkpoints also carry their text encoder, their architecture and the file A1111 hashes."""

    unet: object
    vae: object | None
    spec: DiffusionSpec
    path: Path
    text_encoder: object | None = None  # loaded with the model (SD checkpoints); None: from spec.text_encoder
    arch: str | None = None  # "sd1", "sd2", "sdxl" for Stable Diffusion checkpoints
    hash_file: Path | None = None  # the file whose SHA-256 is the "Model hash" (A1111: the checkpoint)
    vae_path: Path | None = None  # a separate VAE that replaced the model's own (--vae)
    # a transformer file's separate parts it was loaded with (Forge's "modules": text encoders, VAE), in order
    module_paths: list[Path] = field(default_factory=list)
    # the words its training captions held (None: not recorded, as for Stable Diffusion checkpoints)
    vocabulary: frozenset[str] | None = None
    offload: object | None = None  # pipelines/offload.Offload when its networks come to the device only to run

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def family(self) -> Family:
        """What this model is (families/): its checkpoint's family, else imagine's own, or SDXL's where the
        UNet takes SDXL's micro-conditioning (a folder saved from an SDXL checkpoint)."""
        if self.arch is not None:
            return family(self.arch)
        return of_network(self.unet)

    @property
    def latent_factor(self) -> int:
        """How many pixels a latent position spans a side (1: a pixel-space model)."""
        return self.vae.config.downscale if self.vae is not None else 1

    @property
    def weights_file(self) -> Path:
        return self.hash_file or self.path / "unet" / "model.safetensors"


def save_vocabulary(folder: Path | str, vocabulary: frozenset[str] | None, source: str = "") -> None:
    """Record the training captions' words beside the model (nothing when there are none)."""
    if vocabulary is not None:
        data = {"words": sorted(vocabulary), "source": source}
        atomic_write_bytes(Path(folder) / VOCABULARY_NAME, json.dumps(data, indent=1).encode())


def load_vocabulary(folder: Path | str) -> frozenset[str] | None:
    """The words a model folder records, or None when it records none."""
    path = Path(folder) / VOCABULARY_NAME
    if not path.is_file():
        return None
    words = read_json(path).get("words")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise CheckpointError(f"{path} has no list of words under 'words'")
    return frozenset(words)


def load_model_folder(path: Path | str, dtype=None) -> DiffusionModel:
    """``dtype``: what the UNet holds (default float32)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a model folder (expected {SPEC_NAME}, unet/ and maybe vae/)")
    if not (path / SPEC_NAME).exists():
        raise CheckpointError(f"{path} has no {SPEC_NAME}: is it an imagine model folder? "
                              f"(found: {sorted(p.name for p in path.iterdir())[:10] or 'nothing'})")
    spec = DiffusionSpec.from_dict(read_json(path / SPEC_NAME))
    unet = load_unet(path / "unet", dtype=dtype or torch.float32)
    vae = load_vae(path / "vae") if spec.latent else None
    return DiffusionModel(unet, vae, spec, path, vocabulary=load_vocabulary(path))


def save_model_folder(model: DiffusionModel, out: Path | str, dtype: str | None = None, replace: bool = False
                      ) -> Path:
    """An imagine model folder from a loaded model (UNet, VAE, spec), written whole or not at all; ``replace``:
    an existing folder at ``out`` gives way once the new one is complete."""
    with fresh_folder(Path(out), replace=replace) as tmp:
        save_unet(model.unet, tmp / "unet", dtype)
        if model.vae is not None:
            save_vae(model.vae, tmp / "vae", dtype)
        save_spec(model.spec, tmp)
        save_vocabulary(tmp, model.vocabulary)
    return Path(out)


def sr_stage_folders(path: Path) -> list[Path]:
    """An SR stage's folder, or a cascade folder's stages in order (its cascade.json)."""
    path = Path(path)
    if (path / CASCADE).exists():
        return [path / name for name in json.loads((path / CASCADE).read_text())["stages"]]
    if (path / "diffusion.json").exists():
        return [path]
    raise ValueError(f"{path} is neither a super-resolution stage (diffusion.json) nor a cascade (cascade.json)")
