"""LyCORIS's LoHa, LoKr, full diffs and OFT, DoRA, and PEFT's OFT and IA3, read from the layouts people download
and applied as their authors define them. Oracle: peft, which implements LoHa, LoKr, DoRA, OFT and IA3: the same
tensors applied by peft and by imagine (attached, and merged) give the same outputs within 1e-5. The LyCORIS
(kohya-style) layout is the same tensors under lora_unet_* names with their alpha; kohya's and LyCORIS's OFT are
held to their definition, as is LyCORIS's butterfly OFT; other adapter kinds (VeRA) are refused by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from imagine.adapters.lora import attach, merge
from imagine.io.checkpoint import CheckpointError
from imagine.io.lora_keys import load_lora

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 96)
        self.conv = nn.Conv2d(16, 24, 3, padding=1)

    def forward(self, x, image):
        return self.lin(x), self.conv(image)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 64, generator=g), torch.randn(2, 16, 8, 8, generator=g)


def _peft_model(config, seed=0):
    torch.manual_seed(seed)
    base = Tiny()
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # every adapter tensor random (some start at zero), the magnitude included
        for name, p in model.named_parameters():
            if any(t in name for t in ("hada", "lokr", "lora_", "magnitude", "ia3_l", "oft_R", "boft_")):
                one = any(t in name for t in ("magnitude", "ia3_l", "boft_s"))
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if one else 0.0))
    return base, model


def _check(tmp_path, config, kohya_names: bool, alpha: float, modules=("lin", "conv")):
    base, model = _peft_model(config)
    state = peft.get_peft_model_state_dict(model)
    x, image = _inputs()
    with torch.no_grad():
        want = model(x, image)
    if kohya_names:  # LyCORIS's layout: lora_unet_<module>.<tensor> and the module's alpha
        out = {}
        for key, value in state.items():
            module, _, tensor = key.removeprefix("base_model.model.").partition(".")
            tensor = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                      "lora_magnitude_vector": "dora_scale"}.get(tensor, tensor)
            out[f"lora_unet_{module}.{tensor}"] = value
        for module in modules:
            out[f"lora_unet_{module}.alpha"] = torch.tensor(alpha)
        name = "adapter.safetensors"
    else:  # PEFT's save_pretrained: adapter_model.safetensors and alpha and r in adapter_config.json beside it
        out, name = dict(state), "adapter_model.safetensors"
        config_dict = config.to_dict()
        (tmp_path / "adapter_config.json").write_text(json.dumps(
            {k: sorted(v) if isinstance(v, set) else v for k, v in config_dict.items()
             if isinstance(v, (int, float, str, bool, list, set))}))
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp_path / name))
    lora = load_lora(tmp_path / name, {"unet": base})
    handle = attach({"unet": base}, [(lora, 1.0)])
    with torch.no_grad():
        got = base(x, image)
    handle.detach()
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() < 1e-5
    merge({"unet": base}, [(lora, 1.0)])
    with torch.no_grad():
        merged = base(x, image)
    for a, b in zip(merged, want, strict=True):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("kohya_names", [False, True])
def test_loha_matches_peft(tmp_path, kohya_names):
    _check(tmp_path, peft.LoHaConfig(r=4, alpha=2.0, target_modules=["lin", "conv"]), kohya_names, 2.0)


@pytest.mark.parametrize("kohya_names", [False, True])
def test_lokr_matches_peft(tmp_path, kohya_names):
    """w2 is a low-rank pair at these widths, so LyCORIS's scale (alpha / r) is peft's."""
    config = peft.LoKrConfig(r=4, alpha=2.0, target_modules=["lin"])
    _, model = _peft_model(config)
    assert any("lokr_w2_a" in k for k in peft.get_peft_model_state_dict(model))
    _check(tmp_path, config, kohya_names, 2.0, modules=("lin",))


def test_dora_matches_peft(tmp_path):
    """PEFT's DoRA (lora_magnitude_vector, alpha = r: the scale a PEFT file carries), and the same tensors in
    LyCORIS's names (dora_scale per output row)."""
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["lin"], use_dora=True)
    _check(tmp_path, config, False, 4.0, modules=("lin",))
    _check(tmp_path, config, True, 4.0, modules=("lin",))


@pytest.mark.parametrize("feedforward", [["conv"], ["lin"]])
def test_ia3_matches_peft(tmp_path, feedforward):
    """PEFT's IA3: a layer's output scaled per feature (its bias too), or a feed-forward layer's input; which one
    read from adapter_config.json's feedforward_modules, and from the scale's shape without it."""
    config = peft.IA3Config(target_modules=["lin", "conv"], feedforward_modules=feedforward)
    _check(tmp_path, config, False, 1.0)
    (tmp_path / "adapter_config.json").unlink()
    _check(tmp_path, config, False, 1.0)


@pytest.mark.parametrize("neumann", [True, False])
def test_peft_oft_matches_peft(tmp_path, neumann):
    """PEFT's OFT: the input features in blocks of 8 turned by the Cayley rotation of a skew-symmetric matrix
    (exactly, or by PEFT's default Neumann series of 5 terms), attached and merged."""
    config = peft.OFTConfig(r=0, oft_block_size=8, target_modules=["lin"], use_cayley_neumann=neumann)
    _check(tmp_path, config, False, 1.0, modules=("lin",))


@pytest.mark.parametrize("factors", [1, 2, 3])
def test_peft_boft_matches_peft(tmp_path, factors):
    """PEFT's BOFT: the input features turned by butterfly factors of block-diagonal Cayley rotations (1 factor:
    plain blocks), the rows scaled by boft_s, attached and merged."""
    config = peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=factors, target_modules=["lin"])
    _check(tmp_path, config, False, 1.0, modules=("lin",))


def test_lycoris_butterfly_oft_pairs_rows_level_by_level(tmp_path):
    """LyCORIS's BOFT (oft_diag of shape (levels, blocks, 2, 2)): at level i each rotation turns a pair of output
    rows 2^i apart within groups of 2^(i+1), written out here row pair by row pair; rescale after."""
    torch.manual_seed(6)
    base = Tiny()
    g = torch.Generator().manual_seed(7)
    levels, out = 3, 96
    angles = torch.randn(levels, out // 2, generator=g)
    rotations = torch.stack([torch.stack([torch.stack([a.cos(), -a.sin()]), torch.stack([a.sin(), a.cos()])])
                             for a in angles.flatten()]).reshape(levels, out // 2, 2, 2)
    rescale = 1 + 0.1 * torch.randn(out, 1, generator=g)
    save_file({"lora_unet_lin.oft_diag": rotations, "lora_unet_lin.rescale": rescale},
              str(tmp_path / "boft.safetensors"))
    want = base.lin.weight.detach().clone()
    for i in range(levels):
        k = 2 ** i
        for c in range(out // (2 * k)):
            for kk in range(k):
                a, b = c * 2 * k + kk, c * 2 * k + k + kk
                want[[a, b]] = rotations[i, c * k + kk] @ want[[a, b]]
    want = want * rescale
    lora = load_lora(tmp_path / "boft.safetensors", {"unet": base})
    merge({"unet": base}, [(lora, 1.0)])
    assert (base.lin.weight - want).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["lycoris", "kohya", "oft_diag"])
def test_oft_blocks_turn_the_output_rows(tmp_path, layout):
    """kohya's and LyCORIS's OFT (Qiu et al. 2023): W' = R^T W with R block-diagonal, each block the Cayley
    transform (I + Q)(I - Q)^-1 of Q = B - B^T, Q's norm clamped to alpha (LyCORIS) or alpha x out (kohya's
    networks.oft); LyCORIS's older oft_diag holds R itself; rescale multiplies the rows after."""
    torch.manual_seed(3)
    base = Tiny()
    g = torch.Generator().manual_seed(4)
    blocks = torch.randn(4, 24, 24, generator=g) * 0.05
    rescale = 1 + 0.1 * torch.randn(96, 1, generator=g)
    alpha = 0.5
    q = blocks - blocks.transpose(1, 2)
    limit = alpha * 96 if layout == "kohya" else alpha
    q = q * min(1.0, limit / float(q.norm()))
    eye = torch.eye(24)
    rotations = torch.stack([(eye + qi) @ torch.linalg.inv(eye - qi) for qi in q])
    if layout == "oft_diag":
        tensors, meta = {"lora_unet_lin.oft_diag": rotations}, {}
    else:
        tensors = {"lora_unet_lin.oft_blocks": blocks, "lora_unet_lin.alpha": torch.tensor(alpha)}
        meta = {"ss_network_module": "networks.oft"} if layout == "kohya" else {}
    tensors["lora_unet_lin.rescale"] = rescale
    save_file(tensors, str(tmp_path / "oft.safetensors"), meta)
    turned = rescale * (torch.block_diag(*rotations).T @ base.lin.weight)
    x, image = _inputs()
    with torch.no_grad():
        want = nn.functional.linear(x, turned, base.lin.bias)
    lora = load_lora(tmp_path / "oft.safetensors", {"unet": base})
    handle = attach({"unet": base}, [(lora, 1.0)])
    with torch.no_grad():
        got = base(x, image)[0]
    handle.detach()
    assert (got - want).abs().max() < 1e-4
    merge({"unet": base}, [(lora, 1.0)])
    assert (base.lin.weight - turned).abs().max() < 1e-5


def test_full_diff_and_refusals(tmp_path):
    torch.manual_seed(1)
    base = Tiny()
    diff, diff_b = torch.randn(96, 64) * 0.1, torch.randn(96) * 0.1
    save_file({"lora_unet_lin.diff": diff, "lora_unet_lin.diff_b": diff_b}, str(tmp_path / "full.safetensors"))
    x, image = _inputs()
    with torch.no_grad():
        want = nn.functional.linear(x, base.lin.weight + diff, base.lin.bias + diff_b)
    handle = attach({"unet": base}, [(load_lora(tmp_path / "full.safetensors", {"unet": base}), 1.0)])
    with torch.no_grad():
        got = base(x, image)[0]
    handle.detach()
    assert (got - want).abs().max() < 1e-5
    save_file({"lora_unet_lin.vera_lambda_b": torch.zeros(96)}, str(tmp_path / "vera.safetensors"))
    with pytest.raises(CheckpointError, match="VeRA"):
        load_lora(tmp_path / "vera.safetensors", {"unet": base})
    save_file({"lora_unet_lin.hada_w1_a": torch.zeros(50, 4), "lora_unet_lin.hada_w1_b": torch.zeros(4, 64),
               "lora_unet_lin.hada_w2_a": torch.zeros(50, 4), "lora_unet_lin.hada_w2_b": torch.zeros(4, 64)},
              str(tmp_path / "misfit.safetensors"))
    lora = load_lora(tmp_path / "misfit.safetensors", {"unet": base})
    with pytest.raises(CheckpointError, match="do not fit"):
        attach({"unet": base}, [(lora, 1.0)])



def test_locon_tucker_form_is_the_cp_rebuild(tmp_path):
    """LoCon's lora_mid (a 3x3 core between 1x1 down and up convolutions): dW[i, j] = sum mid[n, m] up[i, n]
    down[m, j] x alpha / r, added to the convolution (A1111's rebuild_cp_decomposition)."""
    torch.manual_seed(2)
    base = Tiny()
    g = torch.Generator().manual_seed(3)
    up, down, mid = (torch.randn(24, 4, 1, 1, generator=g), torch.randn(4, 16, 1, 1, generator=g),
                     torch.randn(4, 4, 3, 3, generator=g))
    save_file({"lora_unet_conv.lora_up.weight": up, "lora_unet_conv.lora_down.weight": down,
               "lora_unet_conv.lora_mid.weight": mid, "lora_unet_conv.alpha": torch.tensor(2.0)},
              str(tmp_path / "tucker.safetensors"))
    delta = torch.zeros(24, 16, 3, 3)
    for i in range(24):
        for j in range(16):
            delta[i, j] = sum(mid[n, m] * up[i, n, 0, 0] * down[m, j, 0, 0] for n in range(4) for m in range(4))
    x, image = _inputs()
    with torch.no_grad():
        want = nn.functional.conv2d(image, base.conv.weight + delta * 0.5, base.conv.bias, padding=1)
    handle = attach({"unet": base}, [(load_lora(tmp_path / "tucker.safetensors", {"unet": base}), 1.0)])
    with torch.no_grad():
        got = base(x, image)[1]
    handle.detach()
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("on_input", [False, True])
def test_lycoris_ia3_learns_the_change(tmp_path, on_input):
    """LyCORIS's (IA)^3: a per-feature w under the module's plain "weight" key with an on_input flag; the layer
    becomes W (1 + w), by rows or (on_input) by columns, the bias untouched (A1111's reading)."""
    torch.manual_seed(5)
    base = Tiny()
    w = 0.1 * torch.randn(64 if on_input else 96)
    save_file({"lora_unet_lin.weight": w, "lora_unet_lin.on_input": torch.tensor(on_input)},
              str(tmp_path / "ia3.safetensors"))
    scaled = base.lin.weight * (1 + (w[None, :] if on_input else w[:, None]))
    x, image = _inputs()
    with torch.no_grad():
        want = nn.functional.linear(x, scaled, base.lin.bias)
    handle = attach({"unet": base}, [(load_lora(tmp_path / "ia3.safetensors", {"unet": base}), 1.0)])
    with torch.no_grad():
        got = base(x, image)[0]
    handle.detach()
    assert (got - want).abs().max() < 1e-5
