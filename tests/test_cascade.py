"""The two-resolution cascade (sample.init=cascade): how it splits the schedule, its fresh noise, that its parts join
(the low model's layout reaches the image), pairing across batches, the run checks, and evaluate.py end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import Config, save_config
from engine.diffusion.edm import EDM
from engine.sampling.cascade import CascadeStart, load_cascade, restart_noise, split_plan
from engine.sampling.plan import make_plan
from engine.sampling.sampler import Sampler, build_sampler, guided_denoiser, sample
from engine.sampling.settings import SamplerSettings, SamplerSettingsError
from engine.sampling.solvers import heun
from engine.training.checkpoint import Checkpointer
from engine.training.network import build_run_network
from models.sizes import build_model, model_config


def settings_of(**sample) -> SamplerSettings:
    cfg = Config()
    for k, v in sample.items():
        setattr(cfg.sample, k, v)
    return SamplerSettings.from_config(cfg.validate())


def test_split_plan_gives_the_schedule_top_to_the_low_model_and_the_rest_to_the_run():
    s = settings_of(init="cascade", cascade_run="low", cascade_until=2.0, cascade_restart=1.0, steps=20)
    full = make_plan(s)
    low, high = split_plan(s, full)
    assert low.sigmas == [x for x in full.sigmas if x > 2.0] + [2.0] and low.sigmas[0] == full.sigmas[0]
    assert high.sigmas == [1.0] + [x for x in full.sigmas if x < 1.0] and high.sigmas[-1] == 0
    assert low.nfe == 2 * (len(low.sigmas) - 1)  # Heun steps all the way (no step into 0)
    assert high.nfe == 2 * (len(high.sigmas) - 1) - 1  # the last step into 0 is Euler
    assert low.nfe + high.nfe <= full.nfe + 2  # about the plain sampler's cost
    # multistep solvers get step orders for their part's length: warm-up first, first order last
    s = settings_of(init="cascade", cascade_run="low", solver="dpmpp", order=3, nfe=12)
    low, high = split_plan(s, make_plan(s))
    for part in (low, high):
        assert len(part.orders) == len(part.sigmas) - 1 == part.nfe
        assert part.orders[0] == 1 and part.orders[-1] == 1 and max(part.orders) <= 3


def test_restart_noise_is_fresh_unit_noise_fixed_by_each_image_alone():
    n = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r = restart_noise(n)
    assert torch.equal(r, restart_noise(n.clone()))  # fixed by the noise
    assert torch.equal(r[2:3], restart_noise(n[2:3]))  # not by the batch around it
    assert not torch.equal(r[0], r[1])
    assert abs(r.mean().item()) < 0.05 and abs(r.std().item() - 1) < 0.05
    corr = torch.corrcoef(torch.stack([r.flatten(), n.flatten()]))[0, 1].item()
    assert abs(corr) < 0.05  # unrelated to the start noise it is drawn from


def nano(size: int, seed: int):
    torch.manual_seed(seed)
    model = build_model(model_config("MicroDiT_Nano_4", input_size=size, in_channels=3, caption_channels=8))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.eval()


def cascade_sampler(low_model, until: float, restart: float) -> Sampler:
    s = settings_of(init="cascade", cascade_run="low", cascade_until=until, cascade_restart=restart, steps=8,
                    cfg_scale=2.0)
    low, high = split_plan(s, make_plan(s))
    return Sampler(s, high, CascadeStart(low_model, EDM(), low, "low", "step_1", guided_denoiser))


def test_the_low_models_layout_reaches_the_image_and_images_stay_paired():
    y, mask = torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    low_model, high_model = nano(16, 0), nano(32, 1)
    # the low part alone: the low model's guided Heun on the pooled noise, then its clean estimate, upsampled
    sampler = cascade_sampler(low_model, until=2.0, restart=0.01)
    n_low = F.avg_pool2d(noise.double(), 2) * 2
    assert abs(n_low.std().item() - 1) < 0.05
    d = guided_denoiser(low_model, EDM(), y, mask, 2.0)
    sig = sampler.start.plan.sigmas
    want = F.interpolate(d(heun(d, n_low * sig[0], sig), 2.0), scale_factor=2, mode="nearest")
    torch.testing.assert_close(sampler.start(noise, y, mask, 2.0), want)
    # restarting at a tiny noise level, the run's model hardly changes the upsampled estimate
    out = sample(high_model, EDM(), y, mask, sampler=sampler, noise=noise)
    assert out.shape == (3, 3, 32, 32)
    assert (out.double() - want).abs().max() < 0.1 * want.abs().max()
    assert sampler.record()["cascade_nfe"] == len(sig) * 2 - 1 and sampler.record()["measured_nfe"] == sampler.plan.nfe
    # restarting higher, the run's model does the detail; another low model gives another image
    sampler = cascade_sampler(low_model, until=2.0, restart=1.0)
    out = sample(high_model, EDM(), y, mask, sampler=sampler, noise=noise)
    other = sample(high_model, EDM(), y, mask, sampler=cascade_sampler(nano(16, 2), 2.0, 1.0), noise=noise)
    assert (out - other).abs().mean() > 1e-3
    # image 1 alone is the image 1 of the batch
    alone = sample(high_model, EDM(), y[1:2], mask[1:2], sampler=sampler, noise=noise[1:2])
    torch.testing.assert_close(alone, out[1:2], atol=1e-4, rtol=1e-4)


def test_the_run_model_starts_from_the_estimate_noised_with_fresh_noise(solver_spy):
    seen = solver_spy("heun")  # the low part's Heun is the spy too: the estimate below is computed the same way
    y, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    sampler = cascade_sampler(nano(16, 0), until=2.0, restart=1.0)
    sample(nano(32, 1), EDM(), y, mask, sampler=sampler, noise=noise)
    assert seen["sigmas"][0] == 1.0
    torch.testing.assert_close(seen["x"], sampler.start(noise, y, mask, 2.0) + restart_noise(noise).double())


# ---------------------------------------------------------------- the low run and its checks


def make_run(folder: Path, **data) -> Path:
    """A run folder without training: config.yaml and one checkpoint of the network its config builds."""
    cfg = Config()
    cfg.data.caption_channels = 8
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg = cfg.validate()
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    net = build_run_network(cfg, {"attention": "torch", "gather": "torch", "moe": "torch", "norm": "torch"})
    Checkpointer(folder / "checkpoints").save(1, model=net, ema=net)
    return folder


def low_estimate_of(low_run: Path, noise: torch.Tensor, y, mask, **sample):
    """(the upsampled estimate of a 16-px run's model for a 32-px run built with `sample` keys and CFG 3, the
    sampler). The untrained model's zero-initialised output would ignore the caption: its weights are redrawn."""
    run = Config()
    run.data.caption_channels = 8
    s = settings_of(init="cascade", cascade_run=str(low_run), steps=8, cfg_scale=3.0, **sample)
    sampler = build_sampler(s, run.validate(), torch.device("cpu"))
    for p in sampler.start.model.parameters():
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return sampler.start(noise, y, mask, 3.0), sampler


def test_load_cascade_checks_the_low_run_against_the_sampled_run(tmp_path):
    run = Config()
    run.data.caption_channels = 8
    run = run.validate()

    def load(folder):
        s = settings_of(init="cascade", cascade_run=str(folder))
        return load_cascade(s, make_plan(s), run, torch.device("cpu"), guided_denoiser)

    start = load(make_run(tmp_path / "low", image_size=16))
    assert start.model.cfg.input_size == 16 and start.record()["cascade_checkpoint"].endswith("step_00000001")
    assert start.plan.sigmas[-1] == 1.0  # sample.cascade_until's default
    with pytest.raises(SamplerSettingsError, match="nowhere: not a run folder"):
        load(tmp_path / "nowhere")
    with pytest.raises(SamplerSettingsError, match="makes 24x24 images; the run makes 32x32"):
        load(make_run(tmp_path / "odd", image_size=24))
    with pytest.raises(SamplerSettingsError, match="makes 32x32 images; the run makes 32x32"):
        load(make_run(tmp_path / "same", image_size=32))
    with pytest.raises(SamplerSettingsError, match="data.caption_len=8 differs from this run's 16"):
        load(make_run(tmp_path / "captions", image_size=16, caption_len=8))


@pytest.mark.parametrize("flags, message", [
    (["--init", "cascade"], "sample.cascade_run='' must name the run folder of a lower-resolution model"),
    (["--init", "cascade", "--cascade-run", "low", "--cascade-restart", "3"],
     "sample.cascade_restart=3.0 must be > diffusion.sigma_min=0.002 and <= sample.cascade_until=1.0"),
    (["--init", "cascade", "--cascade-run", "low", "--cascade-until", "90"],
     "sample.cascade_until=90.0 must lie between diffusion.sigma_min=0.002 and diffusion.sigma_max=80.0"),
])
def test_cascade_flags_are_checked(flags, message):
    import argparse

    from engine.sampling.settings import add_sampler_args

    p = argparse.ArgumentParser()
    add_sampler_args(p)
    with pytest.raises(SamplerSettingsError, match=message.replace(".", r"\.").replace("(", r"\(")):
        SamplerSettings.from_args(p.parse_args(flags), Config().validate())


def test_evaluate_and_sample_a_run_through_the_cascade(short_runs, tmp_path, capsys):
    from engine.evaluate import main
    from engine.sample import main as sample_main

    out = sample_main(["--run", str(short_runs / "a"), "--prompt", "a red circle", "--num", "2", "--steps", "3",
                       "--init", "cascade", "--cascade-run", str(short_runs / "small"), "--cascade-until", "2",
                       "--out", str(tmp_path / "g.png")])
    said = capsys.readouterr().out
    assert out.is_file() and f"NFE after 5 at 16 px from {short_runs / 'small'}, init cascade" in said

    res = main(["--run", str(short_runs / "a"), "--init", "cascade", "--cascade-run", str(short_runs / "small"),
                "--cascade-until", "2", "--num-images", "6", "--steps", "3", "--batch-size", "4", "--grid", "0",
                "--out", str(tmp_path / "e")])
    rec = json.loads((tmp_path / "e" / "eval.json").read_text())["sampler"]
    assert rec == res["sampler"]
    assert rec["init"] == "cascade" and rec["cascade_run"] == str(short_runs / "small") and rec["cascade_size"] == 16
    assert rec["cascade_sigmas"][-1] == 2.0 and rec["sigmas"][0] == 1.0
    assert rec["cascade_nfe"] == 2 * (len(rec["cascade_sigmas"]) - 1) + 1 and rec["measured_nfe"] == rec["nfe"]
    assert res["metrics"]["geneval"]["num_images"] == 6


def test_cascade_from_data_starts_the_run_model_from_each_prompts_pooled_held_out_image(short_runs, tmp_path):
    """An ideal first stage: restarted at a tiny noise level, the run's model hands back the held-out images as
    pooled to 16 px and replicated, image for image, whatever the batch."""
    import numpy as np
    from PIL import Image

    from engine.data.synthetic import SyntheticShapes
    from engine.evaluate import main
    from engine.outputs.images import to_uint8

    res = main(["--run", str(short_runs / "a"), "--cascade-from-data", "16", "--cascade-until", "0.01",
                "--cascade-restart", "0.01", "--num-images", "5", "--steps", "3", "--batch-size", "2", "--grid", "0",
                "--save-images", "--out", str(tmp_path / "e")])
    rec = res["sampler"]
    assert rec["init"] == "cascade" and rec["cascade_from_data"] == 16 and rec["cascade_data_seed"] == 1000000
    real = SyntheticShapes(5, 32, 1000000).images(range(5))
    want = to_uint8(F.interpolate(F.avg_pool2d(real, 2), scale_factor=2, mode="nearest")).astype(int)
    got = np.stack([np.asarray(Image.open(tmp_path / "e" / "images" / f"{i:05d}.png")) for i in range(5)]).astype(int)
    assert np.abs(got - want).mean() < 3 and np.abs(got - np.roll(want, 1, axis=0)).mean() > 10
    with pytest.raises(SamplerSettingsError, match="--cascade-from-data 24: must be a side that divides"):
        main(["--run", str(short_runs / "a"), "--cascade-from-data", "24", "--cascade-until", "0.01",
              "--cascade-restart", "0.01", "--num-images", "2", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
