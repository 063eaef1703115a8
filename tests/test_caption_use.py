"""Caption use (engine/eval/caption_use.py): attribute swaps change exactly one attribute, and the MSE ratio is exactly
1 for a word the network cannot see and moves off 1 for one it reads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.data.synthetic import COLOURS, SHAPES, SyntheticShapes, caption_of
from engine.eval.caption_use import ATTRIBUTES, caption_use, caption_use_table, changed_facts

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_changed_facts_change_that_attribute_of_every_group_and_nothing_else(attribute):
    ds = SyntheticShapes(60, 32, 1_000_000)
    seen = 0
    for i in range(60):
        facts = ds.describe(i)
        alt = changed_facts(facts, attribute)
        if attribute == "relation" and facts["relation"] is None:
            assert alt is None
            continue
        seen += 1
        assert caption_of(alt) != caption_of(facts)
        if attribute == "relation":
            assert alt["relation"] != facts["relation"] and alt["groups"] == facts["groups"]
            continue
        assert alt["relation"] == facts["relation"]
        for g, a in zip(facts["groups"], alt["groups"]):
            assert a[attribute] != g[attribute]
            assert {k: v for k, v in a.items() if k != attribute} == {k: v for k, v in g.items() if k != attribute}
    assert seen > 10


def word_embedder(words, channels: int = 384, length: int = 4):
    """A stand-in text encoder that sees only `words`: caption -> a vector naming the first of them it contains
    (the same vector for captions that differ in anything else)."""
    def embed(captions):
        y = torch.zeros(len(captions), length, channels)
        for b, c in enumerate(captions):
            k = next(i for i, w in enumerate(words) if w in c)
            y[b, :, k] = 3.0
            y[b, :, len(words) + k] = -2.0
        return y, None
    return embed


def network(trained: bool, pooled_to: int | None = None):
    from engine.config import load_config
    from engine.diffusion.edm import EDM
    from engine.training.network import build_run_network

    cfg = load_config(ROOT / "configs/tiny_32px.yaml")
    if pooled_to:  # trained on the 32-px set pooled to pooled_to px
        cfg.diffusion.resolutions, cfg.model.pos_interp_scale = [pooled_to], pooled_to / cfg.data.image_size
    torch.manual_seed(0)
    model = build_run_network(cfg, {})
    if trained:  # random weights everywhere: the output now depends on the caption
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return cfg, model, EDM.from_config(cfg.diffusion)


@pytest.mark.parametrize("words,used", [(list(COLOURS), "colour"), (list(SHAPES), "shape")])
def test_only_the_word_the_network_can_see_moves_the_ratio(words, used):
    cfg, model, edm = network(trained=True)
    res = caption_use(model, edm, cfg, word_embedder(words), num_images=12, sigmas=(0.5, 2.0), batch_size=5)
    for a, r in res["attributes"].items():
        means = [c["mean"] for c in r["ratio"]]
        if a == used:
            assert all(abs(m - 1.0) > 1e-4 for m in means), (a, means)  # untrained: the word moves D either way
        else:  # the changed caption embeds identically: the ratio is 1 (to float order of a smaller batch)
            assert means == pytest.approx([1.0, 1.0], abs=1e-6), (a, means)  # a smaller batch: float order
    assert res["attributes"]["relation"]["images"] == sum(
        SyntheticShapes(12, 32, 1_000_000).describe(i)["relation"] is not None for i in range(12))
    assert used in caption_use_table(res)


def test_a_model_trained_on_pooled_data_is_checked_on_pooled_images():
    cfg, model, edm = network(trained=True, pooled_to=16)
    res = caption_use(model, edm, cfg, word_embedder(list(COLOURS)), num_images=6, sigmas=(1.0,), batch_size=6)
    assert abs(res["attributes"]["colour"]["ratio"][0]["mean"] - 1.0) > 1e-4
    assert res["attributes"]["shape"]["ratio"][0]["mean"] == pytest.approx(1.0, abs=1e-6)


def test_a_fresh_network_ignores_its_caption():
    """Zero-initialised output layers: D = c_skip · x whatever the caption, so every ratio is exactly 1."""
    cfg, model, edm = network(trained=False)
    res = caption_use(model, edm, cfg, word_embedder(list(COLOURS)), num_images=6, sigmas=(1.0,), batch_size=6)
    assert all(r["ratio"][0]["mean"] == pytest.approx(1.0, abs=1e-12) for r in res["attributes"].values())
