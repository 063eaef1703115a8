"""Autoguidance (sample.guide_run): the guided output against the formula, the two captions the guide may read, the
checks on the guiding run, and evaluate.py end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.config import Config
from engine.diffusion.edm import EDM
from engine.sampling.autoguide import Guide, load_guide
from engine.sampling.sampler import guided_denoiser, null_caption
from engine.sampling.settings import SamplerSettings, SamplerSettingsError
from models.sizes import build_model, model_config
from tests.test_cascade import make_run


def nano(seed: int):
    """A 32-px Nano_4 with redrawn weights (the zero-initialised output would ignore input and caption)."""
    torch.manual_seed(seed)
    model = build_model(model_config("MicroDiT_Nano_4", input_size=32, in_channels=3, caption_channels=8))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(4)
    y, mask = torch.randn(2, 4, 8, generator=g), torch.ones(2, 4, dtype=torch.bool)
    return torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64) * 3.0, y, mask


@torch.no_grad()
def test_the_guide_takes_the_unconditional_branchs_place(inputs):
    x, y, mask = inputs
    strong, weak, edm, w = nano(0), nano(1), EDM(), 2.5
    sigma = torch.full((2,), 3.0)
    d = edm.denoise(strong, x.float(), sigma, y, mask).double()
    d_weak = edm.denoise(weak, x.float(), sigma, y, mask).double()
    d_weak_null = edm.denoise(weak, x.float(), sigma, *null_caption(y, mask)).double()
    assert (d - d_weak).abs().mean() > 1e-3  # the two models disagree: the check below can fail

    auto = guided_denoiser(strong, edm, y, mask, w, guide_model=Guide(weak, edm, "cond", "weak", "step_1"))
    torch.testing.assert_close(auto(x, 3.0), d_weak + w * (d - d_weak), atol=1e-5, rtol=1e-5)
    null = guided_denoiser(strong, edm, y, mask, w, guide_model=Guide(weak, edm, "uncond", "weak", "step_1"))
    torch.testing.assert_close(null(x, 3.0), d_weak_null + w * (d - d_weak_null), atol=1e-5, rtol=1e-5)
    # outside the guidance interval, and at scale 1, the conditional output alone: the guide is not consulted
    outside = guided_denoiser(strong, edm, y, mask, w, (5.0, math.inf), Guide(weak, edm, "cond", "weak", "step_1"))
    torch.testing.assert_close(outside(x, 3.0), d, atol=1e-5, rtol=1e-5)
    off = guided_denoiser(strong, edm, y, mask, 1.0, guide_model=Guide(weak, edm, "cond", "weak", "step_1"))
    torch.testing.assert_close(off(x, 3.0), d, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_model_guiding_itself_gives_its_own_output_or_classifier_free_guidance(inputs):
    x, y, mask = inputs
    model, edm = nano(0), EDM()
    plain = guided_denoiser(model, edm, y, mask, 1.0)(x, 3.0)
    cfg = guided_denoiser(model, edm, y, mask, 3.0)(x, 3.0)
    assert (cfg - plain).abs().mean() > 1e-3
    itself = guided_denoiser(model, edm, y, mask, 3.0, guide_model=Guide(model, edm, "cond", "m", "s"))(x, 3.0)
    torch.testing.assert_close(itself, plain, atol=1e-5, rtol=1e-5)  # D + 3 (D - D)
    as_cfg = guided_denoiser(model, edm, y, mask, 3.0, guide_model=Guide(model, edm, "uncond", "m", "s"))(x, 3.0)
    torch.testing.assert_close(as_cfg, cfg, atol=1e-5, rtol=1e-5)


def guide_settings(folder, **sample) -> SamplerSettings:
    cfg = Config()
    cfg.sample.guide_run = str(folder)
    for k, v in sample.items():
        setattr(cfg.sample, k, v)
    return SamplerSettings.from_config(cfg.validate())


def test_load_guide_checks_the_guiding_run_against_the_sampled_run(tmp_path):
    run = Config()
    run.data.caption_channels = 8
    run = run.validate()
    cpu = torch.device("cpu")

    guide = load_guide(guide_settings(make_run(tmp_path / "weak")), run, cpu)
    assert guide.model.cfg.input_size == 32 and guide.caption == "cond"
    assert guide.record() == {"guide_run": str(tmp_path / "weak"), "guide_caption": "cond",
                              "guide_checkpoint": str(tmp_path / "weak" / "checkpoints" / "step_00000001")}
    assert load_guide(guide_settings(tmp_path / "weak", guide_step=1), run, cpu).checkpoint == guide.checkpoint
    with pytest.raises(SamplerSettingsError, match="sample.guide_step / --guide-step 7: .* has no checkpoint of that "
                                                   "step; it has 1"):
        load_guide(guide_settings(tmp_path / "weak", guide_step=7), run, cpu)
    with pytest.raises(SamplerSettingsError, match="nowhere: not a run folder"):
        load_guide(guide_settings(tmp_path / "nowhere"), run, cpu)
    with pytest.raises(SamplerSettingsError, match="makes 16x16 images; the run makes 32x32"):
        load_guide(guide_settings(make_run(tmp_path / "small", image_size=16)), run, cpu)
    with pytest.raises(SamplerSettingsError, match="data.caption_len=8 differs from this run's 16"):
        load_guide(guide_settings(make_run(tmp_path / "captions", caption_len=8)), run, cpu)
    nested = Config()
    nested.data.caption_channels = 8
    nested.diffusion.resolutions = [16, 32]
    nested.model.outer = "Outer_Nano_4"
    with pytest.raises(SamplerSettingsError, match="guides a plain denoiser of one resolution; this run is nested"):
        load_guide(guide_settings(tmp_path / "weak"), nested.validate(), cpu)


@pytest.mark.parametrize("sample, message", [
    (dict(guide_caption="both"), "sample.guide_caption='both' must be one of: cond, uncond"),
    (dict(guide_step=-1), "sample.guide_step=-1 must be >= 0"),
    (dict(parallel="patch"), "sample.guide_run='weak' needs sample.parallel='none', not 'patch'"),
])
def test_guide_settings_are_checked(sample, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        guide_settings("weak", **sample)


def test_a_guide_step_without_a_guide_run_is_refused():
    cfg = Config()
    cfg.sample.guide_step = 500
    with pytest.raises(ValueError, match="sample.guide_step=500 names a checkpoint of the guiding model: set "
                                         "sample.guide_run too"):
        cfg.validate()


def test_evaluate_and_sample_a_run_with_autoguidance(short_runs, tmp_path, capsys):
    from engine.evaluate import main
    from engine.sample import main as sample_main

    out = sample_main(["--run", str(short_runs / "a"), "--prompt", "a red circle", "--num", "2", "--steps", "3",
                       "--guide-run", str(short_runs / "b"), "--out", str(tmp_path / "g.png")])
    said = capsys.readouterr().out
    assert out.is_file() and f"autoguidance 3.0 by {short_runs / 'b' / 'checkpoints' / 'step_00000002'}" in said

    common = ["--run", str(short_runs / "a"), "--num-images", "4", "--steps", "3", "--grid", "0", "--save-images"]
    res = main([*common, "--guide-run", str(short_runs / "b"), "--guide-step", "2", "--out", str(tmp_path / "auto")])
    rec = json.loads((tmp_path / "auto" / "eval.json").read_text())["sampler"]
    assert rec == res["sampler"]
    assert rec["guide_run"] == str(short_runs / "b") and rec["guide_step"] == 2 and rec["guide_caption"] == "cond"
    assert rec["guide_checkpoint"].endswith("step_00000002") and rec["measured_nfe"] == rec["nfe"] == 5
    main([*common, "--out", str(tmp_path / "cfg")])
    a, c = (sorted((tmp_path / d / "images").iterdir()) for d in ("auto", "cfg"))
    assert any(x.read_bytes() != y.read_bytes() for x, y in zip(a, c))  # the guide changed the images
    with pytest.raises(SamplerSettingsError, match="--guide-step 9: .* has no checkpoint of that step; it has 2"):
        main([*common, "--guide-run", str(short_runs / "b"), "--guide-step", "9", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_a_run_trains_with_a_guide_and_a_missing_guide_stops_it_before_it_writes(short_runs, tmp_path):
    """A 2-step run whose config names a guide: its closing check samples with it; a guide that is not a run folder
    is refused when training starts, with one line and exit status 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "runs"
    out.mkdir()
    (out / ".cache").symlink_to(short_runs / ".cache")
    common = [sys.executable, str(root / "engine" / "train.py"), "--config", str(root / "configs" / "tiny_32px.yaml"),
              "train.steps=2", "train.ckpt_every=2", "train.progress_bar=false", "data.num_samples=64",
              "sample.steps=2", "sample.per_prompt=1", "sample.final_eval_images=4", f"run.out_dir={out}",
              "sample.guide_caption=uncond"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([*common, "run.name=bad", f"sample.guide_run={tmp_path / 'nowhere'}"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "nowhere: not a run folder (no config.yaml)" in bad.stderr
    assert "Traceback" not in bad.stderr and not (out / "bad" / "checkpoints").exists()
    done = subprocess.run([*common, "run.name=g", f"sample.guide_run={short_runs / 'b'}"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    check = json.loads((out / "g" / "final_eval.json").read_text())["sampler"]
    assert check["guide_run"] == str(short_runs / "b") and check["guide_caption"] == "uncond"
