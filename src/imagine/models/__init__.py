"""Model architectures, one per file, each with its Config dataclass at the top; they import only from nn/.
Their loaders and savers (ours and diffusers' folders, strict about keys) live in io/networks.py."""

from imagine.models.autoencoder import AutoencoderKL, VAEConfig
from imagine.models.clip import CLIPConfig, ShapesCLIP
from imagine.models.controlnet import ControlNetConfig, ControlNetModel
from imagine.models.inception import FIDInceptionV3
from imagine.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from imagine.models.unet import UNet2DConditionModel, UNetConfig

__all__ = ["AutoencoderKL", "CLIPConfig", "ControlNetConfig", "ControlNetModel", "FIDInceptionV3", "ShapesCLIP",
           "T2IAdapter", "T2IAdapterConfig", "UNet2DConditionModel", "UNetConfig", "VAEConfig"]
