"""The nested (Matryoshka) model and its diffusion: identity at init, token merge geometry, the schedule shift in
training and sampling, fresh noise per stream, progressive loading, FLOPs of both streams."""
import math
from pathlib import Path

import pytest
import torch

from engine.diffusion.edm import EDM
from engine.diffusion.nested import shifts
from engine.diffusion.noise import draw_step_noise
from engine.training.checkpoint import Checkpointer, load_model_weights
from models.flops import forward_flops_per_image, tokens_per_image
from models.microdit import patchify, unpatchify
from models.nested import NestedConfig
from models.sizes import build_network, model_config, outer_config

CAPTION = 8


def inner_cfg(**kw):
    return model_config("MicroDiT_Nano_4", input_size=16, in_channels=3, caption_channels=CAPTION, **kw)


def nested_cfg(**kw):
    return NestedConfig(inner_cfg(**kw), outer_config("Outer_Nano_4", input_size=32, in_channels=3))


def perturbed(model, seed=0):
    """Weights no longer at their (partly zero) init: a 'trained' model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def caption(b=2):
    g = torch.Generator().manual_seed(7)
    return torch.randn(b, 5, CAPTION, generator=g), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:b]


def test_at_init_the_low_resolution_output_is_the_inner_models_exactly():
    torch.manual_seed(0)
    inner = perturbed(build_network(inner_cfg()))
    nested = build_network(nested_cfg())
    nested.inner.load_state_dict(inner.state_dict())
    y, mask = caption()
    x_lo, x_hi, c_noise = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32), torch.randn(2)
    lo, hi = nested([x_lo, x_hi], c_noise, y, mask)
    assert torch.equal(lo, inner(x_lo, c_noise, y, mask))
    assert hi.shape == (2, 64, 48) and torch.equal(hi, torch.zeros_like(hi))  # the outer final layer starts at zero
    # once the adapters are not zero, the high stream feeds the low one (the test above could fail)
    with torch.no_grad():
        nested.down.weight.normal_(0, 0.1)
    assert not torch.equal(nested([x_lo, x_hi], c_noise, y, mask)[0], lo)


def test_token_merge_groups_the_outer_tokens_over_each_inner_token():
    """Inner token j covers pixels of the low-resolution image; merge_tokens must gather exactly the outer tokens over
    the same part of the high-resolution image, in order, and split_tokens must undo it."""
    nested = build_network(nested_cfg())
    # a high-resolution "image" whose pixel holds its own low-resolution token index (16 px / 4 -> 4x4 inner grid)
    lo_index = torch.arange(16.0).view(1, 1, 4, 4)
    img = lo_index.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # (1, 1, 32, 32)
    outer_tokens = patchify(img, 4)  # (1, 64, 16): every value of an outer patch is its inner token's index
    merged = nested.merge_tokens(outer_tokens)  # (1, 16, 4·16)
    assert torch.equal(merged, torch.arange(16.0).view(1, 16, 1).expand(1, 16, 64))
    h = torch.randn(2, 64, 96)
    assert torch.equal(nested.split_tokens(nested.merge_tokens(h)), h)


def test_schedule_shift_is_sigma_times_the_resolution_ratio_to_the_half_power():
    assert shifts(EDM(resolutions=(16, 32), schedule_shift_power=1.0)) == [1.0, pytest.approx(math.sqrt(2))]
    assert shifts(EDM(resolutions=(16, 32), schedule_shift_power=2.0)) == [1.0, 2.0]
    assert shifts(EDM(resolutions=(8, 32), schedule_shift_power=2.0)) == [1.0, 4.0]
    assert shifts(EDM(resolutions=(16, 32), schedule_shift_power=0.0)) == [1.0, 1.0]


class PerfectNested:
    """A stand-in nested network that outputs the exact targets of both streams (edm target, patch 4), given the
    clean image: it reads sigma from c_noise and applies the shift written out here, not the library's. The loss is
    zero only if training noised, pooled and preconditioned each stream as that formula says."""

    def __init__(self, x0, power, keep_idx=None):
        self.x0, self.power, self.keep_idx = x0, power, keep_idx
        self.cfg = type("C", (), {"in_channels": 3})()
        self.gather_fn = lambda t, idx: torch.stack([t[b, idx[b]] for b in range(t.shape[0])])

    def patchify(self, x, r):
        return patchify(x, 4)

    def unpatchify(self, t, r):
        return unpatchify(t, 4, 3)

    def __call__(self, xs, c_noise, y, y_mask, keep_idx):
        sigma, out = (4 * c_noise).exp().view(-1, 1, 1, 1), []
        for i, x_in in enumerate(xs):
            size = x_in.shape[-1]
            s = sigma * (size / 16) ** (self.power / 2)
            x0 = self.x0.view(-1, 3, size, 32 // size, size, 32 // size).mean(dim=(3, 5))  # pooled by hand
            sd2 = 0.25
            x = x_in * (s**2 + sd2).sqrt()  # undo c_in
            f = (x0 - sd2 / (s**2 + sd2) * x) / (s * 0.5 / (s**2 + sd2).sqrt())
            tokens = patchify(f, 4)
            out.append(self.gather_fn(tokens, keep_idx) if keep_idx is not None and i == 1 else tokens)
        return out


@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("mask", [0.0, 0.5])
def test_a_perfect_network_has_zero_multiresolution_loss(power, mask):
    edm = EDM(resolutions=(16, 32), schedule_shift_power=power, resolution_loss_weights=(1.0, 2.0))
    x0 = torch.randn(4, 3, 32, 32) * 0.5
    noise = draw_step_noise(edm, 0, 3, 4, (3, 32, 32), 64, mask, 0.0, torch.device("cpu"), ((3, 16, 16),))
    loss = edm.loss(PerfectNested(x0, power), x0, None, None, noise)
    assert loss.item() < 1e-8
    wrong = EDM(resolutions=(16, 32), schedule_shift_power=power + 1)  # the network expects another shift
    assert edm.loss(PerfectNested(x0, power + 1), x0, None, None, noise).item() > 1e-3
    assert wrong.loss(PerfectNested(x0, power + 1), x0, None, None, noise).item() < 1e-8


def test_each_resolution_gets_fresh_noise_and_the_other_draws_stay_those_of_one_stream():
    edm, cpu = EDM(resolutions=(16, 32)), torch.device("cpu")
    one = draw_step_noise(edm, 1, 2, 4, (3, 32, 32), 64, 0.5, 0.1, cpu)
    two = draw_step_noise(edm, 1, 2, 4, (3, 32, 32), 64, 0.5, 0.1, cpu, ((3, 16, 16),))
    for a, b in [(one.sigma, two.sigma), (one.noise, two.noise), (one.keep_idx, two.keep_idx),
                 (one.drop_caption, two.drop_caption)]:
        assert torch.equal(a, b)
    low = two.stream_noise[0]
    assert low.shape == (4, 3, 16, 16)
    pooled = torch.nn.functional.avg_pool2d(two.noise, 2) * 2  # pooled noise rescaled to unit variance
    assert abs(torch.corrcoef(torch.stack([low.flatten(), pooled.flatten()]))[0, 1]) < 0.1
    assert torch.equal(two.slice(1, 3).stream_noise[0], low[1:3])


class GaussianNested:
    """Streams of a Gaussian data set N(0, s²) per pixel: the optimal denoiser at noise level t is s²/(s² + t²)·x,
    output here as the edm target F with the shift written out. Probability-flow sampling from sigma_max then ends
    exactly at x_r(start) · s / sqrt(s² + t_max²) for each stream, whatever the stream's shift."""

    s = 0.5

    def __init__(self, power):
        self.power, self.cfg = power, type("C", (), {"in_channels": 3, "input_size": 32})()

    def patchify(self, x, r):
        return patchify(x, 4)

    def unpatchify(self, t, r):
        return unpatchify(t, 4, 3)

    def __call__(self, xs, c_noise, y, y_mask, keep_idx=None):
        sigma, out = (4 * c_noise.double()).exp().view(-1, 1, 1, 1), []
        for x_in in xs:
            t = sigma * (x_in.shape[-1] / 16) ** (self.power / 2)
            x = x_in.double() * (t**2 + 0.25).sqrt()
            d = self.s**2 / (self.s**2 + t**2) * x
            f = (d - 0.25 / (t**2 + 0.25) * x) / (t * 0.5 / (t**2 + 0.25).sqrt())
            out.append(patchify(f, 4))
        return out


def test_joint_sampling_moves_each_stream_on_its_own_shifted_noise_level():
    from engine.sampling.sampler import sample

    edm = EDM(resolutions=(16, 32), schedule_shift_power=2.0, sigma_max=10.0)
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 32, 32, generator=g)]
    out = sample(GaussianNested(2.0), edm, torch.zeros(2, 1, 1), None, steps=200, noise=noise)
    k_hi = 2.0  # (32 / 16)^(2 / 2)
    s, t_max = GaussianNested.s, k_hi * edm.sigma_max
    expected = noise[1] * t_max * s / math.sqrt(s**2 + t_max**2)  # the high stream started at k·sigma_max
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


def test_nested_sampling_with_a_real_model_gives_finite_high_resolution_images():
    from engine.sampling.sampler import sample

    torch.manual_seed(0)
    model = perturbed(build_network(nested_cfg())).eval()
    y, mask = caption()
    images = sample(model, EDM(resolutions=(16, 32)), y, mask, steps=3, cfg_scale=2.0,
                    generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_progressive_load_puts_a_low_resolution_checkpoint_into_the_inner_model(tmp_path):
    torch.manual_seed(0)
    low, low_ema = perturbed(build_network(inner_cfg()), 1), perturbed(build_network(inner_cfg()), 2)
    path = Checkpointer(tmp_path / "low").save(5, model=low, ema=low_ema)
    nested, nested_ema = build_network(nested_cfg()), build_network(nested_cfg())
    outer_before = {k: v.clone() for k, v in nested.state_dict().items() if not k.startswith("inner.")}
    load_model_weights(path, nested, nested_ema, prefix="inner.")
    for k, v in low.state_dict().items():
        assert torch.equal(nested.state_dict()["inner." + k], v), k
    for k, v in low_ema.state_dict().items():
        assert torch.equal(nested_ema.state_dict()["inner." + k], v), k
    assert all(torch.equal(nested.state_dict()[k], v) for k, v in outer_before.items())
    y, mask = caption()
    x_lo = torch.randn(2, 3, 16, 16)
    assert torch.equal(nested([x_lo, torch.randn(2, 3, 32, 32)], torch.zeros(2), y, mask)[0],
                       low(x_lo, torch.zeros(2), y, mask))
    # from_ema: the EMA into both
    load_model_weights(path, nested, nested_ema, from_ema=True, prefix="inner.")
    assert torch.equal(nested.inner.final_layer.linear.weight, low_ema.final_layer.linear.weight)


def test_progressive_load_of_a_wrong_file_is_an_error_naming_the_keys(tmp_path):
    torch.manual_seed(0)
    other = build_network(inner_cfg(patch_size=8))  # another patch size: other shapes
    path = Checkpointer(tmp_path / "p8").save(1, model=other)
    with pytest.raises(ValueError, match=r"wrong shape \['final_layer.linear.bias"):
        load_model_weights(path, build_network(nested_cfg()), prefix="inner.")
    nested_ckpt = Checkpointer(tmp_path / "nested").save(1, model=build_network(nested_cfg()))
    with pytest.raises(ValueError, match=r"missing \[.*unexpected \['down.bias'"):
        load_model_weights(nested_ckpt, build_network(nested_cfg()), prefix="inner.")
    with pytest.raises(ValueError, match="no parameters under the prefix 'outer.'"):
        load_model_weights(nested_ckpt, build_network(nested_cfg()), prefix="outer.")


def test_flops_count_both_streams():
    nested, inner = nested_cfg(), inner_cfg()
    f_nested, f_inner = forward_flops_per_image(nested, 16), forward_flops_per_image(inner, 16)
    oc, k2 = nested.outer, nested.merge**2
    # matrix products the outer stream must add at least: both adapters and the outer final layer
    least = 2 * (2 * inner.num_patches * k2 * oc.dim * inner.dim) + 2 * nested.num_patches * oc.dim * oc.patch_channels
    assert f_nested - f_inner >= least
    masked = forward_flops_per_image(nested, 16, 0.5)
    assert f_inner < masked < f_nested  # masking thins the last outer blocks only
    assert tokens_per_image(nested, 0.5) == 32 + 16 and tokens_per_image(inner, 0.5) == 8


class NullEncoder:
    def encode(self, captions):
        return torch.zeros(len(captions), 4, 384), torch.ones(len(captions), 4, dtype=torch.bool)


@pytest.mark.parametrize("nested", [False, True])
def test_heldout_denoising_loss_of_a_silent_network_is_the_skip_connections_error(nested):
    """A network whose output is zero denoises to D = c_skip · x: the held-out MSE must be exactly that error on the
    held-out images with their fixed noise (pooled and shifted for a nested model's highest stream)."""
    from engine.config import load_config
    from engine.data.synthetic import SyntheticShapes
    from engine.eval.denoising import heldout_denoising_loss, unit_noise
    from engine.eval.protocol import HELD_OUT_SEED
    from engine.training.network import build_run_network

    keys = ["diffusion.resolutions=[16, 32]", "model.outer=Outer_Nano_4", "model.pixel_head=0"] if nested else []
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny_32px.yaml", keys)
    model = build_run_network(cfg, {})  # a fresh model: its final layers are zero, so F = 0
    edm = EDM.from_config(cfg.diffusion)
    res = heldout_denoising_loss(model, edm, cfg, NullEncoder(), num_images=6, num_sigmas=3, batch_size=4)
    x0 = SyntheticShapes(6, 32, HELD_OUT_SEED).images(range(6))
    k = math.sqrt(2) if nested else 1.0  # the high stream's shift at power 1
    for j, s in enumerate(res["sigmas"]):
        n = torch.stack([unit_noise(0, i, j, 32, 3) for i in range(6)])
        c_skip = 0.25 / ((k * s) ** 2 + 0.25)
        expected = ((c_skip * (x0 + k * s * n) - x0) ** 2).flatten(1).mean(1).mean().item()
        assert res["mse"][j]["mean"] == pytest.approx(expected, rel=1e-5), s
