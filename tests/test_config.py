"""Config tree: YAML + dotted overrides, every error names its key, the resolved tree round-trips."""
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import ConfigError, KernelsConfig, config_diff, field_docs, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_with_each_value_as_written(path):
    """Every key of the file reaches the config with its value (a key the loader dropped, renamed or coerced to
    something else would fail here), and the result validates."""
    written = flatten(yaml.safe_load(path.read_text()))
    loaded = flatten(to_dict(load_config(path)))
    assert written.keys() <= loaded.keys()
    for key, value in written.items():
        assert loaded[key] == (float(value) if isinstance(loaded[key], float) else value), key


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_shows_its_kernel_flags(path):
    """Each file names all four backend flags, so a user sees where kernels are swapped."""
    raw = yaml.safe_load(path.read_text())
    assert sorted(raw.get("kernels") or {}) == sorted(f.name for f in dataclasses.fields(KernelsConfig))


def test_paper_phases_match_the_design_table():
    p1, p3 = load_config(ROOT / "configs/microdit_xl_256_masked.yaml"), load_config(ROOT / "configs/microdit_xl_512_masked.yaml")
    assert (p1.diffusion.mask_ratio, p1.train.steps, p1.train.global_batch, p1.optim.lr) == (0.75, 250_000, 2048, 2.4e-4)
    assert (p1.diffusion.p_mean, p1.diffusion.p_std, p1.optim.grad_clip, p1.optim.warmup_steps) == (-0.6, 1.2, 0.25, 2500)
    assert (p3.data.image_size, p3.model.pos_interp_scale, p3.diffusion.p_mean, p3.diffusion.p_std) == (64, 2.0, 0.0, 0.6)
    assert p3.train.init_from.endswith("microdit_xl_256/checkpoints/step_00030000")


def test_the_reference_phases_chain_on_one_token_grid():
    """Phase 2 starts from phase 1's last checkpoint with the same network at twice the patch side, on the same data
    set drawn at 32 px instead of 16: both see a 4x4 grid of tokens with the same position codes."""
    from engine.training.network import build_run_network

    p1, p2 = load_config(ROOT / "configs/tiny_reference_16px.yaml"), load_config(ROOT / "configs/tiny_reference.yaml")
    assert p2.train.init_from == f"{p1.run.out_dir}/{p1.run.name}/checkpoints/step_{p1.train.steps:08d}"
    assert (p1.data.image_size, p2.data.image_size, p1.diffusion.resolutions, p2.diffusion.resolutions) == (
        16, 32, [], [])
    assert (p1.model.name, p1.model.pixel_head) == (p2.model.name, p2.model.pixel_head)
    assert dataclasses.replace(p1.data, image_size=32) == p2.data
    # the noise-level spreads were measured as a pair: 16 px wants the narrow one, 32 px sampled plainly the wide one;
    # phase 2's centre is phase 1's shifted by the log of the resolution ratio (a token's pooled noise halves)
    assert (p1.diffusion.p_std, p2.diffusion.p_std) == (0.7, 1.4)
    shift = math.log(p2.data.image_size / p1.data.image_size)
    assert math.isclose(p2.diffusion.p_mean, p1.diffusion.p_mean + shift, abs_tol=0.005)
    low, high = (build_run_network(c, {}) for c in (p1, p2))
    assert (2 * low.cfg.patch_size, p2.train.init_resize_patches) == (high.cfg.patch_size, True)
    torch.testing.assert_close(low.pos_embed, high.pos_embed, rtol=0, atol=0)


def test_the_reference_phase_one_is_the_default_trained_longer():
    """Phase 1 of the reference is the default's recipe with more steps: a key tuned on the default and not carried
    to phase 1 (or the other way round) fails here."""
    default, phase_one = load_config(ROOT / "configs/tiny.yaml"), load_config(ROOT / "configs/tiny_reference_16px.yaml")
    assert config_diff(default, phase_one) == [
        "run.name: 'tiny' -> 'tiny_reference_16px'", "train.ckpt_every: 400 -> 800", "train.keep_checkpoints: 2 -> 8",
        "train.steps: 2000 -> 4000"]


def test_overrides_are_typed_and_applied():
    cfg = load_config(ROOT / "configs/tiny_32px.yaml", ["optim.lr=3e-4", "train.steps=7", "optim.betas=[0.9, 0.95]",
                                                   "kernels.attention=torch", "sample.prompts=[a, b]"])
    assert (cfg.optim.lr, cfg.train.steps, cfg.optim.betas) == (3e-4, 7, (0.9, 0.95))
    assert cfg.kernels.attention == "torch" and cfg.sample.prompts == ["a", "b"]


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ("nosuch.key=1", "unknown key 'nosuch'"),
    ("train.steps=ten", "train.steps expects int"),
    ("train.compile=1", "train.compile expects bool"),
    ("train.global_batch=33", "train.global_batch=33 must be a multiple of train.micro_batch"),
    ("kernels.moe=fastest", "kernels.moe: unknown backend 'fastest'"),
    ("model.name=MicroDiT_XXL_2", "model.name="),
    ("optim.betas=[0.9]", "optim.betas expects 2 values"),
    ("train.precision=fp8", "train.precision"),
    ("optim.lr", "must look like key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(ROOT / "configs/tiny_32px.yaml", [override])


@pytest.mark.parametrize("override,message", [
    ("train.micro_batch=0", "train.micro_batch=0 must be >= 1"),  # was a ZeroDivisionError
    ("train.global_batch=-32", "train.global_batch=-32 must be >= 1"),  # was a negative tensor dimension
    ("train.global_batch=0", "train.global_batch=0 must be >= 1"),  # ran with loss 0
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),  # ran and wrote NaN into metrics.jsonl
    ("optim.lr=.nan", "optim.lr=nan must be a finite number"),
    ("optim.lr=1e400", "optim.lr=inf must be a finite number"),  # YAML 1.1 reads it as a string; float() overflows
    ("cost.usd_per_gpu_hour=-.inf", "cost.usd_per_gpu_hour=-inf must be a finite number"),
    ("optim.betas=[0.9, 1.5]", "optim.betas=(0.9, 1.5) must be two numbers in [0, 1)"),
    ("optim.eps=0", "optim.eps=0.0 must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2.0 must be in [0, 1]"),
    ("optim.schedule=step", "optim.schedule='step' must be 'cosine', 'constant' or 'wsd'"),
    ("optim.decay_fraction=0", "optim.decay_fraction=0.0 must be in (0, 1]"),
    ("optim.decay_shape=exp", "optim.decay_shape='exp' must be 'linear', 'cosine' or '1-sqrt'"),
    ("optim.optimizer=sgd", "optim.optimizer='sgd' must be 'adamw' or 'muon'"),
    ("optim.muon_momentum=1", "optim.muon_momentum=1.0 must be in [0, 1)"),
    ("optim.muon_ns_steps=0", "optim.muon_ns_steps=0 must be >= 1"),
    ("optim.muon_ns_dtype=fp16", "optim.muon_ns_dtype='fp16' must be 'auto', 'bf16' or 'fp32'"),
    ("data.image_size=30", "data.image_size=30 must be a multiple of MicroDiT_Nano_4's patch size"),
    ("data.image_size=8", "data.image_size=8 must be >= 16 for data.source=synthetic"),
    ("data.channels=4", "data.channels=4 must be 3 for data.source=synthetic"),
    ("data.caption_channels=0", "data.caption_channels=0 must be >= 1"),
    ("data.text_encoder=''", "data.text_encoder='' must name a text encoder"),
    ("data.resolution=0", "data.resolution=0 must be >= 1"),
    ("model.pos_interp_scale=0", "model.pos_interp_scale=0.0 must be > 0"),
    ("model.pixel_head=-2", "model.pixel_head=-2 must be >= -1"),
    ("run.name=''", "run.name='' must be a folder name"),
    ("run.name=a/b", "run.name='a/b' must be a folder name"),
    ("run.seed=-1", "run.seed=-1 must be >= 0"),
    ("train.sample_every=-1", "train.sample_every=-1 must be >= 0"),
    ("sample.prompts=[]", "sample.prompts=[] must hold at least one prompt"),
    ("sample.seed=-3", "sample.seed=-3 must be >= 0"),
    ("optim.lr=[1", "config override 'optim.lr=[1': the value is not valid YAML"),
    ("train=5", "config: train must be a mapping, got int"),
])
def test_bad_values_that_used_to_crash_or_run_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs/tiny_32px.yaml", [override])


@pytest.mark.parametrize("content,message", [
    (b"train:\n  steps: [1\n", r"bad.yaml: invalid YAML \(.* at line 3, column 1\)"),
    (b"run:\n  name: caf\xe9\n", r"bad.yaml: not UTF-8 text \(byte 0xe9 at offset 16\)"),
    (b"- a\n- b\n", r"bad.yaml: top level must be a mapping of sections, got list"),
])
def test_unreadable_config_files_are_named(tmp_path, content, message):
    (tmp_path / "bad.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "bad.yaml")


def test_world_size_must_divide_the_global_batch():
    cfg = load_config(ROOT / "configs/tiny_32px.yaml", ["train.global_batch=32", "train.micro_batch=16"])
    cfg.validate(world_size=2)
    with pytest.raises(ValueError, match="train.global_batch=32 must be divisible by train.micro_batch × world size"):
        cfg.validate(world_size=3)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_32px.yaml", ["optim.lr=5e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(cfg)


def test_config_diff_lists_changed_keys():
    a = load_config(ROOT / "configs/tiny_32px.yaml")
    b = load_config(ROOT / "configs/tiny_32px.yaml", ["train.steps=600", "optim.lr=1e-3"])
    assert config_diff(a, b) == ["optim.lr: 0.002 -> 0.001", f"train.steps: {a.train.steps} -> 600"]
    assert config_diff(a, a) == []


def test_every_config_key_is_documented():
    docs = field_docs()
    assert "optim.lr" in docs and docs["optim.lr"][1] == 1e-3
    undocumented = [key for key, (doc, _) in docs.items() if not doc]
    assert not undocumented, undocumented


NESTED = ["diffusion.resolutions=[16, 32]", "model.outer=Outer_Nano_4", "model.pixel_head=0"]  # nested: no head


@pytest.mark.parametrize("overrides,message", [
    (["diffusion.target=noise"], "diffusion.target='noise' must be one of: edm, x0, eps, v"),
    (["diffusion.weighting=p2"], "diffusion.weighting='p2' must be one of: edm, snr, sqrt_snr, uniform"),
    (["diffusion.sigma_range=[2.0]"], "diffusion.sigma_range=[2.0] must be [] or [lo, hi]"),
    (["diffusion.sigma_range=[2.0, 0.5]"], "diffusion.sigma_range=[2.0, 0.5] needs 0 < lo < hi"),
    (["diffusion.sigma_range=[0, null]"], "diffusion.sigma_range=[0.0, None] needs 0 < lo < hi"),
    (["model.patch_size=3"], "data.image_size=32 must be a multiple of MicroDiT_Nano_4's patch size"),
    (["model.patch_size=-1"], "model.patch_size=-1 must be >= 0"),
    (["diffusion.resolutions=[24]"], "diffusion.resolutions=[24] must each divide data.image_size=32"),
    (["diffusion.resolutions=[32, 16]"], "diffusion.resolutions=[32, 16] must be increasing"),
    (["diffusion.resolutions=[8, 16, 32]"], "must hold at most two resolutions"),
    (["diffusion.resolutions=[16]", "model.patch_size=32"],
     "diffusion.resolutions=[16] must start with a multiple of MicroDiT_Nano_4's patch size"),
    (["diffusion.resolutions=[16, 32]"], "model.outer='' names the outer stream of a nested model"),
    (["model.outer=Outer_Nano_4", "model.pixel_head=0"],
     "model.outer='Outer_Nano_4' names the outer stream of a nested model"),
    (NESTED[:1] + ["model.outer=Huge", "model.pixel_head=0"],
     "model.outer='Huge' must be empty or one of: Outer_Nano_4"),
    (["data.image_size=48", "diffusion.resolutions=[16, 48]", "model.outer=Outer_Nano_4", "model.patch_size=2",
      "model.pixel_head=0"],
     "must give an outer token grid that is a whole multiple of the inner one"),
    (NESTED + ["diffusion.resolution_loss_weights=[1.0]"],
     "diffusion.resolution_loss_weights=[1.0] must hold one weight per resolution (2"),
    (NESTED + ["diffusion.resolution_loss_weights=[0, 0]"], "must be >= 0 and not all 0"),
    (NESTED + ["diffusion.schedule_shift_power=-1"], "diffusion.schedule_shift_power=-1.0 must be >= 0"),
    (NESTED + ["sample.init=data_mean"], "sample.init='data_mean' must be 'noise' with diffusion.resolutions"),
    (["diffusion.resolutions=[16]", "sample.init=data_mean"], "sample.init='data_mean' must be 'noise' with"),
    (NESTED + ["diffusion.objective=init_step"], "diffusion.objective='init_step' must be 'edm' with"),
    (["model.experts=[hi]"], "model.experts=['hi'] must name at least two expert runs"),
    (["model.experts=[hi, hi]", "sample.expert_sigmas=[1.0]"], "model.experts=['hi', 'hi'] must be distinct"),
    (["model.experts=[tiny_32px, lo]", "sample.expert_sigmas=[1.0]"], "must be distinct run folder names other than"),
    (["model.experts=[hi, lo]"], "sample.expert_sigmas=[] must hold one noise level fewer than model.experts"),
    (["model.experts=[a, b, c]", "sample.expert_sigmas=[0.3, 2.0]"],
     "sample.expert_sigmas=[0.3, 2.0] must be > 0 and in descending order"),
    (["sample.expert_sigmas=[1.0]"], "sample.expert_sigmas=[1.0] must hold one noise level fewer"),
    (["model.experts=[hi, lo]", "sample.expert_sigmas=[1.0]", "diffusion.sigma_range=[1.0, null]"],
     "diffusion.sigma_range=[1.0, None] is set for each expert from sample.expert_sigmas"),
    (["model.pixel_head=16", "diffusion.mask_ratio=0.5"], "model.pixel_head=16 needs diffusion.mask_ratio=0"),
    (["diffusion.mask_ratio=0.5"], "model.pixel_head=32 needs diffusion.mask_ratio=0"),  # the recipe has a head
    (["model.pixel_head=0", "diffusion.mask_ratio=1.0"], "diffusion.mask_ratio=1.0 must be in"),
    (["model.pixel_head=0", "diffusion.mask_ratio=-0.1"], "diffusion.mask_ratio=-0.1 must be in"),
    (NESTED + ["model.pixel_head=16"], "model.pixel_head=16 is for single-stream models"),
    (["model.pooled_caption=false", "diffusion.objective=init_step"],
     "model.pooled_caption=False must be true with diffusion.objective=init_step"),
    (["model.pooled_caption=false", "model.name=DiT_XL_2"],
     "model.pooled_caption=False must be true for DiT_XL_2: without cross-attention"),
    (["train.init_prefix=inner"], "train.init_prefix='inner' must be empty or a submodule name ending in '.'"),
    (["train.init_prefix=inner."], "train.init_prefix='inner.' needs train.init_from"),
    (["train.init_from_ema=true"], "train.init_from_ema=True needs train.init_from"),
    (["train.init_resize_patches=true"], "train.init_resize_patches=True needs train.init_from"),
    (["diffusion.sigma_range=[a, b]"], "diffusion.sigma_range[0] expects"),
])
def test_bad_method_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs/tiny_32px.yaml", overrides)


def test_method_settings_that_work_load():
    for overrides in (NESTED + ["diffusion.resolution_loss_weights=[1, 2]", "diffusion.schedule_shift_power=2"],
                      ["diffusion.target=eps", "diffusion.weighting=sqrt_snr", "model.patch_size=8"],
                      ["model.experts=[hi, lo]", "sample.expert_sigmas=[0.3]"],
                      ["diffusion.sigma_range=[null, 0.3]"], ["diffusion.resolutions=[16]"]):
        load_config(ROOT / "configs/tiny_32px.yaml", overrides)


def test_a_wrong_value_in_an_optional_field_is_named():
    """int | None: a value of neither type is a ConfigError naming the key (it was a TypeError)."""
    with pytest.raises(ConfigError, match=re.escape("sample.nfe expects")):
        load_config(ROOT / "configs/tiny_32px.yaml", ["sample.nfe=abc"])


def test_the_super_resolution_stage_samples_on_phase_one():
    """The conditioned 32-px stage takes phase 1's run as its cascade's first stage, at phase 1's resolution, on the
    same data set and captions drawn at 32 px."""
    p1, sr = load_config(ROOT / "configs/tiny_reference_16px.yaml"), load_config(ROOT / "configs/tiny_reference_sr.yaml")
    assert sr.sample.init == "cascade" and sr.sample.cascade_run == f"{p1.run.out_dir}/{p1.run.name}"
    assert sr.diffusion.lowres_condition == p1.data.image_size and not (sr.diffusion.resolutions or
                                                                       p1.diffusion.resolutions)
    assert sr.data == dataclasses.replace(p1.data, image_size=32) and not sr.train.init_from


def test_the_default_is_the_32px_recipe_at_16px_with_muon():
    """tiny.yaml (the default) and tiny_32px.yaml (the methods' and tests' base) differ only in what makes the
    default a 16-px Muon run that fills its 10 minutes, and the learning rate, EMA decay and noise-level spread
    measured for that run: a key changed in one and not the other fails here."""
    assert config_diff(load_config(ROOT / "configs/tiny_32px.yaml"), load_config(ROOT / "configs/tiny.yaml")) == [
        "data.image_size: 32 -> 16", "diffusion.p_std: 1.4 -> 0.7", "model.pos_interp_scale: 1.0 -> 0.5",
        "optim.lr: 0.002 -> 0.003", "optim.optimizer: 'adamw' -> 'muon'", "run.name: 'tiny_32px' -> 'tiny'",
        "train.ckpt_every: 250 -> 400", "train.ema_decay: 0.995 -> 0.99", "train.global_batch: 32 -> 64",
        "train.micro_batch: 16 -> 32", "train.steps: 998 -> 2000"]
