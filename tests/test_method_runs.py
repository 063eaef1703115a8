"""Whole training runs of the methods, in this process on a one-process group: a nested run resumes on the same
trajectory bit for bit, a progressive phase refuses a wrong file, and an expert pair trains and evaluates together."""
import json
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.training import loop
from engine.training.run_folder import load_run_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.num_samples=64", "train.global_batch=8", "train.micro_batch=8", "train.log_every=1",
         "train.progress_bar=false", "sample.steps=2", "sample.per_prompt=1", "sample.final_eval_images=0",
         "sample.prompts=[a red circle]"]
NESTED = ["diffusion.resolutions=[16, 32]", "model.outer=Outer_Nano_4", "diffusion.mask_ratio=0.5",
          "model.pixel_head=0"]

pytestmark = pytest.mark.slow


def config(out: Path, name: str, *extra: str):
    return load_config(ROOT / "configs/tiny_32px.yaml", [f"run.out_dir={out}", f"run.name={name}", *SMALL, *extra])


def losses(run: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_a_killed_nested_run_resumes_bit_identically(dist_env, tmp_path, monkeypatch):
    steps = ["train.steps=6", "train.ckpt_every=3"]
    whole = loop.train(config(tmp_path, "whole", *NESTED, *steps), dist_env)

    real_step, calls = loop.train_step, []

    def dies_at_step_4(*args, **kw):
        calls.append(1)
        if len(calls) == 5:  # the checkpoint of step 3 is written; step 4 dies halfway
            raise RuntimeError("killed")
        return real_step(*args, **kw)

    monkeypatch.setattr(loop, "train_step", dies_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        loop.train(config(tmp_path, "killed", *NESTED, *steps), dist_env)
    monkeypatch.setattr(loop, "train_step", real_step)
    killed = loop.train(config(tmp_path, "killed", *NESTED, *steps), dist_env)

    assert losses(killed) == losses(whole) and len(losses(whole)) == 6
    for use_ema in (False, True):
        _, a, _ = load_run_model(whole, None, use_ema)
        _, b, _ = load_run_model(killed, None, use_ema)
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name


def test_progressive_phase_two_starts_from_phase_one_and_refuses_a_wrong_file(dist_env, tmp_path):
    # phase 1 without the recipe's pixel head: the nested model it seeds has none
    low = loop.train(config(tmp_path, "low", "diffusion.resolutions=[16]", "diffusion.mask_ratio=0",
                            "model.pixel_head=0", "train.steps=2"), dist_env)
    ckpt = low / "checkpoints" / "step_00000002"
    wrong = loop.train(config(tmp_path, "wrong", "model.patch_size=8", "train.steps=1"), dist_env)
    bad = config(tmp_path, "p2_bad", *NESTED, "train.steps=1", f"train.init_from={wrong}/checkpoints/step_00000001",
                 "train.init_prefix=inner.")
    with pytest.raises(ConfigError, match=r"train.init_from=.* into train.init_prefix='inner.': .*wrong shape"):
        loop.train(bad, dist_env)
    good = loop.train(config(tmp_path, "p2", *NESTED, "train.steps=1", f"train.init_from={ckpt}",
                             "train.init_prefix=inner.", "optim.lr=1e-12"), dist_env)
    _, phase1, _ = load_run_model(low, None, use_ema=False)
    _, phase2, _ = load_run_model(good, None, use_ema=False)
    for name, p in phase1.state_dict().items():  # one step at lr 1e-12 leaves phase 1's weights in place
        torch.testing.assert_close(phase2.inner.state_dict()[name], p, rtol=0, atol=1e-9)


def test_an_expert_pair_trains_in_turn_and_evaluates_as_one(dist_env, tmp_path, install_attribute_net):
    from engine.evaluate import main as evaluate

    pair = loop.train(config(tmp_path, "pair", "model.experts=[hi, lo]", "sample.expert_sigmas=[0.3]",
                             "train.steps=2", "sample.final_eval_images=4"), dist_env)
    assert (pair / "final_eval.json").is_file() and (pair / "config.yaml").is_file()
    for name, rng in (("hi", [0.3, None]), ("lo", [None, 0.3])):
        sub = load_config(tmp_path / name / "config.yaml")
        assert sub.diffusion.sigma_range == rng and (tmp_path / name / "checkpoints" / "step_00000002").is_dir()
    assert load_config(tmp_path / "lo" / "config.yaml").train.init_from_ema
    install_attribute_net(tmp_path)
    result = evaluate(["--run", str(pair), "--num-images", "4", "--steps", "2", "--batch-size", "4"])
    assert result["folder"] == str(pair / "eval" / "experts") and result["metrics"]["geneval"]["all"] is not None
    with pytest.raises(ConfigError, match="--checkpoint/--step: .* samples with its experts"):
        evaluate(["--run", str(pair), "--step", "2"])
