"""EDM pieces: preconditioning, loss on kept patches only, and step randomness as a pure function of (seed, step)."""
import math

import pytest
import torch

from engine.diffusion.edm import EDM
from engine.diffusion.noise import draw_step_noise
from engine.sampling.sampler import karras_sigmas
from models.sizes import build_model, model_config


def nano():
    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


def test_preconditioning_gives_unit_variance_inputs_and_targets():
    """EDM's defining properties (Karras et al. 2022, appendix B.6), checked on samples rather than by restating
    the formulas: for data of std sigma_data, the network input c_in·(x + σn) and its training target
    (x - c_skip·(x + σn)) / c_out have unit variance at every σ, and the loss weight undoes c_out² (λ·c_out² = 1)."""
    edm = EDM(sigma_data=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, generator=g, dtype=torch.float64) * edm.sigma_data
    n = torch.randn(400_000, generator=g, dtype=torch.float64)
    for s in (0.002, 0.1, 0.9, 5.0, 80.0):
        sigma = torch.tensor([s], dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = edm.precondition(sigma)
        noisy = x + s * n
        assert abs((c_in * noisy).std().item() - 1) < 0.01, s
        assert abs(((x - c_skip * noisy) / c_out).std().item() - 1) < 0.01, s
        torch.testing.assert_close(edm.loss_weight(sigma) * c_out**2, torch.ones(1, dtype=torch.float64))
        assert c_noise.item() == pytest.approx(math.log(s) / 4)  # a convention (EDM's Table 1), not derived


def test_loss_is_the_weighted_error_on_kept_patches_only():
    model, edm = nano(), EDM()
    noise = draw_step_noise(edm, 0, 0, 2, (3, 32, 32), 64, 0.75, 0.0, torch.device("cpu"))
    assert noise.keep_idx.shape == (2, 16)
    x0, y, mask = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    sigma = noise.sigma
    denoised = edm.denoise_tokens(model, x0 + noise.noise * sigma.view(-1, 1, 1, 1), sigma, y, mask, noise.keep_idx)
    assert denoised.shape == (2, 16, model.cfg.patch_channels)
    target = torch.stack([model.patchify(x0)[b, noise.keep_idx[b]] for b in range(2)])  # kept patches, by hand
    expected = (edm.loss_weight(sigma).view(-1, 1, 1) * (denoised - target) ** 2).mean()
    torch.testing.assert_close(edm.loss(model, x0, y, mask, noise), expected)


def test_step_noise_is_a_pure_function_of_seed_and_step():
    edm, cpu = EDM(), torch.device("cpu")
    a = draw_step_noise(edm, 3, 7, 8, (3, 8, 8), 16, 0.5, 0.1, cpu)
    b = draw_step_noise(edm, 3, 7, 8, (3, 8, 8), 16, 0.5, 0.1, cpu)
    c = draw_step_noise(edm, 3, 8, 8, (3, 8, 8), 16, 0.5, 0.1, cpu)
    for x, y in [(a.sigma, b.sigma), (a.noise, b.noise), (a.keep_idx, b.keep_idx), (a.drop_caption, b.drop_caption)]:
        assert torch.equal(x, y)
    assert not torch.equal(a.noise, c.noise)
    # each sample keeps exactly K distinct, sorted tokens
    assert a.keep_idx.shape == (8, 8)
    assert all(row.unique().numel() == 8 and torch.equal(row, row.sort().values) for row in a.keep_idx)
    s = a.slice(2, 5)
    assert torch.equal(s.noise, a.noise[2:5]) and torch.equal(s.keep_idx, a.keep_idx[2:5])


def test_no_mask_means_no_gather():
    noise = draw_step_noise(EDM(), 0, 0, 2, (3, 8, 8), 16, 0.0, 0.0, torch.device("cpu"))
    assert noise.keep_idx is None


def test_karras_schedule_runs_from_sigma_max_to_zero():
    s = karras_sigmas(EDM(), 10)
    assert s.shape == (11,) and s[0] == 80.0 and s[-1] == 0 and abs(s[-2] - 0.002) < 1e-9
    assert torch.all(s[1:] < s[:-1])


def test_denoiser_tends_to_the_input_plus_sigma_times_the_network_output():
    """As σ → 0, D(x; σ) = x + σ·F(x / sigma_data, ln σ / 4) + O(σ²): the skip connection carries x and the network's
    output enters with weight σ. A network made to output large values (|F| ~ 100) makes the test bite: a denoiser
    that dropped F, scaled it wrongly or kept a constant c_out would miss by orders of magnitude."""
    model, edm = nano(), EDM()
    with torch.no_grad():
        model.final_layer.linear.weight.mul_(1000)
    x = torch.randn(2, 3, 32, 32)
    y, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    for s in (1e-3, 1e-4):
        sigma = torch.full((2,), s)
        f = model.unpatchify(model(x / edm.sigma_data, sigma.log() / 4, y, mask))  # F at σ's noise level
        assert f.abs().max() > 50
        d = edm.denoise(model, x, sigma, y, mask)
        torch.testing.assert_close((d - x) / s, f, rtol=2e-2, atol=2e-2 * f.abs().max().item())
