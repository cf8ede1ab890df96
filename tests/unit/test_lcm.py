"""Latent consistency models: the boundary condition, the student's start, the guidance input, the loss."""

from __future__ import annotations

import pytest
import torch

from imagine.diffusion import parametrization as P
from imagine.diffusion.denoiser import Denoiser
from imagine.diffusion.schedules import lcm_grid, lcm_sigmas, lcm_timesteps, make_alphas_cumprod
from imagine.models.unet import UNet2DConditionModel, UNetConfig
from imagine.nn.embeddings import guidance_embedding
from imagine.train.lcm import LCMDistillConfig, consistency_loss, student_unet

TINY = dict(sample_size=8, block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=4,
            cross_attention_dim=12, attention_head_dim=2)


def _unet(**over):
    torch.manual_seed(0)
    return UNet2DConditionModel(UNetConfig(**{**TINY, **over})).eval()


def test_boundary_condition_is_exact_whatever_the_network():
    """f(x, 0) = x to the last bit, for any x0 estimate; away from 0 the network's estimate takes over."""
    g = torch.Generator().manual_seed(0)
    x_t, x0 = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) * 100
    assert torch.equal(P.consistency_output(x0, x_t, torch.zeros(3)), x_t)
    c_skip, c_out = P.consistency_scalings(torch.tensor([0.0, 1.0, 19.0, 999.0]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[2] < 1e-5 and abs(float(c_out[2]) - 1) < 1e-5  # at t = 19, x0_hat alone (within 1e-5)
    assert (c_skip[1:] < c_skip[:-1]).all() and (c_out[1:] > c_out[:-1]).all()


def test_consistency_denoiser_at_the_smallest_sigma_returns_its_input():
    """Through the Denoiser (VE in, x0 out): at sigma_min (t = 0) the consistency model returns x_t / c_in."""
    ac = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    net = _unet()
    den = Denoiser(lambda x, t, **c: net(x, t, **c), ac, "v", consistency=True, quantize=True)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma0 = float(((1 - ac[0]) / ac[0]).sqrt())
    ctx = {"encoder_hidden_states": torch.randn(2, 5, 12)}
    with torch.no_grad():
        out = den(x, torch.full((2,), sigma0), ctx)
    torch.testing.assert_close(out, x * (1 + sigma0**2) ** -0.5)


def test_student_starts_as_the_teacher_and_reads_the_guidance_scale():
    teacher = _unet()
    student = student_unet(teacher, 16)
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 12, generator=g)
    w = guidance_embedding(torch.tensor([0.5, 4.0]), 16)
    with torch.no_grad():
        assert torch.equal(student(x, t, ctx, timestep_cond=w), teacher(x, t, ctx))
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.5)
        assert not torch.allclose(student(x, t, ctx, timestep_cond=w), teacher(x, t, ctx))
    with pytest.raises(ValueError, match="pass timestep_cond"):
        student(x, t, ctx)
    with pytest.raises(ValueError, match="without time_cond_proj_dim"):
        teacher(x, t, ctx, timestep_cond=w)
    with pytest.raises(ValueError, match="already embeds"):
        student_unet(student, 16)


def test_guidance_embedding_tells_scales_apart_and_is_smooth():
    e = guidance_embedding(torch.tensor([0.0, 2.0, 2.001, 7.0]), 32)
    assert e.shape == (4, 32)
    assert torch.equal(e[0, :16], torch.zeros(16)) and torch.equal(e[0, 16:], torch.ones(16))
    assert (e[1] - e[2]).abs().max() < (e[1] - e[3]).abs().max()


def test_lcm_grid_and_timesteps():
    assert lcm_grid(1000).tolist() == list(range(19, 1000, 20))
    assert lcm_timesteps(1000, 4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(1000, 1).tolist() == [999]
    sig = lcm_sigmas(make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012), 4)
    assert len(sig) == 5 and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    with pytest.raises(ValueError, match="1 to 50 steps"):
        lcm_timesteps(1000, 51)


def test_pseudo_huber_loss():
    a, b = torch.zeros(10), torch.full((10,), 0.5)
    assert consistency_loss(a, a, "huber", 0.001) == 0
    assert abs(float(consistency_loss(a, b, "huber", 0.001)) - (0.25 + 1e-6) ** 0.5 + 0.001) < 1e-6
    assert float(consistency_loss(a, b, "l2", 0.001)) == pytest.approx(0.25)


def test_config_is_checked():
    with pytest.raises(ValueError, match="cfg_min"):
        LCMDistillConfig(cfg_min=5, cfg_max=2)
    with pytest.raises(ValueError, match="loss"):
        LCMDistillConfig(loss="l1")
