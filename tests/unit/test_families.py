"""Families are data: each entry says what the loaders and the pipeline need, and a checkpoint is recognised
by asking the entries."""

import re
from dataclasses import replace

import pytest
import torch

from imagine.adapters import ATTACHMENTS
from imagine.adapters.attachment import Attachment
from imagine.families import (
    FAMILIES,
    FLUX,
    IMAGINE,
    PIXART_SIGMA,
    SD1,
    SD2,
    SD3,
    SDXL,
    SDXL_REFINER,
    UNET_ATTACHMENTS,
    family,
    from_diffusers,
    from_single_file,
)


def test_the_four_entries_hold_what_stable_diffusion_releases_use():
    assert set(FAMILIES) >= {"imagine", "sd1", "sd2", "sdxl", "imagine-dit", "imagine-pixart", "imagine-mmdit"}
    assert (SD1.latent.scaling_factor, SD2.latent.scaling_factor, SDXL.latent.scaling_factor) == (0.18215, 0.18215,
                                                                                                  0.13025)
    assert (SD1.image_size, SD2.image_size, SDXL.image_size) == (512, 768, 1024)
    assert (SD1.prediction, SD2.prediction, SDXL.prediction) == ("eps", "v", "eps")
    assert [len(f.text_encoders) for f in (SD1, SD2, SDXL)] == [1, 1, 2]
    assert SDXL.zero_empty_negative and not SD1.zero_empty_negative
    assert IMAGINE.latent is None  # its own VAE says
    assert (SD3.latent.channels, SD3.latent.scaling_factor, SD3.latent.shift_factor) == (16, 1.5305, 0.0609)
    assert (FLUX.latent.scaling_factor, FLUX.latent.shift_factor, FLUX.flow_grid_end) == (0.3611, 0.1159, "steps")
    assert SD3.text_encoders[-1].optional and not any(slot.optional for slot in FLUX.text_encoders)
    with pytest.raises(ValueError, match="unknown; imagine knows: imagine, sd1, sd2, sdxl, sdxl-refiner, sd3, flux"):
        family("kandinsky")


def test_a_checkpoint_is_recognised_by_the_families():
    assert from_single_file(["model.diffusion_model.x", "cond_stage_model.transformer.text_model.a"]) is SD1
    assert from_single_file(["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]) is SD2
    assert from_single_file(["conditioner.embedders.0.transformer.a", "conditioner.embedders.1.model.b"]) is SDXL
    assert from_single_file(["model.diffusion_model.x"]) is None
    assert from_diffusers("StableDiffusionXLPipeline", {}) is SDXL
    assert from_diffusers("StableDiffusionPipeline", {"hidden_act": "gelu"}) is SD2
    assert from_diffusers("StableDiffusionPipeline", {"hidden_act": "quick_gelu"}) is SD1
    assert from_diffusers("FluxPipeline", {}) is FLUX and from_diffusers("StableDiffusion3Pipeline", {}) is SD3
    assert from_diffusers("PixArtSigmaPipeline", {}) is PIXART_SIGMA
    assert from_diffusers("KandinskyV22Pipeline", {}) is None
    # the SDXL refiner: bigG alone under embedders.0, its img2img folder without CLIP-L; a base saved from its
    # img2img pipeline (CLIP-L present) is the base
    assert from_single_file(["conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"]) \
        is SDXL_REFINER
    assert from_diffusers("StableDiffusionXLImg2ImgPipeline", {}) is SDXL_REFINER
    assert from_diffusers("StableDiffusionXLImg2ImgPipeline", {"hidden_act": "quick_gelu"}) is SDXL


def test_only_sdxl_takes_micro_conditioning():
    pooled = torch.randn(3, 8)
    extra = SDXL.conditioning(pooled, width=96, height=64)
    assert extra["text_embeds"] is pooled and extra["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * 3
    assert SD1.conditioning(pooled, 96, 64) == {} and IMAGINE.conditioning(None, 96, 64) == {}
    with pytest.raises(ValueError, match="pooled text embedding"):
        SDXL.conditioning(None, 64, 64)
    # the refiner: the aesthetic score in place of the target size, lower on the negative branch
    assert SDXL_REFINER.conditioning(pooled, 96, 64)["time_ids"].tolist() == [[64, 96, 0, 0, 6.0]] * 3
    assert SDXL_REFINER.conditioning(pooled, 96, 64, negative=True)["time_ids"].tolist() == [[64, 96, 0, 0, 2.5]] * 3


def test_every_attachment_kind_is_registered_and_fits_the_unet_families():
    kinds = {cls.kind for cls in ATTACHMENTS}
    assert kinds <= UNET_ATTACHMENTS
    assert len({cls.record_key for cls in ATTACHMENTS}) == len(ATTACHMENTS)
    subclasses = set(Attachment.__subclasses__())
    assert subclasses == set(ATTACHMENTS), "an Attachment kind is missing from adapters.ATTACHMENTS"
    for f in FAMILIES.values():
        if f.network == "unet":
            assert kinds <= f.attachments
        else:  # the UNet's adapters do not fit a transformer; an MMDiT takes ControlNets made for it
            assert not {"t2i_adapter", "ip_adapter"} & f.attachments and "lora" in f.attachments
            assert ("controlnet" in f.attachments) == (f.network == "mmdit")


def test_a_family_refuses_an_attachment_that_does_not_fit_it():
    no_control = replace(SD1, attachments=UNET_ATTACHMENTS - {"controlnet"})
    no_control.check_attachment("lora", "x")
    with pytest.raises(ValueError, match=re.escape("does not fit a Stable Diffusion 1.x model; it takes: embedding, "
                                                   "ip_adapter, lora, t2i_adapter")):
        no_control.check_attachment("controlnet", "cn.safetensors")


def test_an_mmdit_takes_the_texts_sentence_vector():
    """MMDiT's pooled input: the encoder's pooled vector where it gives one, else the tokens' masked mean (the
    sentence embedding all-MiniLM-L6-v2 was trained to give)."""
    from imagine.families import IMAGINE_MMDIT

    context = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert IMAGINE_MMDIT.conditioning(None, 64, 64, context, mask)["pooled_projections"].tolist() == [[2.0, 3.0]]
    pooled = torch.randn(1, 2)
    assert IMAGINE_MMDIT.conditioning(pooled, 64, 64, context, mask)["pooled_projections"] is pooled
    with pytest.raises(ValueError, match="pooled text or the text states"):
        IMAGINE_MMDIT.conditioning(None, 64, 64)


def test_a_unit_made_for_another_network_is_refused_by_name():
    from imagine.families import IMAGINE_MMDIT

    IMAGINE_MMDIT.check_attachment("controlnet", "control model 'x'", "mmdit")
    with pytest.raises(ValueError, match=r"made for unet models .*the model here is imagine MMDiT"):
        IMAGINE_MMDIT.check_attachment("controlnet", "control model 'x'", "unet")
    with pytest.raises(ValueError, match="made for mmdit models"):
        SD1.check_attachment("controlnet", "control model 'x'", "mmdit")
