"""Prediction targets, loss weightings and the truncated noise-level draw (engine/diffusion/targets.py, noise.py).

Each target's expected output is written here from its definition (x = x0 + sigma·n), not from c_skip and c_out, so
a wrong preconditioning fails the identity D = x0."""
import math

import pytest
import torch

from engine.diffusion.edm import EDM
from engine.diffusion.noise import draw_sigma, draw_step_noise

SIGMAS = (0.002, 0.05, 0.5, 2.0, 20.0, 80.0)
TARGETS = ("edm", "x0", "eps", "v")


def oracle(target: str, x0: torch.Tensor, n: torch.Tensor, s: float, sd: float) -> torch.Tensor:
    """What a perfect network outputs for `target`, from the definitions in engine/diffusion/targets.py."""
    if target == "x0":
        return x0 / sd
    if target == "eps":
        return n
    if target == "v":  # Salimans & Ho on the data as given: alpha = 1/sqrt(1+s²), sigma_vp = s/sqrt(1+s²)
        return (n - s * x0) / math.sqrt(1 + s**2)
    r = s / sd  # edm: -v of the data scaled to unit variance
    return (r * x0 / sd - n) / math.sqrt(1 + r**2)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4000, generator=g, dtype=torch.float64) * 0.5
    return x0, torch.randn(4000, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("target", TARGETS)
def test_a_perfect_network_gives_the_clean_image_for_every_target(target):
    x0, n = data()
    for sd in (0.5, 0.9):
        edm = EDM(sigma_data=sd, target=target)
        for s in SIGMAS:
            c_skip, c_out, _, _ = edm.precondition(torch.tensor([s], dtype=torch.float64))
            d = c_skip * (x0 + s * n) + c_out * oracle(target, x0, n, s, sd)
            torch.testing.assert_close(d, x0, rtol=0, atol=1e-9 * max(1, s)), (target, s)


def convert(target: str, d: torch.Tensor, x: torch.Tensor, s: float, sd: float) -> torch.Tensor:
    """The output of `target` that means the prediction D (from the definitions: n_hat = (x - D) / sigma)."""
    return oracle(target, d, (x - d) / s, s, sd)


@pytest.mark.parametrize("a", TARGETS)
@pytest.mark.parametrize("b", TARGETS)
def test_targets_agree_when_converted(a, b):
    """Any output of target a, converted into target b's terms, makes b's denoiser give the same D."""
    x0, n = data(1)
    f_a = torch.randn_like(x0)  # an imperfect network
    for s in SIGMAS[1:]:  # sigma > 0.05: the conversion divides by sigma
        sigma = torch.tensor([s], dtype=torch.float64)
        x = x0 + s * n
        ea, eb = EDM(sigma_data=0.5, target=a), EDM(sigma_data=0.5, target=b)
        skip_a, out_a, _, _ = ea.precondition(sigma)
        d_a = skip_a * x + out_a * f_a
        skip_b, out_b, _, _ = eb.precondition(sigma)
        d_b = skip_b * x + out_b * convert(b, d_a, x, s, 0.5)
        torch.testing.assert_close(d_b, d_a, rtol=1e-9, atol=1e-9 * s)


def test_targets_change_only_c_skip_and_c_out():
    sigma = torch.tensor([0.1, 1.0, 10.0])
    ref = EDM().precondition(sigma)
    for target in TARGETS[1:]:
        got = EDM(target=target).precondition(sigma)
        assert torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])  # c_in, c_noise
        assert not torch.allclose(got[1], ref[1])


def test_weightings_are_the_named_losses_of_their_targets():
    """snr weights the x-space error into the eps-MSE, uniform into the (x0/sd)-MSE, edm into the edm target's MSE
    (the unit-variance output), and sqrt_snr is their geometric middle: sqrt(snr · uniform)."""
    x0, n = data(2)
    d = x0 + 0.1 * torch.randn_like(x0)  # some prediction of x0
    for s in SIGMAS:
        sigma = torch.tensor([s], dtype=torch.float64)
        x = x0 + s * n
        w = {k: EDM(weighting=k).loss_weight(sigma) for k in ("edm", "snr", "sqrt_snr", "uniform")}
        err = (d - x0) ** 2
        eps_err = (convert("eps", d, x, s, 0.5) - n) ** 2
        torch.testing.assert_close(w["snr"] * err, eps_err, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(w["uniform"] * err, (convert("x0", d, x, s, 0.5) - x0 / 0.5) ** 2)
        edm_err = (convert("edm", d, x, s, 0.5) - oracle("edm", x0, n, s, 0.5)) ** 2
        torch.testing.assert_close(w["edm"] * err, edm_err, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(w["sqrt_snr"] ** 2, w["snr"] * w["uniform"])


def test_default_edm_is_the_original_arithmetic():
    """target=edm, weighting=edm: the engine's original expressions, bit for bit."""
    sigma = torch.exp(torch.randn(64))
    sd = 0.5
    c_skip, c_out, c_in, c_noise = EDM().precondition(sigma)
    sd2, s2 = sd**2, sigma**2
    assert torch.equal(c_skip, sd2 / (s2 + sd2)) and torch.equal(c_out, sigma * sd / (s2 + sd2).sqrt())
    assert torch.equal(c_in, 1 / (s2 + sd2).sqrt()) and torch.equal(c_noise, sigma.log() / 4)
    assert torch.equal(EDM().loss_weight(sigma), (sigma**2 + sd**2) / (sigma * sd) ** 2)
    # the step's randomness: the original draw order, untouched by the new options
    edm, cpu = EDM(), torch.device("cpu")
    got = draw_step_noise(edm, 5, 9, 6, (3, 8, 8), 16, 0.5, 0.1, cpu)
    from engine.training.seeding import derive_seed
    g = torch.Generator().manual_seed(derive_seed(5, 9, "edm"))
    assert torch.equal(got.sigma, (torch.randn(6, generator=g) * edm.p_std + edm.p_mean).exp())
    assert torch.equal(got.noise, torch.randn(6, 3, 8, 8, generator=g)) and got.stream_noise == ()


@pytest.mark.parametrize("lo,hi", [(2.0, None), (None, 0.3), (0.3, 2.0)])
def test_truncated_sigma_stays_in_its_range_with_the_truncated_log_normal(lo, hi):
    edm = EDM(sigma_range=(lo, hi))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    s = draw_sigma(edm, 50_000, g(), "cpu")
    assert torch.equal(s, draw_sigma(edm, 50_000, g(), "cpu"))  # a pure function of the generator
    assert s.min() >= (lo or 0) and s.max() <= (hi or math.inf)
    # the median of the log-normal truncated to [lo, hi): the point halfway between the bounds' CDFs
    cdf = lambda v, inf: inf if v is None else torch.special.ndtr(torch.tensor((math.log(v) - edm.p_mean) / edm.p_std))
    mid = (cdf(lo, torch.tensor(0.0)) + cdf(hi, torch.tensor(1.0))) / 2
    median = math.exp(edm.p_mean + edm.p_std * torch.special.ndtri(mid).item())
    assert s.log().median().item() == pytest.approx(math.log(median), abs=0.02)


def test_few_log_normal_draws_lie_above_sigma_2():
    """Why a split point must be chosen for this distribution: EDM's pixel log-normal (-1.2, 1.2) puts ~6% of its
    draws above sigma = 2 (SNR 0.25 for data in [-1, 1], the paper's split) and half below ~0.30."""
    s = draw_sigma(EDM(), 200_000, torch.Generator().manual_seed(0), "cpu")
    assert (s > 2).float().mean().item() == pytest.approx(0.057, abs=0.003)
    assert s.median().item() == pytest.approx(math.exp(-1.2), rel=0.02)


def test_the_default_config_builds_the_network_it_always_built():
    """No method key set: the MicroDiT of model.name at data.image_size with the recipe's pixel head, as the loop
    built it before the methods."""
    from pathlib import Path

    from engine.config import load_config
    from engine.training.network import network_config
    from models.sizes import model_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny_32px.yaml")
    d = cfg.data
    assert network_config(cfg) == model_config(cfg.model.name, input_size=d.image_size, in_channels=d.channels,
                                               caption_channels=d.caption_channels, pos_interp_scale=1.0,
                                               init="identity", time_free=False, pixel_head=32)
