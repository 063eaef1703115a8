"""EDM pieces: preconditioning, loss on kept patches only, and step randomness as a pure function of (seed, step)."""
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


def test_preconditioning_matches_edm_formulas():
    edm = EDM(sigma_data=0.9)
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.precondition(sigma)
    torch.testing.assert_close(c_skip, 0.81 / (sigma**2 + 0.81))
    torch.testing.assert_close(c_out, sigma * 0.9 / (sigma**2 + 0.81).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 0.81).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # unit-variance training target: weight * c_out^2 == 1
    torch.testing.assert_close(edm.loss_weight(sigma) * c_out**2, torch.ones(3, dtype=torch.float64))


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


def test_denoiser_is_exact_as_sigma_goes_to_zero():
    model, edm = nano(), EDM()
    x = torch.randn(2, 3, 32, 32)
    y, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    d = edm.denoise(model, x, torch.full((2,), 1e-6), y, mask)
    torch.testing.assert_close(d, x, atol=1e-5, rtol=0)
