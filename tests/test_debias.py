"""Distribution-guided debiasing: the colour knobs of the synthetic set, the feature edit (scale 0 bit-identical,
conditional rows only, batch-size invariant, bounded, moves a batch toward its target), the zero-safe divergences,
targets, and the predictor's weight check."""
import math

import pytest
import torch
from test_synthetic_backgrounds import DEFAULT_FINGERPRINT, fingerprint

from engine.config import ConfigError, load_config
from engine.data.synthetic import COLOURS, SyntheticShapes, parse_colour_weights, synthetic_train_set
from engine.diffusion.edm import EDM
from engine.sampling.attribute_predictor import AttributePredictor
from engine.sampling.distribution_guidance import (
    DistributionGuidance,
    SampleGuidance,
    divergence,
    draw_labels,
    parse_target,
)
from engine.sampling.feature_tap import FeatureTap, layer_names
from engine.sampling.sampler import sample
from models.sizes import build_model, model_config

# ---------------------------------------------------------------- data knobs

def test_default_knobs_leave_the_set_byte_identical():
    assert fingerprint(SyntheticShapes(500, 32, 7, "fixed", None, 0.0)) == DEFAULT_FINGERPRINT
    cfg = load_config(None, ["run.seed=7", "data.num_samples=500"])
    assert fingerprint(synthetic_train_set(cfg)) == DEFAULT_FINGERPRINT


def test_colour_bias_keeps_layouts_and_draws_the_weights():
    w = parse_colour_weights("red=0.8")
    assert w["red"] == 0.8 and all(math.isclose(w[c], 0.04) for c in COLOURS if c != "red")
    plain, biased = SyntheticShapes(3000, 32, 1), SyntheticShapes(3000, 32, 1, colour_weights=w)
    reds = singles = 0
    for i in range(3000):
        a, b = plain.describe(i), biased.describe(i)
        assert [(g["shape"], g["count"], g["boxes"]) for g in a["groups"]] == \
            [(g["shape"], g["count"], g["boxes"]) for g in b["groups"]]
        if len(b["groups"]) == 2:
            assert (b["groups"][0]["colour"], b["groups"][0]["shape"]) != (b["groups"][1]["colour"],
                                                                          b["groups"][1]["shape"])
        else:
            singles += 1
            reds += b["groups"][0]["colour"] == "red"
    assert abs(reds / singles - 0.8) < 4 * math.sqrt(0.16 / singles)  # one-group images: P(red) = 0.8
    assert biased.captions(range(50)) == SyntheticShapes(3000, 32, 1, colour_weights=w).captions(range(50))


def test_caption_colour_dropout_drops_colour_words_only():
    plain, drop = SyntheticShapes(2000, 32, 2), SyntheticShapes(2000, 32, 2, caption_colour_dropout=0.5)
    assert torch.equal(plain.images(range(100)), drop.images(range(100)))  # images unchanged
    free = 0
    for i in range(2000):
        a, b = plain.caption(i), drop.caption(i)
        if a != b:
            free += 1
            assert not any(c in b.split() for c in COLOURS)
            assert b == " ".join(w for w in a.split() if w not in COLOURS)
    assert abs(free / 2000 - 0.5) < 0.05


@pytest.mark.parametrize("override, key", [("data.colour_bias=pink=0.5", "data.colour_bias"),
                                           ("data.colour_bias=red=0.7,blue=0.6", "data.colour_bias"),
                                           ("data.caption_colour_dropout=1.5", "data.caption_colour_dropout")])
def test_bad_colour_knobs_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


# ---------------------------------------------------------------- the edit

def nano(seed=0):
    torch.manual_seed(seed)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8, init="official")).eval()
    with torch.no_grad():  # zero-initialised gates and final layer would hide any feature edit
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


def adp_for(model, seed=0):
    torch.manual_seed(seed)
    return AttributePredictor(model.cfg.dim, len(COLOURS), hidden=32).eval()


def test_scale_zero_reproduces_the_unguided_images_bit_exactly():
    model, edm = nano(), EDM()
    y = torch.randn(4, 5, 8)
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = sample(model, edm, y, None, steps=3, cfg_scale=3.0, noise=noise)
    adp = adp_for(model)
    for name in layer_names(model):
        edit = DistributionGuidance(adp=adp, scale=0.0, cond_rows=4, target=parse_target("uniform"))
        with FeatureTap(model, [name], edit):
            assert torch.equal(sample(model, edm, y, None, steps=3, cfg_scale=3.0, noise=noise), plain)
    edit = DistributionGuidance(adp=adp, scale=5.0, cond_rows=4, target=parse_target("uniform"))
    with FeatureTap(model, ["1"], edit):
        assert not torch.equal(sample(model, edm, y, None, steps=3, cfg_scale=3.0, noise=noise), plain)


def test_edit_touches_only_conditional_rows_and_is_bounded():
    adp = adp_for(nano())
    h, sigma = torch.randn(8, 64, 128), torch.full((8,), 2.0)
    for cls, extra in ((DistributionGuidance, {"target": parse_target("blue=1")}),
                       (SampleGuidance, {"labels": torch.tensor([2, 2, 2, 2])})):
        out = cls(adp=adp, scale=1e6, cond_rows=4, max_ratio=0.3, **extra)(h, sigma)
        assert torch.equal(out[4:], h[4:])  # unconditional rows untouched
        moved = (out[:4] - h[:4]).flatten(1).norm(dim=1)
        assert (moved > 0).all() and (moved <= 0.3 * h[:4].flatten(1).norm(dim=1) * (1 + 1e-5)).all()


def test_edit_is_batch_size_invariant():
    adp = adp_for(nano())
    h, sigma = torch.randn(6, 64, 128), torch.full((6,), 1.0)
    g = dict(adp=adp, scale=2.0, max_ratio=10.0, target=parse_target("red=0.5,blue=0.5"))
    small = DistributionGuidance(cond_rows=6, **g)(h, sigma)
    doubled = DistributionGuidance(cond_rows=12, **g)(torch.cat([h, h]), torch.cat([sigma, sigma]))
    torch.testing.assert_close(doubled[:6], small, rtol=1e-4, atol=1e-5)  # same p, so the same push per sample


def test_window_limits_the_edit():
    adp = adp_for(nano())
    h = torch.randn(4, 64, 128)
    edit = DistributionGuidance(adp=adp, scale=1.0, cond_rows=4, window=(1.0, 10.0), target=parse_target("uniform"))
    assert edit(h, torch.full((4,), 0.5)) is None and edit(h, torch.full((4,), 20.0)) is None
    assert edit(h, torch.full((4,), 5.0)) is not None


def test_a_hand_built_predictor_moves_a_toy_batch_toward_the_target():
    K, D = 3, 16
    adp = AttributePredictor(D, K, hidden=0, sigma_dim=1)
    with torch.no_grad():  # logits = 4 x the first K normalised coordinates; sigma ignored
        adp.net.weight.zero_()
        adp.net.bias.zero_()
        adp.net.weight[:, :K] = 4 * torch.eye(K)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(32, 4, D, generator=g)
    h[:, :, 0] += 1.0  # most samples read as class 0
    target = torch.tensor([0.2, 0.5, 0.3])
    sigma = torch.ones(32)

    def state(x):
        with torch.no_grad():
            p = torch.softmax(adp(x, sigma), 1).mean(0)
        return p, float(divergence(p, target))

    p0, d0 = state(h)
    edit = DistributionGuidance(adp=adp, scale=0.5, cond_rows=32, max_ratio=0.2, target=target)
    for _ in range(40):
        h = edit(h, sigma)
    p1, d1 = state(h)
    assert p0[0] > 0.6 and d1 < 0.1 * d0
    assert (p1 - target).norm() < 0.5 * (p0 - target).norm()


def test_divergences_are_zero_safe_and_zero_at_the_target():
    target = torch.tensor([0.0, 0.5, 0.5, 0.0])
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], requires_grad=True)
    for kind in ("chi2", "kl"):
        loss = divergence(p, target, kind)
        (grad,) = torch.autograd.grad(loss, p)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and loss > 0
        assert float(divergence(target.clone(), target, kind)) == pytest.approx(0.0, abs=1e-7)


def test_targets_and_label_quotas():
    assert torch.allclose(parse_target("uniform"), torch.full((6,), 1 / 6))
    assert parse_target("red=0.5,blue=0.5").tolist() == [0.5, 0, 0.5, 0, 0, 0]
    for bad, why in (("red=0.5,blue=0.4", "sum to"), ("pink=1", "pink"), ("red=x", "not a number")):
        with pytest.raises(ValueError, match=why):
            parse_target(bad)
    labels = draw_labels(parse_target("uniform"), 64, seed=3)
    assert sorted(torch.bincount(labels, minlength=6).tolist()) == [10, 10, 11, 11, 11, 11]
    assert torch.equal(labels, draw_labels(parse_target("uniform"), 64, seed=3))


def test_a_predictor_of_other_weights_is_refused(tmp_path):
    from engine.sampling.debias_predictor import load_predictor, weights_hash

    a, b = nano(0), nano(1)
    adp = adp_for(a)
    torch.save({"state_dict": adp.state_dict(), "spec": adp.spec(), "weights_hash": weights_hash(a)},
               tmp_path / "p.pt")
    assert load_predictor(tmp_path / "p.pt", a)[0] is not None
    with pytest.raises(ConfigError, match="trained on other weights"):
        load_predictor(tmp_path / "p.pt", b)


@pytest.mark.parametrize("args, why", [
    (["--target", "red=0.7"], "--target"), (["--target", "pink=1"], "--target"), (["--method", "x"], "--method"),
    (["--window", "5"], "--window"), (["--scale", "-1"], "--scale")])
def test_sample_cli_bad_input_is_one_config_error(tmp_path, args, why):
    from engine import debias

    with pytest.raises(ConfigError, match=why):
        debias.main(["sample", "--run", str(tmp_path), "--prompt", "a circle", *args])
