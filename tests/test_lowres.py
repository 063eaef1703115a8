"""A denoiser conditioned on a low-resolution image (diffusion.lowres_condition): the condition it is trained on, how
it reaches the network, the config rules, sampling it through the cascade, and a short run end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import Config, ConfigError
from engine.diffusion.edm import EDM
from engine.diffusion.lowres import Conditioned, lowres_image
from engine.diffusion.noise import draw_step_noise
from engine.sampling.cascade import CascadeStart, split_plan
from engine.sampling.plan import make_plan
from engine.sampling.sampler import Sampler, guided_denoiser, sample
from engine.sampling.settings import SamplerSettings, SamplerSettingsError
from engine.training.network import build_run_network
from models.sizes import build_model, model_config

ROOT = Path(__file__).resolve().parents[1]
TORCH_KERNELS = {"attention": "torch", "gather": "torch", "moe": "torch", "norm": "torch"}


def conditioned_config(**sample) -> Config:
    cfg = Config()
    cfg.data.caption_channels = 8
    cfg.model.pixel_head = 16
    cfg.diffusion.mask_ratio = 0.0
    cfg.diffusion.lowres_condition = 16
    cfg.diffusion.lowres_aug = 0.2
    cfg.sample.init, cfg.sample.cascade_run = "cascade", "low"
    for k, v in sample.items():
        setattr(cfg.sample, k, v)
    return cfg.validate()


class Spy(torch.nn.Module):
    """A stand-in network that records its input and returns zeros of the token shape."""

    def __init__(self, patch: int = 4, channels: int = 3):
        super().__init__()
        self.patch, self.channels, self.inputs = patch, channels, []

    def forward(self, x, c_noise, y, y_mask=None, keep_idx=None):
        self.inputs.append(x.detach().clone())
        n = (x.shape[-1] // self.patch) ** 2
        return torch.zeros(x.shape[0], n, self.patch**2 * self.channels)

    def patchify(self, x):
        from models.microdit import patchify
        return patchify(x, self.patch)

    def unpatchify(self, tokens, rows=None):
        from models.microdit import unpatchify
        return unpatchify(tokens, self.patch, self.channels, rows)


def test_the_condition_is_the_image_pooled_then_replicated_with_noise_added_low():
    x0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = lowres_image(x0, 16)
    low = F.avg_pool2d(x0, 2)
    assert cond.shape == x0.shape
    for dy in (0, 1):
        for dx in (0, 1):
            torch.testing.assert_close(cond[..., dy::2, dx::2], low)  # every pixel of a 2x2 block is its mean
    noise, level = torch.randn(2, 3, 16, 16), torch.tensor([0.0, 0.5])
    noisy = lowres_image(x0, 16, noise, level)
    torch.testing.assert_close(noisy[0], cond[0])  # level 0: the plain condition
    torch.testing.assert_close(noisy[1, :, ::2, ::2], low[1] + 0.5 * noise[1])  # noise at the low resolution
    torch.testing.assert_close(lowres_image(x0, 8)[..., ::4, ::4], F.avg_pool2d(x0, 4))


def test_conditioned_concatenates_the_condition_and_repeats_it_for_guidance():
    spy, cond = Spy(), torch.randn(2, 3, 32, 32)
    net = Conditioned(spy, cond)
    x = torch.randn(2, 3, 32, 32)
    net(x, torch.zeros(2), None)
    torch.testing.assert_close(spy.inputs[-1], torch.cat([x, cond], 1))
    net(torch.cat([x, x]), torch.zeros(4), None)  # guidance: conditional and unconditional halves in one batch
    torch.testing.assert_close(spy.inputs[-1][:, 3:], torch.cat([cond, cond]))
    assert net.patchify(x).shape == (2, 64, 48) and net.channels == 3  # the rest is the model's


def test_the_network_takes_the_condition_as_extra_input_channels_and_uses_it():
    cfg = conditioned_config()
    net = build_run_network(cfg, TORCH_KERNELS).eval()
    assert net.cfg.cond_channels == 3
    assert net.x_embedder.proj.weight.shape[1] == 6 and net.pixel_head.conv_in.weight.shape[1] == 9
    torch.manual_seed(0)
    for p in net.parameters():  # off the zero init, so that every input reaches the output
        p.data.normal_(0, 0.05)
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 16, 8)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out_a = net(torch.cat([x, a], 1), torch.zeros(2), y)
    out_b = net(torch.cat([x, b], 1), torch.zeros(2), y)
    assert out_a.shape == (2, 64, 48)
    assert (out_a - out_b).abs().mean() > 1e-3
    with pytest.raises(RuntimeError):
        net(x, torch.zeros(2), y)  # the condition is not optional


def test_the_loss_conditions_on_each_images_own_pooled_copy_and_keeps_the_other_draws():
    edm = EDM(lowres_condition=16, lowres_aug=0.3)
    n = draw_step_noise(edm, 0, 5, 4, (3, 32, 32), 64, 0.0, 0.1, torch.device("cpu"))
    plain = draw_step_noise(EDM(), 0, 5, 4, (3, 32, 32), 64, 0.0, 0.1, torch.device("cpu"))
    for key in ("sigma", "noise", "drop_caption"):  # the condition's noise is drawn last
        assert torch.equal(getattr(n, key), getattr(plain, key))
    assert plain.cond_noise is None and n.cond_noise.shape == (4, 3, 16, 16)
    assert n.cond_level.min() >= 0 and n.cond_level.max() <= 0.3 and n.cond_level.std() > 0
    x0 = torch.randn(4, 3, 32, 32)
    spy = Spy()
    edm.loss(spy, x0, torch.randn(4, 16, 8), None, n)
    torch.testing.assert_close(spy.inputs[-1][:, 3:], lowres_image(x0, 16, n.cond_noise, n.cond_level))
    half = n.slice(2, 4)
    assert torch.equal(half.cond_noise, n.cond_noise[2:]) and torch.equal(half.cond_level, n.cond_level[2:])
    edm.loss(spy, x0, torch.randn(4, 16, 8), None, plain)  # lowres_aug's draws absent: the clean condition
    torch.testing.assert_close(spy.inputs[-1][:, 3:], lowres_image(x0, 16))


@pytest.mark.parametrize("changes, message", [
    ({"diffusion.lowres_condition": 24}, "diffusion.lowres_condition=24 must be 0 (off) or a side that divides"),
    ({"diffusion.lowres_condition": 32}, "diffusion.lowres_condition=32 must be 0 (off) or a side that divides"),
    ({"diffusion.resolutions": [16]}, "diffusion.lowres_condition=16 needs a plain denoiser at data.image_size"),
    ({"diffusion.lowres_aug": -0.1}, "diffusion.lowres_aug=-0.1 must be >= 0"),
    ({"sample.init": "noise"}, "sample.init='noise' must be 'cascade' for a run conditioned on a low-resolution"),
    ({"sample.parallel": "patch"}, "sample.parallel='patch' must be 'none' for a run conditioned"),
    ({"sample.cascade_restart": 90.0}, "sample.cascade_restart=90.0 must be > diffusion.sigma_min=0.002 and <= "),
])
def test_config_rules(changes, message):
    cfg = conditioned_config()
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        cfg.validate()


def test_a_conditioned_run_may_restart_above_the_handover_up_to_sigma_max():
    assert conditioned_config(cascade_until=0.01, cascade_restart=80.0).sample.cascade_restart == 80.0
    cfg = conditioned_config()
    cfg.diffusion.lowres_condition = 0
    cfg.sample.cascade_until, cfg.sample.cascade_restart = 0.01, 80.0
    with pytest.raises(ConfigError, match="<= sample.cascade_until=0.01"):
        cfg.validate()  # an unconditioned cascade may not add more noise than its low model took away


def nano(size: int, seed: int, cond_channels: int = 0):
    torch.manual_seed(seed)
    model = build_model(model_config("MicroDiT_Nano_4", input_size=size, in_channels=3, caption_channels=8,
                                     cond_channels=cond_channels), TORCH_KERNELS)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.eval()


def test_sampling_conditions_every_evaluation_on_the_low_models_image():
    cfg = conditioned_config(cascade_until=0.01, cascade_restart=80.0, steps=4, cfg_scale=2.0)
    s = SamplerSettings.from_config(cfg)
    low_plan, high_plan = split_plan(s, make_plan(s))
    assert high_plan.sigmas[0] == 80.0 and low_plan.sigmas[-1] == 0.01
    start = CascadeStart(nano(16, 0), EDM(), low_plan, "low", "step_1", guided_denoiser)
    sampler = Sampler(s, high_plan, start)
    edm = EDM.from_config(cfg.diffusion)
    y, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    high = nano(32, 1, cond_channels=3)
    seen = []
    high.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    out = sample(high, edm, y, mask, sampler=sampler, noise=noise)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    estimate = start(noise, y, mask, 2.0).float()  # the low model's image at 16 px, replicated to 32
    assert len(seen) == sampler.last_nfe
    for x in seen:  # both halves of guidance, at every evaluation
        torch.testing.assert_close(x[:, 3:], torch.cat([estimate, estimate]))
    with pytest.raises(SamplerSettingsError, match="samples with sample.init=cascade"):
        sample(high, edm, y, mask, steps=3)


def test_a_conditioned_run_trains_and_is_evaluated_through_the_cascade(short_runs, tmp_path):
    """A 2-step conditioned run at 32 px on the 16-px run of the fixture: its checkpoint samples and closing check go
    through the cascade; a low run of another size is refused before training starts."""
    out = tmp_path / "runs"
    out.mkdir()
    (out / ".cache").symlink_to(short_runs / ".cache")
    common = [sys.executable, str(ROOT / "engine" / "train.py"), "--config", str(ROOT / "configs" / "tiny_32px.yaml"),
              "train.steps=2", "train.ckpt_every=2",
              "train.progress_bar=false", "data.num_samples=64", "sample.steps=2", "sample.per_prompt=1",
              f"run.out_dir={out}", "diffusion.mask_ratio=0", "diffusion.lowres_condition=16",
              "diffusion.lowres_aug=0.2", "sample.init=cascade", "sample.cascade_until=0.01",
              "sample.cascade_restart=80"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([*common, "run.name=bad", f"sample.cascade_run={short_runs / 'a'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "makes 32x32 images; the run makes 32x32" in bad.stderr
    assert not (out / "bad" / "checkpoints").exists()
    done = subprocess.run([*common, "run.name=sr", f"sample.cascade_run={short_runs / 'small'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    check = json.loads((out / "sr" / "final_eval.json").read_text())
    assert check["sampler"]["init"] == "cascade" and check["sampler"]["cascade_size"] == 16
    assert (out / "sr" / "samples" / "step_00000002.png").is_file()
    # the tools that sample a run their own way refuse a stage whose condition only the cascade supplies
    from argparse import Namespace

    from engine.debias import load
    with pytest.raises(ConfigError, match="a super-resolution stage .diffusion.lowres_condition. is not supported"):
        load(Namespace(run=str(out / "sr"), checkpoint=None))
