"""The four MicroDiT phase configs against the official run (SonyResearch/micro_diffusion, configs/res_*.yaml and
micro_diffusion/models/model.py): the learning rate at the start, the end of warmup, mid-run and the last step, and
every other setting of the recipe, phase by phase.

OFFICIAL holds the official files' numbers as data; `official_lr` evaluates them with the definitions of the
Composer schedulers the official trainer uses, written here independently of engine/training/optim.py."""
import math
from pathlib import Path

import pytest

from engine.config import load_config
from engine.training.ema import ema_decay_at
from engine.training.optim import lr_factor

ROOT = Path(__file__).resolve().parents[1]

# Per phase: the official YAML's optimizer, scheduler (kind, t_warmup, alpha_f), duration of this phase in steps
# (phases 2 and 4 resume the previous phase's batch count: 280K - 250K and 55K - 50K), gradient clip, EDM noise,
# mask ratio, and EMA (smoothing, first step counted within the phase; None = the phase keeps none).
OFFICIAL = {
    "microdit_xl_256_masked.yaml": dict(  # res_256_pretrain.yaml
        lr=2.4e-4, schedule=("cosine_with_warmup", 2500, 0.33), steps=250_000, clip=0.25, p=(-0.6, 1.2),
        mask=0.75, ema=None, micro_batch=256, input_size=32, pos_interp_scale=1.0),
    "microdit_xl_256.yaml": dict(  # res_256_finetune.yaml
        lr=8e-5, schedule=("constant", 0, 1.0), steps=280_000 - 250_000, clip=0.25, p=(-0.6, 1.2),
        mask=0.0, ema=None, micro_batch=64, input_size=32, pos_interp_scale=1.0),
    "microdit_xl_512_masked.yaml": dict(  # res_512_pretrain.yaml (weights only: its batch count starts at 0)
        lr=8e-5, schedule=("constant_with_warmup", 500, 1.0), steps=50_000, clip=0.5, p=(0.0, 0.6),
        mask=0.75, ema=(0.99975, 25_000), micro_batch=32, input_size=64, pos_interp_scale=2.0),
    "microdit_xl_512.yaml": dict(  # res_512_finetune.yaml: ema_start 1000ba is long past at the restored 50K
        lr=8e-5, schedule=("constant", 0, 1.0), steps=55_000 - 50_000, clip=0.5, p=(0.0, 0.6),
        mask=0.0, ema=(0.9975, 0), micro_batch=16, input_size=64, pos_interp_scale=2.0),
}
# Shared by every phase: AdamW, EDM's sigma_data for SDXL latents, the batch, caption dropout and the text encoder.
COMMON = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, sigma_data=0.9, global_batch=2048, caption_dropout=0.1,
              text_encoder="apple/DFN5B-CLIP-ViT-H-14-378", caption_len=77, caption_channels=1024)


def official_lr(step: int, phase: dict) -> float:
    """Composer's schedulers at batch count `step`: linear warmup from 0, then cosine to alpha_f or constant."""
    kind, warmup, alpha_f = phase["schedule"]
    if step < warmup:
        return phase["lr"] * step / warmup
    if kind == "cosine_with_warmup":
        frac = min((step - warmup) / (phase["steps"] - warmup), 1.0)
        return phase["lr"] * (alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * frac)))
    return phase["lr"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_learning_rate_follows_the_official_schedule(name):
    cfg, phase = load_config(ROOT / "configs" / name), OFFICIAL[name]
    assert cfg.train.steps == phase["steps"]
    warmup = phase["schedule"][1]
    for step in sorted({0, warmup, cfg.train.steps // 2, cfg.train.steps - 1}):
        ours = cfg.optim.lr * lr_factor(step, cfg.train.steps, cfg.optim)
        assert ours == pytest.approx(official_lr(step, phase), rel=1e-12, abs=1e-15), (name, step)


def test_phase_one_ends_where_phase_two_starts():
    """The cosine's floor is phase 2's constant rate (2.4e-4 · 0.33 ≈ 8e-5): no jump back up between phases."""
    p1, p2 = (load_config(ROOT / "configs" / n) for n in ("microdit_xl_256_masked.yaml", "microdit_xl_256.yaml"))
    end = p1.optim.lr * lr_factor(p1.train.steps, p1.train.steps, p1.optim)
    assert end == pytest.approx(p2.optim.lr, rel=0.02)


@pytest.mark.parametrize("name", OFFICIAL)
def test_every_other_setting_matches_the_official_phase(name):
    cfg, phase = load_config(ROOT / "configs" / name), OFFICIAL[name]
    o, d, t, data = cfg.optim, cfg.diffusion, cfg.train, cfg.data
    assert (o.betas, o.eps, o.weight_decay) == (COMMON["betas"], COMMON["eps"], COMMON["weight_decay"])
    assert o.decay_norms_and_biases and cfg.model.init == "official"  # the official AdamW groups and weight init
    assert o.grad_clip == phase["clip"] and (d.p_mean, d.p_std) == phase["p"] and d.mask_ratio == phase["mask"]
    assert d.sigma_data == COMMON["sigma_data"]
    assert (t.global_batch, t.micro_batch) == (COMMON["global_batch"], phase["micro_batch"])
    assert not t.reshard_after_forward and t.reduce_dtype == "fp32"  # FSDP SHARD_GRAD_OP, fp32 gradient sums
    assert t.compile  # misc.compile: true in every official phase
    assert (data.image_size, cfg.model.pos_interp_scale) == (phase["input_size"], phase["pos_interp_scale"])
    assert (data.caption_dropout, data.text_encoder) == (COMMON["caption_dropout"], COMMON["text_encoder"])
    assert (data.caption_len, data.caption_channels) == (COMMON["caption_len"], COMMON["caption_channels"])
    if phase["ema"] is None:  # no EMA: the "EMA" used for samples is the weights themselves at every step
        assert all(ema_decay_at(s, t.ema_decay, t.ema_start) == 0.0 for s in (0, t.steps // 2, t.steps - 1))
    else:
        smoothing, start = phase["ema"]
        assert ema_decay_at(start, t.ema_decay, t.ema_start) == smoothing
        assert start == 0 or ema_decay_at(start - 1, t.ema_decay, t.ema_start) == 0.0


def test_the_official_moe_learning_rate_rule_matches_no_parameter():
    """The official train.py halves the lr of parameters whose name contains 'moe'. Our parameter names are the
    official ones (tests/test_convert.py), and none contains it: the rule never applies, there or here (README)."""
    import torch

    from models.sizes import build_model, model_config

    with torch.device("meta"):
        names = [n for n, _ in build_model(model_config("MicroDiT_XL_2")).named_parameters()]
    assert len(names) > 100 and not [n for n in names if "moe" in n.lower()]

