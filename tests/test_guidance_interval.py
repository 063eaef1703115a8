"""Guidance in a limited interval (sample.cfg_sigma_min / cfg_sigma_max): inside it the guided denoiser is the
classifier-free one, outside it the conditional branch alone at half the batch; the default interval changes nothing;
the sampler, the cascade's low model, the flags and eval.json's record all carry it; impossible intervals are named."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from engine.config import Config, load_config
from engine.diffusion.edm import EDM
from engine.sampling.plan import make_plan
from engine.sampling.sampler import Sampler, guidance_interval, guided_denoiser, sample
from engine.sampling.settings import SamplerSettings, SamplerSettingsError, add_parallel_args, add_sampler_args
from engine.sampling.solvers import heun
from test_cascade import low_estimate_of, make_run, nano, settings_of


@torch.no_grad()
def test_inside_the_interval_guided_outside_conditional_only_at_half_the_batch():
    model, edm, sizes = nano(16, 0), EDM(), []
    model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))  # each call's batch
    y, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    everywhere = guided_denoiser(model, edm, y, mask, 3.0)
    conditional = guided_denoiser(model, edm, y, mask, 1.0)
    limited = guided_denoiser(model, edm, y, mask, 3.0, (0.5, 5.0))
    for sigma, inside in [(0.3, False), (0.5, False), (0.51, True), (5.0, True), (5.01, False), (40.0, False)]:
        sizes.clear()
        got = limited(x, sigma)
        assert sizes == [4 if inside else 2], sigma
        want = (everywhere if inside else conditional)(x, sigma)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got - (conditional if inside else everywhere)(x, sigma)).abs().max() > 1e-4  # the two differ


def test_interval_of_a_config_and_its_default():
    assert guidance_interval(Config().sample) == (0.0, float("inf"))
    cfg = Config()
    cfg.sample.cfg_sigma_min, cfg.sample.cfg_sigma_max = 0.3, 5.0
    assert guidance_interval(cfg.sample) == (0.3, 5.0)


@torch.no_grad()
def test_sampling_with_an_interval_is_heun_on_the_piecewise_denoiser():
    model, edm = nano(16, 1), EDM()
    y, mask = torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    default = settings_of(steps=6, cfg_scale=3.0)
    base = sample(model, edm, y, mask, sampler=Sampler(default, make_plan(default)), noise=noise)
    wide = settings_of(steps=6, cfg_scale=3.0, cfg_sigma_min=0.0, cfg_sigma_max=1000.0)
    assert torch.equal(sample(model, edm, y, mask, sampler=Sampler(wide, make_plan(wide)), noise=noise), base)
    limited = settings_of(steps=6, cfg_scale=3.0, cfg_sigma_min=0.3, cfg_sigma_max=8.0)
    plan = make_plan(limited)
    assert any(s <= 0.3 for s in plan.sigmas[:-1]) and any(s > 8 for s in plan.sigmas)  # both sides are used
    out = sample(model, edm, y, mask, sampler=Sampler(limited, plan), noise=noise)
    guided, conditional = guided_denoiser(model, edm, y, mask, 3.0), guided_denoiser(model, edm, y, mask, 1.0)
    piecewise = lambda x, s: (guided if 0.3 < s <= 8.0 else conditional)(x, s)
    want = heun(piecewise, noise.double() * plan.sigmas[0], plan.sigmas).float()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_the_cascade_low_model_keeps_the_interval(tmp_path):
    low_run = make_run(tmp_path / "low", image_size=16)
    y, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    everywhere, sampler = low_estimate_of(low_run, noise, y, mask)
    limited, _ = low_estimate_of(low_run, noise, y, mask, cfg_sigma_max=0.5)  # the low model stops at 1: never guides
    conditional = guided_denoiser(sampler.start.model, EDM(), y, mask, 1.0)
    plan = sampler.start.plan
    n_low = torch.nn.functional.avg_pool2d(noise.double(), 2) * 2
    x0 = conditional(heun(conditional, n_low * plan.sigmas[0], plan.sigmas), plan.sigmas[-1])
    torch.testing.assert_close(limited, torch.nn.functional.interpolate(x0, scale_factor=2, mode="nearest"))
    assert (limited - everywhere).abs().max() > 1e-4


@pytest.mark.parametrize("overrides, message", [
    (["sample.cfg_sigma_min=-1"], "sample.cfg_sigma_min=-1.0 must be >= 0"),
    (["sample.cfg_sigma_min=2", "sample.cfg_sigma_max=1"], "sample.cfg_sigma_max=1.0 must be > sample.cfg_sigma_min=2"),
    (["sample.cfg_sigma_max=5", "sample.parallel=patch"], "sample.parallel='patch' must be 'none' with a guidance"),
])
def test_impossible_intervals_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", overrides)


def test_flags_set_the_interval_and_eval_records_it():
    parser = argparse.ArgumentParser()
    add_sampler_args(parser)
    cfg = Config().validate()
    s = SamplerSettings.from_args(parser.parse_args(["--cfg-sigma-min", "0.3", "--cfg-sigma-max", "5.4"]), cfg)
    assert guidance_interval(s.sample) == (0.3, 5.4)
    assert s.record()["cfg_sigma_min"] == 0.3 and s.record()["cfg_sigma_max"] == 5.4
    assert "cfg_sigma_max" not in SamplerSettings.from_config(cfg).record()  # the default records as before
    with pytest.raises(SamplerSettingsError, match=r"--cfg-sigma-max \(sample.cfg_sigma_max\)"):
        SamplerSettings.from_args(parser.parse_args(["--cfg-sigma-min", "1", "--cfg-sigma-max", "0.5"]), cfg)
    add_parallel_args(parser)  # the refusal names both flags that were given
    with pytest.raises(SamplerSettingsError, match=r"given: --cfg-sigma-max \(sample.cfg_sigma_max\), --parallel"):
        SamplerSettings.from_args(parser.parse_args(["--cfg-sigma-max", "5", "--parallel", "patch"]), cfg)
