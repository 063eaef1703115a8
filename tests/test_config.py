"""Config tree: YAML + dotted overrides, every error names its key, the resolved tree round-trips."""
from pathlib import Path

import pytest

from engine.config import Config, config_diff, field_docs, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_paper_phases_match_the_design_table():
    p1, p3 = load_config(ROOT / "configs/microdit_xl_256_masked.yaml"), load_config(ROOT / "configs/microdit_xl_512_masked.yaml")
    assert (p1.diffusion.mask_ratio, p1.train.steps, p1.train.global_batch, p1.optim.lr) == (0.75, 250_000, 2048, 2.4e-4)
    assert (p1.diffusion.p_mean, p1.diffusion.p_std, p1.optim.grad_clip, p1.optim.warmup_steps) == (-0.6, 1.2, 0.25, 2500)
    assert (p3.data.image_size, p3.model.pos_interp_scale, p3.diffusion.p_mean, p3.diffusion.p_std) == (64, 2.0, 0.0, 0.6)
    assert p3.train.init_from.endswith("microdit_xl_256/checkpoints/step_00030000")


def test_overrides_are_typed_and_applied():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["optim.lr=3e-4", "train.steps=7", "optim.betas=[0.9, 0.95]",
                                                   "kernels.attention=torch", "sample.prompts=[a, b]"])
    assert (cfg.optim.lr, cfg.train.steps, cfg.optim.betas) == (3e-4, 7, (0.9, 0.95))
    assert cfg.kernels.attention == "torch" and cfg.sample.prompts == ["a", "b"]


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ("nosuch.key=1", "unknown key 'nosuch'"),
    ("train.steps=ten", "train.steps expects int"),
    ("train.compile=1", "train.compile expects bool"),
    ("diffusion.mask_ratio=1.0", "diffusion.mask_ratio=1.0 must be in"),
    ("diffusion.mask_ratio=-0.1", "diffusion.mask_ratio"),
    ("train.global_batch=33", "train.global_batch=33 must be a multiple of train.micro_batch"),
    ("kernels.moe=fastest", "kernels.moe: unknown backend 'fastest'"),
    ("model.name=MicroDiT_XXL_2", "model.name="),
    ("optim.betas=[0.9]", "optim.betas expects 2 values"),
    ("train.precision=fp8", "train.precision"),
    ("optim.lr", "must look like key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(ROOT / "configs/tiny.yaml", [override])


def test_world_size_must_divide_the_global_batch():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.global_batch=32", "train.micro_batch=16"])
    cfg.validate(world_size=2)
    with pytest.raises(ValueError, match="train.global_batch=32 must be divisible by train.micro_batch × world size"):
        cfg.validate(world_size=3)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml", ["optim.lr=5e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(cfg)


def test_config_diff_lists_changed_keys():
    a = load_config(ROOT / "configs/tiny.yaml")
    b = load_config(ROOT / "configs/tiny.yaml", ["train.steps=600", "optim.lr=1e-3"])
    assert config_diff(a, b) == ["optim.lr: 0.002 -> 0.001", "train.steps: 300 -> 600"]
    assert config_diff(a, a) == []


def test_every_config_key_is_documented():
    docs = field_docs()
    assert "optim.lr" in docs and docs["optim.lr"][1] == 1e-3
    undocumented = [key for key, (doc, _) in docs.items() if not doc]
    assert not undocumented, undocumented
