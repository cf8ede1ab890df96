"""LoRA files for the transformer families in the layouts people download: kohya's and ComfyUI's Flux files in
Black Forest Labs' original names (fused Q/K/V, a single-stream block's Q/K/V/MLP fused in linear1) and
diffusers/PEFT files (``transformer.*``) for Flux and SD3. Oracles: diffusers' ``load_lora_weights`` on the same
tiny pipelines, and for the single-stream blocks (whose converter in diffusers assumes Flux's full widths) the
definition of the fused layer itself."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")

from imagine.adapters.lora import LoraUse
from imagine.models.flux import pack_latents
from imagine.pipelines import generate as g
from imagine.pipelines.request import load_text_model
from tests.tiny_sd import write_flux, write_sd3

TOL = 1e-4
PROMPT = "a red circle above a blue square"
D, R = 32, 4  # the tiny Flux's width; the LoRAs' rank


def _pair(g0, base: str, out_dim: int, in_dim: int, alpha: float | None = 2.0, style: str = "kohya") -> dict:
    down, up = torch.randn(R, in_dim, generator=g0) * 0.3, torch.randn(out_dim, R, generator=g0) * 0.3
    if style == "peft":
        return {f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up}
    out = {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}
    if alpha is not None:
        out[f"{base}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-lora")
    pipe = write_flux(root / "pipe", dev=True)
    model, encoder = load_text_model(root / "pipe")
    return root, pipe, model, encoder


def _ours(model, encoder, path, settings):
    detach = LoraUse.attach([LoraUse(path.stem, path, 1.0, "option")], model, encoder)
    try:
        return g.txt2img(model, settings, encoder)
    finally:
        detach()


def _theirs(pipe, path, steps=3):
    pipe.load_lora_weights(str(path))
    try:
        noise = torch.randn((16, 8, 8), generator=torch.Generator().manual_seed(3))[None]
        out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=3.5, latents=pack_latents(noise), height=16,
                   width=16, output_type="np").images
    finally:
        pipe.unload_lora_weights()
    return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1


def _block_inputs() -> tuple[torch.Tensor, dict]:
    """Latents and the text, pooled and guidance inputs of one call of the tiny Flux transformer."""
    gen = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 8, 8, generator=gen), torch.randn(1, 6, 64, generator=gen)
    return x, dict(encoder_hidden_states=text, pooled_projections=torch.randn(1, 32, generator=gen),
                   guidance=torch.tensor([3.5]))


SETTINGS = g.Settings(prompt=PROMPT, steps=3, sampler="euler", cfg_scale=1.0, distilled_cfg_scale=3.5, seed=3,
                      width=16, height=16)


@pytest.mark.parametrize("style", ["kohya", "peft"])
def test_flux_loras_match_diffusers(flux, style):
    """kohya's lora_unet_double_blocks_* (fused Q/K/V split into three LoRAs) and PEFT's transformer.* give
    diffusers' image; the LoRA moves the image well past the tolerance."""
    root, pipe, model, encoder = flux
    g0 = torch.Generator().manual_seed(0)
    if style == "kohya":
        w = {**_pair(g0, "lora_unet_double_blocks_0_img_attn_qkv", 3 * D, D),
             **_pair(g0, "lora_unet_double_blocks_0_txt_attn_proj", D, D),
             **_pair(g0, "lora_unet_double_blocks_0_img_mlp_0", 4 * D, D, alpha=8.0)}
    else:
        w = {**_pair(g0, "transformer.transformer_blocks.0.attn.to_q", D, D, style="peft"),
             **_pair(g0, "transformer.single_transformer_blocks.0.proj_mlp", 4 * D, D, style="peft"),
             **_pair(g0, "transformer.single_transformer_blocks.0.attn.to_v", D, D, style="peft")}
    path = root / f"{style}.safetensors"
    save_file(w, path)
    ours, plain = _ours(model, encoder, path, SETTINGS), g.txt2img(model, SETTINGS, encoder)
    ref = _theirs(pipe, path)
    assert (ours - plain).abs().max() > 10 * TOL
    assert (ours - ref).abs().max().item() <= TOL


def test_flux_single_block_and_comfyui_names_follow_the_fused_layout(flux):
    """A LoRA on linear1 (Q, K, V and the MLP's input fused, in that order) and linear2, in kohya's and in
    ComfyUI's names: the same as adding the update to the fused weights and splitting them as BFL's layout
    defines; the final adaLN's LoRA lands with its shift and scale halves in diffusers' order."""
    root, _, model, encoder = flux
    g0 = torch.Generator().manual_seed(1)
    mlp = 4 * D
    kohya = {**_pair(g0, "lora_unet_single_blocks_0_linear1", 3 * D + mlp, D),
             **_pair(g0, "lora_unet_single_blocks_0_linear2", D, D + mlp),
             **_pair(g0, "lora_unet_final_layer_adaLN_modulation_1", 2 * D, D)}
    save_file(kohya, root / "single.safetensors")
    comfy = {k.replace("lora_unet_single_blocks_0_linear", "diffusion_model.single_blocks.0.linear")
             .replace("lora_unet_final_layer_adaLN_modulation_1", "diffusion_model.final_layer.adaLN_modulation.1")
             .replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
             for k, v in kohya.items() if not k.endswith(".alpha")}
    save_file(comfy, root / "comfy.safetensors")
    net = model.unet
    want = copy.deepcopy(net)
    block = want.single_transformer_blocks[0]
    with torch.no_grad():
        def delta(base):
            return (2.0 / R) * kohya[f"{base}.lora_up.weight"] @ kohya[f"{base}.lora_down.weight"]

        fused = torch.cat([block.attn.to_q.weight, block.attn.to_k.weight, block.attn.to_v.weight,
                           block.proj_mlp.weight]) + delta("lora_unet_single_blocks_0_linear1")
        q, k, v, m = fused.split([D, D, D, mlp])
        block.attn.to_q.weight.copy_(q), block.attn.to_k.weight.copy_(k), block.attn.to_v.weight.copy_(v)
        block.proj_mlp.weight.copy_(m)
        block.proj_out.weight += delta("lora_unet_single_blocks_0_linear2")
        shift, scale = delta("lora_unet_final_layer_adaLN_modulation_1").chunk(2)  # BFL: shift first
        want.norm_out.linear.weight += torch.cat([scale, shift])
    x, inputs = _block_inputs()
    with torch.no_grad():
        expected = want(x, torch.tensor([500.0]), **inputs)
    detach = LoraUse.attach([LoraUse("single", root / "single.safetensors", 1.0, "option")], model, encoder)
    try:
        with torch.no_grad():
            got = net(x, torch.tensor([500.0]), **inputs)
    finally:
        detach()
    assert (got - expected).abs().max() < 1e-5
    # ComfyUI's names, whose files carry no alpha (the scale is 1), equal kohya's file with alpha = rank
    save_file({k: (torch.tensor(float(R)) if k.endswith(".alpha") else v) for k, v in kohya.items()},
              root / "kohya-rank.safetensors")
    outs = []
    for name in ("comfy", "kohya-rank"):
        detach = LoraUse.attach([LoraUse(name, root / f"{name}.safetensors", 1.0, "option")], model, encoder)
        try:
            with torch.no_grad():
                outs.append(net(x, torch.tensor([500.0]), **inputs))
        finally:
            detach()
    assert torch.equal(outs[0], outs[1]) and (outs[0] - expected).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_lycoris_kinds_on_flux_fused_layers(flux, kind):
    """A LoHa or DoRA in kohya's Flux names on linear1 (Q, K, V and the MLP input fused) and on the final adaLN
    (halves swapped): the same as the kind's update of the fused original weight (DoRA reads that weight: its
    magnitude is per fused row), split as BFL's layout defines."""
    from imagine.nn.lora import WeightDelta

    root, _, model, encoder = flux
    g0 = torch.Generator().manual_seed(5)
    mlp = 4 * D
    files, updates = {}, {}
    for base, out_dim in (("lora_unet_single_blocks_0_linear1", 3 * D + mlp),
                          ("lora_unet_final_layer_adaLN_modulation_1", 2 * D)):
        if kind == "loha":
            t = {"hada_w1_a": torch.randn(out_dim, 2, generator=g0) * 0.3, "hada_w1_b": torch.randn(2, D, generator=g0),
                 "hada_w2_a": torch.randn(out_dim, 2, generator=g0) * 0.3, "hada_w2_b": torch.randn(2, D, generator=g0)}
            names = t
        else:
            t = {"lora_down": torch.randn(2, D, generator=g0) * 0.3, "lora_up": torch.randn(out_dim, 2, generator=g0),
                 "dora_scale": 1 + torch.rand(out_dim, 1, generator=g0)}
            names = {"lora_down.weight": t["lora_down"], "lora_up.weight": t["lora_up"], "dora_scale": t["dora_scale"]}
        files.update({f"{base}.{k}": v for k, v in names.items()})
        files[f"{base}.alpha"] = torch.tensor(2.0)
        updates[base] = WeightDelta(kind, t, 2.0)
    save_file(files, root / f"{kind}-fused.safetensors")
    want = copy.deepcopy(model.unet)
    block = want.single_transformer_blocks[0]
    with torch.no_grad():
        fused = torch.cat([block.attn.to_q.weight, block.attn.to_k.weight, block.attn.to_v.weight,
                           block.proj_mlp.weight])
        q, k, v, m = (fused + updates["lora_unet_single_blocks_0_linear1"].delta_weight(fused)).split([D, D, D, mlp])
        block.attn.to_q.weight.copy_(q), block.attn.to_k.weight.copy_(k), block.attn.to_v.weight.copy_(v)
        block.proj_mlp.weight.copy_(m)
        scale, shift = want.norm_out.linear.weight.chunk(2)  # ours: scale first; BFL's: shift first
        original = torch.cat([shift, scale])
        turned = original + updates["lora_unet_final_layer_adaLN_modulation_1"].delta_weight(original)
        new_shift, new_scale = turned.chunk(2)
        want.norm_out.linear.weight.copy_(torch.cat([new_scale, new_shift]))
    x, inputs = _block_inputs()
    with torch.no_grad():
        expected = want(x, torch.tensor([500.0]), **inputs)
        plain = model.unet(x, torch.tensor([500.0]), **inputs)
    detach = LoraUse.attach([LoraUse(kind, root / f"{kind}-fused.safetensors", 1.0, "option")], model, encoder)
    try:
        with torch.no_grad():
            got = model.unet(x, torch.tensor([500.0]), **inputs)
    finally:
        detach()
    assert (got - expected).abs().max() < 1e-5 and (got - plain).abs().max() > 1e-3


def test_sd3_peft_lora_matches_diffusers(tmp_path):
    pipe = write_sd3(tmp_path / "pipe")
    model, encoder = load_text_model(tmp_path / "pipe")
    g0 = torch.Generator().manual_seed(3)
    w = {**_pair(g0, "transformer.transformer_blocks.0.attn.to_q", 32, 32, style="peft"),
         **_pair(g0, "transformer.transformer_blocks.1.ff.net.0.proj", 128, 32, style="peft")}
    save_file(w, tmp_path / "sd3.safetensors")
    s = g.Settings(prompt=PROMPT, steps=3, sampler="euler", cfg_scale=4.0, seed=3, width=16, height=16)
    ours = _ours(model, encoder, tmp_path / "sd3.safetensors", s)
    pipe.load_lora_weights(str(tmp_path / "sd3.safetensors"))
    noise = torch.randn((16, 8, 8), generator=torch.Generator().manual_seed(3))[None]
    ref = pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, latents=noise, height=16, width=16,
               output_type="np").images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 2 - 1
    assert (ours - g.txt2img(model, s, encoder)).abs().max() > 10 * TOL
    assert (ours - ref).abs().max().item() <= TOL
