"""EDM's stochastic sampling (sample.s_churn, s_tmin, s_tmax, s_noise): the one-step solvers equal Algorithm 2 of
Karras et al. (2022) written out plainly; each image's fresh noise is fixed by its own start noise (batch-invariant,
paired); levels outside [s_tmin, s_tmax] stay deterministic; the cascade's low model takes it too; the flags set the
keys, eval.json records them, and impossible settings are named."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from engine.config import Config, load_config
from engine.diffusion.edm import EDM
from engine.sampling.image_noise import ImageNoise, image_seed
from engine.sampling.plan import make_plan
from engine.sampling.sampler import build_sampler, churn_of, sample
from engine.sampling.settings import SamplerSettings, SamplerSettingsError, add_parallel_args, add_sampler_args
from engine.sampling.solvers import Churn, euler, heun
from test_cascade import low_estimate_of, make_run, nano, settings_of

SIGMAS = [80.0, 20.0, 5.0, 1.2, 0.3, 0.05, 0.0]


def gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact denoiser of data ~ N(0, 0.5^2): a smooth, non-trivial D for the solvers."""
    return x * 0.25 / (0.25 + sigma ** 2)


def algorithm_2(x, sigmas, draws, s_churn, s_tmin, s_tmax, s_noise, second_order=True):
    """Karras et al. 2022, Algorithm 2, line by line; draws[i]: the unit noise of step i."""
    n = len(sigmas) - 1
    for i, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t <= s_tmax else 0.0
        t_hat = t + gamma * t
        x_hat = x + math.sqrt(t_hat ** 2 - t ** 2) * s_noise * draws[i]
        d = (x_hat - gaussian_denoiser(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d
        if second_order and t_next != 0:
            d_next = (x_next - gaussian_denoiser(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


class Draws:
    """The noise callable of a Churn, handing out pre-drawn tensors in order and remembering which it gave."""

    def __init__(self, draws):
        self.draws, self.used = draws, 0

    def __call__(self, x):
        self.used += 1
        return self.draws[self.used - 1]


@pytest.mark.parametrize("solver, second_order", [(heun, True), (euler, False)])
@pytest.mark.parametrize("s_churn, s_tmin, s_tmax, s_noise", [(3.0, 0.0, math.inf, 1.0), (40.0, 0.05, 20.0, 1.007)])
def test_one_step_solvers_with_churn_are_edm_algorithm_2(solver, second_order, s_churn, s_tmin, s_tmax, s_noise):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) * SIGMAS[0]
    draws = [torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in SIGMAS[:-1]]
    churned = [s_tmin <= s <= s_tmax for s in SIGMAS[:-1]]
    gamma = min(s_churn / (len(SIGMAS) - 1), math.sqrt(2) - 1)
    noise = Draws([d for d, c in zip(draws, churned) if c])  # a level outside the range draws nothing
    got = solver(gaussian_denoiser, x, SIGMAS, churn=Churn(gamma, s_tmin, s_tmax, s_noise, noise))
    want = algorithm_2(x, SIGMAS, [d if c else 0 * d for d, c in zip(draws, churned)], s_churn, s_tmin, s_tmax,
                       s_noise, second_order)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert noise.used == sum(churned)
    assert (got - solver(gaussian_denoiser, x, SIGMAS)).abs().max() > 1e-3  # the churn changed the result


def test_gamma_is_capped_and_unset_churn_is_none():
    settings = settings_of(steps=6)
    plan = make_plan(settings)
    assert churn_of(settings.sample, plan) is None and build_sampler(settings).churn is None
    cfg = Config().sample
    cfg.s_churn, cfg.s_tmin, cfg.s_tmax, cfg.s_noise = 1.2, 0.05, None, 1.003
    churn = churn_of(cfg, plan)
    assert churn.gamma == pytest.approx(1.2 / (len(plan.sigmas) - 1)) and churn.s_tmax == math.inf
    assert (churn.s_tmin, churn.s_noise) == (0.05, 1.003)
    cfg.s_churn = 1000.0
    assert churn_of(cfg, plan).gamma == pytest.approx(math.sqrt(2) - 1)  # a level at most doubles its variance


def test_image_noise_is_fixed_by_each_images_start_noise():
    start = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    together = ImageNoise(start, b"churn")
    first, second = together(start), together(start)
    alone = ImageNoise(start[1:2], b"churn")
    torch.testing.assert_close(alone(start[1:2]), first[1:2], rtol=0, atol=0)  # batch-invariant
    torch.testing.assert_close(alone(start[1:2]), second[1:2], rtol=0, atol=0)  # and a stream, call by call
    assert (first - second).abs().min() > 0 and (first[0] - first[1]).abs().max() > 0.5
    assert abs(float(first.std()) - 1) < 0.1 and abs(float(first.mean())) < 0.1
    assert image_seed(start[0]) != image_seed(start[0], b"churn")  # keyed streams differ from the cascade's restart
    with pytest.raises(ValueError, match="noise for 2 images asked of a stream made for 3"):
        together(start[:2])


@torch.no_grad()
def test_a_model_sampled_with_churn_stays_paired_and_deterministic_outside_the_range():
    model, edm = nano(16, 1), EDM()
    y, mask = torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))

    def draw(idx=slice(None), **churn):
        s = settings_of(steps=6, cfg_scale=3.0, **churn)
        sampler = build_sampler(s)
        return sample(model, edm, y[idx], mask[idx], sampler=sampler, noise=noise[idx]), sampler

    base, _ = draw()
    churned, sampler = draw(s_churn=2.0, s_tmin=0.5, s_tmax=30.0)
    assert sampler.churn is not None and sampler.last_nfe == 11  # the same evaluations
    assert (churned - base).abs().max() > 1e-3
    torch.testing.assert_close(draw(slice(1, 2), s_churn=2.0, s_tmin=0.5, s_tmax=30.0)[0], churned[1:2],
                               rtol=1e-5, atol=1e-6)  # an image's result does not depend on its batch
    assert torch.equal(draw(s_churn=2.0, s_tmin=0.5, s_tmax=30.0)[0], churned)  # paired: the same noise, the same
    assert torch.equal(draw(s_churn=2.0, s_tmin=100.0)[0], base)  # no level in range: the deterministic images


@torch.no_grad()
def test_the_cascade_low_model_is_stochastic_too(tmp_path):
    low_run = make_run(tmp_path / "low", image_size=16)
    y, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    plain, _ = low_estimate_of(low_run, noise, y, mask)
    churned, sampler = low_estimate_of(low_run, noise, y, mask, s_churn=2.0)
    assert sampler.start.churn is sampler.churn  # the two parts share one gamma, from the whole schedule
    assert sampler.churn.gamma == pytest.approx(2.0 / 8)
    assert (churned - plain).abs().max() > 1e-4
    torch.testing.assert_close(low_estimate_of(low_run, noise, y, mask, s_churn=2.0)[0], churned, rtol=0, atol=0)


@pytest.mark.parametrize("overrides, message", [
    (["sample.s_churn=-1"], "sample.s_churn=-1.0 must be >= 0"),
    (["sample.s_churn=5", "sample.solver=dpmpp"], "sample.s_churn=5.0 needs sample.solver heun or euler"),
    (["sample.s_tmin=2", "sample.s_tmax=1"], "sample.s_tmax=1.0 must be > sample.s_tmin=2"),
    (["sample.s_noise=0"], "sample.s_noise=0.0 must be > 0"),
    (["sample.s_churn=5", "sample.parallel=patch"], "sample.parallel='patch' must be 'none' with stochastic"),
])
def test_impossible_stochastic_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", overrides)


def test_flags_set_stochastic_sampling_and_eval_records_it():
    parser = argparse.ArgumentParser()
    add_sampler_args(parser)
    cfg = Config().validate()
    s = SamplerSettings.from_args(parser.parse_args(["--s-churn", "10", "--s-tmin", "0.05", "--s-tmax", "50",
                                                     "--s-noise", "1.003"]), cfg)
    assert (s.sample.s_churn, s.sample.s_tmin, s.sample.s_tmax, s.sample.s_noise) == (10.0, 0.05, 50.0, 1.003)
    assert {k: s.record()[k] for k in ("s_churn", "s_tmin", "s_tmax", "s_noise")} == {
        "s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    assert "s_churn" not in SamplerSettings.from_config(cfg).record()  # the default records as before
    with pytest.raises(SamplerSettingsError, match=r"given: --solver \(sample.solver\), --s-churn \(sample.s_churn\)"):
        SamplerSettings.from_args(parser.parse_args(["--s-churn", "1", "--solver", "unipc"]), cfg)
    add_parallel_args(parser)
    with pytest.raises(SamplerSettingsError, match=r"--parallel"):
        SamplerSettings.from_args(parser.parse_args(["--s-churn", "1", "--parallel", "cfg_split"]), cfg)


def test_the_held_out_first_stage_keeps_the_churn_of_the_whole_schedule():
    from engine.eval.evaluation import held_out_sampler
    from engine.eval.protocol import PromptSet

    cfg = Config().validate()
    prompts = PromptSet("synthetic", ["a red circle"] * 2, None, 1000000, None)
    settings = settings_of(init="cascade", cascade_run="unused", steps=8, s_churn=2.0)
    sampler = held_out_sampler(settings, cfg, prompts, 16, torch.device("cpu"))
    assert sampler.churn == churn_of(settings.sample, make_plan(settings))  # gamma from all 8 steps, not the part
    assert len(sampler.plan.sigmas) < len(make_plan(settings).sigmas)
    assert held_out_sampler(settings_of(init="cascade", cascade_run="unused", steps=8), cfg, prompts, 16,
                            torch.device("cpu")).churn is None
