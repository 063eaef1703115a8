"""The prompted-backgrounds variant of SyntheticShapes (SingDiffusion's brightness study): the default set unchanged
byte for byte, the variant's shapes equal the default's, its background is the one its caption names, captions fit
the caption length, and the GenEval-style detector reads it with an estimated background."""
import hashlib

import numpy as np
import pytest
import torch

from engine.data.synthetic import BACKGROUND, PROMPTED_BACKGROUNDS, SyntheticShapes
from engine.eval.geneval import GenEvalScorer, ShapeDetector, parse_prompt

# sha256 of images(range(500)) bytes + "\n".join(captions) of SyntheticShapes(500, 32, 7), recorded with the
# engine's synthetic.py before the variant existed (main at 69cbe9d)
DEFAULT_FINGERPRINT = "34b2f2271b5f324fb5ab1fad5f34f65f6e47295d8527c3207d6e196913ddd530"


def fingerprint(ds: SyntheticShapes) -> str:
    h = hashlib.sha256()
    h.update(ds.images(range(500)).numpy().tobytes())
    h.update("\n".join(ds.captions(range(500))).encode())
    return h.hexdigest()


def test_default_set_is_byte_identical():
    assert fingerprint(SyntheticShapes(500, 32, 7)) == DEFAULT_FINGERPRINT
    assert fingerprint(SyntheticShapes(500, 32, 7, "fixed")) == DEFAULT_FINGERPRINT
    assert fingerprint(SyntheticShapes(500, 32, 7, "prompted")) != DEFAULT_FINGERPRINT


def test_prompted_backgrounds_keep_the_shapes_and_name_the_background():
    fixed, prompted = SyntheticShapes(300, 32, 3), SyntheticShapes(300, 32, 3, "prompted")
    a, b = fixed.images(range(300)), prompted.images(range(300))
    seen = set()
    for i in range(300):
        facts = prompted.describe(i)
        name = facts["background"]
        seen.add(name)
        assert prompted.caption(i) == f"{fixed.caption(i)} on a {name} background"
        assert facts["groups"] == fixed.describe(i)["groups"]
        if name == "white":
            assert all(g["colour"] != "white" for g in facts["groups"])  # never white on white
        bg_fixed = torch.tensor(BACKGROUND).view(3, 1, 1) / 127.5 - 1
        is_bg = (a[i] == bg_fixed).all(0)  # (H, W) background pixels of the default image
        want = torch.tensor(PROMPTED_BACKGROUNDS[name], dtype=torch.float32).view(3, 1) / 127.5 - 1
        assert torch.equal(b[i][:, is_bg], want.expand(3, int(is_bg.sum())))
        assert torch.equal(b[i][:, ~is_bg], a[i][:, ~is_bg])  # the shapes' pixels are the default's
    assert seen == set(PROMPTED_BACKGROUNDS)
    assert torch.equal(SyntheticShapes(300, 32, 3, "prompted").images([5, 17]), b[[5, 17]])  # deterministic
    with pytest.raises(ValueError, match="backgrounds must be one of"):
        SyntheticShapes(10, 32, 0, "random")


def test_prompted_captions_fit_the_caption_length():
    from transformers import AutoTokenizer

    from engine.config import DataConfig
    from engine.encoders.text_encoder import resolve_text_encoder_path

    d = DataConfig()
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder_path(d.text_encoder))  # the encoder's own
    captions = sorted(set(SyntheticShapes(4096, 32, 0, "prompted").captions(range(4096))))
    longest = max(len(ids) for ids in tokenizer(captions)["input_ids"])
    assert longest <= d.caption_len, longest  # nothing is cut off at data.caption_len


def test_geneval_estimates_each_images_background():
    ds = SyntheticShapes(300, 32, 5, "prompted")
    captions = ds.captions(range(300))
    assert parse_prompt(captions[0]) == parse_prompt(SyntheticShapes(300, 32, 5).caption(0))
    noise = 0.05 * torch.randn(300, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    brighter = (ds.images(range(300)) + noise + 0.15).clamp(-1, 1)  # a brightness bias, as samplers leave one
    grey = [i for i in range(300) if ds.describe(i)["background"] == "grey"]
    scores = {}
    for mode in ("fixed", "estimate"):
        scorer = GenEvalScorer(ShapeDetector(background=mode))
        scorer.update(brighter, captions)
        scores[mode] = (scorer.result().all, np.mean([scorer.records[i]["all"] for i in grey]))
    assert scores["estimate"][0] >= 0.95 and scores["estimate"][1] >= 0.95
    assert scores["fixed"][1] < 0.8  # the dark reference background misreads brightened grey images
    with pytest.raises(ValueError, match="background must be"):
        ShapeDetector(background="median")
