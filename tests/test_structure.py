"""SADM's pieces on fixed batches: the affinity matrix, the structural distance and its noise gate, the structure
discriminator, the sign of the discriminator's step, the generator term's effect on the denoiser's step, the config
section's checks."""
import json

import pytest
import torch

from engine.config import ConfigError, OptimConfig, SadmConfig, load_config
from engine.data.batch import Batch
from engine.diffusion.edm import EDM
from engine.diffusion.noise import draw_step_noise
from engine.diffusion.structure import KERNELS, affinity, pair_mask, structure_distance, structure_loss
from engine.training.ema import make_ema
from engine.training.optim import build_optimizer
from engine.training.parallel import parallelize
from engine.training.sadm import Sadm
from engine.training.step import StepCounters, train_step
from models.sizes import build_model, model_config
from models.structure_disc import StructureDiscriminator


def unit(b=6, w=16, seed=0):
    return torch.nn.functional.normalize(torch.randn(b, w, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_affinity_is_symmetric_and_largest_on_the_diagonal(kernel):
    s = affinity(unit(), kernel)
    assert torch.equal(s, s.T)
    assert (s.diagonal()[:, None] >= s - 1e-6).all()  # a sample is at least as close to itself as to any other
    assert torch.allclose(s.diagonal(), torch.ones(6))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_distance_is_zero_for_equal_batches_and_positive_otherwise(kernel, distance):
    torch.manual_seed(0)
    disc = StructureDiscriminator(48, 64, width=16)
    real = torch.randn(6, 32, 48)
    keep = torch.rand(6, 64).argsort(dim=1)[:, :32].sort(dim=1).values  # (B, K): each sample its own patches
    sigma = torch.full((6,), 0.5)
    args = (keep, sigma, kernel, distance, 1.0)
    assert structure_loss(disc, real, real.clone(), *args).item() == 0.0
    assert structure_loss(disc, real, real + 0.3 * torch.randn_like(real), *args).item() > 0


def test_noise_gate_drops_the_pairs_of_noisy_samples():
    sigma = torch.tensor([0.1, 0.5, 2.0, 0.3])
    m = pair_mask(sigma, 1.0)
    assert m.diagonal().sum() == 0 and m[2].sum() == 0 and m[:, 2].sum() == 0
    assert m.sum() == 3 * 2  # ordered pairs among the three quiet samples
    assert pair_mask(sigma, 0.0).sum() == 4 * 3  # 0 = no gate
    s_real, s_fake = affinity(unit(4), "cosine"), affinity(unit(4, seed=1), "cosine")
    only_noisy = s_real.clone()
    only_noisy[2, :], only_noisy[:, 2] = 5.0, 5.0  # differences in gated pairs only
    assert structure_distance(s_real, only_noisy, m, "l1") == 0
    assert structure_distance(s_real, only_noisy, pair_mask(sigma, 0.0), "l1") > 0
    assert structure_distance(s_real, s_fake, m, "l1") > 0
    assert structure_distance(s_real, s_fake, pair_mask(torch.full((4,), 3.0), 1.0), "l2") == 0  # no pair: 0


def test_discriminator_gives_unit_vectors_independent_of_patch_order():
    torch.manual_seed(0)
    disc = StructureDiscriminator(48, 64, width=32).eval()
    x = torch.randn(3, 20, 48)
    keep = torch.rand(3, 64).argsort(dim=1)[:, :20]
    perm = torch.randperm(20)
    e = disc(x, keep)
    assert e.shape == (3, 32) and torch.allclose(e.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(disc(x[:, perm], keep[:, perm]), e)  # a set of patches, not a sequence
    assert not torch.allclose(disc(x, (keep + 1) % 64), e)  # but where each patch sits matters


def sadm(**kw):
    cfg = SadmConfig(enabled=True, **{"disc_lr": 1e-2, "disc_width": 32, "sigma_max": 0.0, **kw})
    return Sadm(cfg, patch_channels=48, num_patches=64, device=torch.device("cpu"), seed=0)


def test_a_discriminator_step_increases_the_distance_on_a_fixed_batch():
    s = sadm()
    torch.manual_seed(1)
    real = torch.randn(8, 32, 48)
    fake = real + 0.5 * torch.randn_like(real)
    keep = torch.rand(8, 64).argsort(dim=1)[:, :32].sort(dim=1).values
    sigma = torch.full((8,), 0.5)
    before = s._loss(real, fake, keep, sigma).item()
    for _ in range(3):
        s.generator_term(0, fake, real, keep, sigma, accum=1)  # keeps the batch for the discriminator's step
        s.discriminator_step(0, torch.tensor(True))
    assert s._loss(real, fake, keep, sigma).item() > before
    assert s.disc_grad_norm > 0


def test_a_skipped_step_leaves_the_discriminator_alone():
    s = sadm()
    real = torch.randn(4, 32, 48)
    before = [p.clone() for p in s.disc.parameters()]
    s.generator_term(0, real + 1, real, torch.arange(32).expand(4, 32), torch.ones(4), accum=1)
    s.discriminator_step(0, torch.tensor(False))  # the denoiser's step was not finite
    assert all(torch.equal(a, b) for a, b in zip(before, s.disc.parameters()))


def parts(dist_env):
    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
    ema = parallelize(make_ema(model), dist_env.device, torch.float32)
    model = parallelize(model, dist_env.device, torch.float32)
    return model, ema, build_optimizer(model, OptimConfig(lr=1e-2))


def trajectory(dist_env, aux, steps=3):
    """Model weights after `steps` steps of two micro-batches each (masked, as the tiny default)."""
    model, ema, opt = parts(dist_env)
    counters, edm = StepCounters(dist_env.device), EDM()
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        noise = draw_step_noise(edm, 0, step, 8, (3, 32, 32), 64, 0.5, 0.1, torch.device("cpu"))
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 5, 8, generator=g)
        batches = [(Batch(x[lo:lo + 4], y[lo:lo + 4], None), lo, lo + 4) for lo in (0, 4)]
        train_step(model, ema, opt, edm, noise, batches, 1.0, 0.9, counters, sadm=aux, step=step)
    return [p.full_tensor().clone() for p in model.parameters()]


def test_weight_zero_with_the_discriminator_training_is_the_baseline_trajectory(dist_env):
    base = trajectory(dist_env, None)
    zero = sadm(weight=0.0)
    disc_before = [p.clone() for p in zero.disc.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(trajectory(dist_env, zero), base))  # bit-identical
    assert zero.loss_sum > 0 and any(not torch.equal(a, b) for a, b in zip(disc_before, zero.disc.parameters()))
    moved = trajectory(dist_env, sadm(weight=1.0))  # the extra gradient, and only it, changes the denoiser
    assert any(not torch.equal(a, b) for a, b in zip(moved, base))
    late = sadm(weight=1.0, start_step=3)  # before start_step only the discriminator trains
    assert all(torch.equal(a, b) for a, b in zip(trajectory(dist_env, late), base)) and late.loss_sum == 0


@pytest.mark.parametrize("override, key", [
    ("sadm.weight=-1", "sadm.weight"), ("sadm.kernel=rbf", "sadm.kernel"), ("sadm.distance=kl", "sadm.distance"),
    ("sadm.disc_lr=0", "sadm.disc_lr"), ("sadm.disc_width=0", "sadm.disc_width"),
    ("sadm.sigma_max=-0.5", "sadm.sigma_max"), ("sadm.start_step=-1", "sadm.start_step"),
    ("sadm.disc_every=0", "sadm.disc_every"), ("sadm.enabled=1", "sadm.enabled"),
])
def test_bad_sadm_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=rf"^config: {key}"):
        load_config(None, [override])


def test_sadm_refuses_settings_it_cannot_work_with():
    with pytest.raises(ConfigError, match="sadm.enabled=True needs train.micro_batch >= 2"):
        load_config(None, ["sadm.enabled=true", "train.micro_batch=1", "train.global_batch=4"])
    with pytest.raises(ConfigError, match="sadm.enabled=True needs diffusion.objective=edm"):
        load_config(None, ["sadm.enabled=true", "diffusion.objective=init_step"])
    load_config(None, ["train.micro_batch=1", "train.global_batch=4", "diffusion.objective=init_step"])  # off: fine


def test_independent_structure_gap_sees_structure_not_position():
    import numpy as np

    from engine.eval.structure_gap import pdist_w1, struct_attr

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    moved = ref @ q + 3.0  # rotated and shifted: every pairwise distance kept
    assert struct_attr(moved, ref) < 1e-9 and pdist_w1(moved, ref) < 1e-9
    shuffled = ref[rng.permutation(64)]  # the same distances, between the wrong pairs
    assert pdist_w1(shuffled, ref) < 1e-9 and struct_attr(shuffled, ref) > 0.2
    gaps = [struct_attr(ref + s * rng.normal(size=ref.shape), ref) for s in (0.1, 0.5, 2.0)]
    assert gaps == sorted(gaps) and gaps[0] > 0
    collapsed = ref * 0.3  # a mode-collapsed set: distances shrink
    assert pdist_w1(collapsed, ref) > 0.5


def test_compare_reports_the_structure_gap_difference(tmp_path):
    import numpy as np

    from engine.eval.compare import compare_pair, load_evaluation

    def evaluation(folder, features, reference):  # eval.json and the feature arrays, as engine/evaluate.py writes
        folder.mkdir()
        (folder / "eval.json").write_text(json.dumps({
            "num_images": len(features), "image_size": [32, 32], "prompts": {"sha256": "p"}, "noise": {"seed": 0},
            "metrics": {"fd_attr": {"extractor": "x"}}, "sampler": {"nfe": 3}}))
        np.save(folder / "features_attr.npy", features)
        np.save(folder / "reference_attr.npy", reference)
        return folder

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(120, 8))
    a = evaluation(tmp_path / "a", ref + rng.normal(size=ref.shape), ref)
    b = evaluation(tmp_path / "b", ref + 0.3 * rng.normal(size=ref.shape), ref)
    d = compare_pair(load_evaluation(a), load_evaluation(b))
    for m in ("struct_attr", "pdist_w1"):
        assert d[m]["diff"] < 0 and d[m]["ci"][1] < 0, (m, d[m])  # B's structure is closer to the reference's
