"""Networks split by noise level: the switch picks each evaluation's expert by its own sigma, and each expert's run is
derived from the pair's config (its range, and the previous expert's EMA as its start)."""
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.diffusion.edm import EDM
from engine.sampling.experts import ExpertSwitch
from engine.sampling.sampler import sample
from engine.training.experts import expert_config
from models.sizes import build_model, model_config

ROOT = Path(__file__).resolve().parents[1]


def recording(model, seen: list):
    """Record the noise level of every call of `model` (c_noise = ln sigma / 4)."""
    forward = model.forward

    def spy(x, c_noise, *rest):
        seen.extend((4 * c_noise).exp().tolist())
        return forward(x, c_noise, *rest)

    model.forward = spy
    return model


def test_each_evaluation_goes_to_the_expert_of_its_own_noise_level():
    torch.manual_seed(0)
    seen = {"hi": [], "mid": [], "lo": []}
    nets = [recording(build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8)).eval(), seen[k])
            for k in seen]
    switch = ExpertSwitch(nets, [5.0, 0.5])
    assert switch.at(80.0) is nets[0] and switch.at(5.0) is nets[0] and switch.at(4.99) is nets[1]
    assert switch.at(0.5) is nets[1] and switch.at(0.002) is nets[2]
    y = torch.randn(2, 3, 8)
    images = sample(switch, EDM(), y, None, steps=12, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    tol = 1e-4  # c_noise is float32
    assert seen["hi"] and min(seen["hi"]) >= 5.0 * (1 - tol)
    assert seen["mid"] and 0.5 * (1 - tol) <= min(seen["mid"]) and max(seen["mid"]) < 5.0 * (1 + tol)
    assert seen["lo"] and max(seen["lo"]) < 0.5 * (1 + tol)
    with pytest.raises(ValueError, match="descending"):
        ExpertSwitch(nets, [0.5, 5.0])


def test_each_expert_trains_on_its_range_from_the_previous_experts_ema():
    cfg = load_config(ROOT / "configs/tiny_32px.yaml", ["run.out_dir=/x", "run.name=pair", "train.steps=50",
                                                   "model.experts=[hi, mid, lo]", "sample.expert_sigmas=[2.0, 0.3]"])
    hi, mid, lo = (expert_config(cfg, i) for i in range(3))
    assert [e.run.name for e in (hi, mid, lo)] == ["hi", "mid", "lo"]
    assert [e.diffusion.sigma_range for e in (hi, mid, lo)] == [[2.0, None], [0.3, 2.0], [None, 0.3]]
    assert hi.train.init_from == "" and not hi.train.init_from_ema
    assert mid.train.init_from == "/x/hi/checkpoints/step_00000050" and mid.train.init_from_ema
    assert lo.train.init_from == "/x/mid/checkpoints/step_00000050" and lo.train.init_from_ema
    assert all(not e.model.experts and not e.sample.expert_sigmas for e in (hi, mid, lo))
    assert all(e.sample.final_eval_images == 0 for e in (hi, mid, lo))  # the pair's own check samples with all
