"""Evaluation: Fréchet distance (closed forms, streaming), feature extractors (tiny TorchScript "Inception", tiny
random transformers vision models), CLIP score arithmetic, the GenEval-style detector, and engine/evaluate.py end to
end on a tiny trained run. Everything offline; tiny models are built from configs."""
import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.synthetic import BACKGROUND, COLOURS, SHAPES, SyntheticShapes, shape_mask
from engine.eval.fid import (FeatureStats, HFVisionFeatures, InceptionTorchScript, as_uint8_nchw, build_extractor,
                             fid_from_stats, frechet_distance, sqrtm_psd)
from engine.eval.geneval import (Detection, GenEvalScorer, Group, PromptSpec, ShapeDetector, classify_shape,
                                 connected_components, geneval_score, label_colours, parse_prompt, score_image,
                                 shape_template, spec_from_describe)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("a two three red green blue yellow white purple circle circles square squares triangle triangles "
         "left of above").split()


def random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_closed_forms():
    d = 12
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    shift = torch.randn(d, generator=g, dtype=torch.float64)
    s = random_spd(d, 1)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(float(shift @ shift), rel=1e-9)
    # S2 = c^2 S1: tr(S1 + c^2 S1 - 2 c S1) = (1 - c)^2 tr(S1)
    assert frechet_distance(mu, s, mu, 9 * s) == pytest.approx(4 * float(torch.trace(s)), rel=1e-9)
    # diagonal (commuting) covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64)
    want = float(shift @ shift + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu, torch.diag(a), mu + shift, torch.diag(b)) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_general_case_matches_an_independent_route():
    """tr sqrt(S1 S2) from the eigenvalues of the (non-symmetric) product, computed in numpy."""
    s1, s2 = random_spd(8, 2).numpy(), random_spd(8, 3).numpy()
    mu1, mu2 = np.arange(8.0), np.ones(8)
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    torch.testing.assert_close(sqrtm_psd(torch.from_numpy(s1)) @ sqrtm_psd(torch.from_numpy(s1)),
                               torch.from_numpy(s1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, s1, mu2[:4], s2[:4, :4])


def test_feature_sets_identical_give_zero_and_a_shift_gives_its_square():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3 + 1
    d = torch.linspace(-1, 2, 16, dtype=torch.float64)
    a = FeatureStats.of(x)
    assert abs(fid_from_stats(a, FeatureStats.of(x))) < 1e-8
    assert fid_from_stats(a, FeatureStats.of(x + d)) == pytest.approx(float(d @ d), rel=1e-8)
    assert fid_from_stats(FeatureStats.of(x[:250]), FeatureStats.of(x[250:] + 5)) > 16 * 25 * 0.9
    with pytest.raises(ValueError, match="one extractor"):
        fid_from_stats(FeatureStats.of(x, "a"), FeatureStats.of(x, "b"))


def test_streaming_statistics_equal_one_shot(tmp_path):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(301, 10, generator=g, dtype=torch.float64) * 0.01 + 1e4  # large mean, small spread
    stats, i = FeatureStats("x"), 0
    for size in [1, 0, 7, 100, 2, 191]:
        stats.update(x[i:i + size])
        i += size
    assert stats.n == 301
    ref = torch.from_numpy(np.cov(x.numpy(), rowvar=False))
    torch.testing.assert_close(stats.mean, x.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.cov, ref, rtol=1e-7, atol=1e-14)
    torch.testing.assert_close(FeatureStats.of(x).cov, ref, rtol=1e-7, atol=1e-14)
    with pytest.raises(ValueError, match="width"):
        stats.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats.of(x[:1]).cov
    # .npz roundtrip, and pytorch-fid's format (mu + sigma only)
    loaded = FeatureStats.load(stats.save(tmp_path / "s.npz"))
    assert loaded.n == 301 and loaded.extractor == "x"
    torch.testing.assert_close(loaded.cov, stats.cov)
    np.savez(tmp_path / "pf.npz", mu=stats.mean.numpy(), sigma=stats.cov.numpy())
    pf = FeatureStats.load(tmp_path / "pf.npz")
    assert pf.n is None and pf.extractor == "" and abs(fid_from_stats(pf, stats)) < 1e-6
    np.savez(tmp_path / "bad.npz", mean=stats.mean.numpy())
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        FeatureStats.load(tmp_path / "bad.npz")


# ---------------------------------------------------------------- feature extractors


class TinyInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: same call convention (float [0, 255] NCHW, return_features) and
    its own resize. Features = per-channel input means (to check the input convention) + conv features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 13, 3, stride=2)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        means = x.mean((2, 3))
        x = torch.nn.functional.interpolate(x, size=(29, 29), mode="bilinear", align_corners=False)
        f = torch.cat([means, self.conv((x - 128) / 128).relu().mean((2, 3))], 1)
        return f if return_features else f.softmax(-1)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-tiny.pt"
    torch.jit.script(TinyInception()).save(str(path))
    return path


def test_torchscript_inception_convention(inception_file):
    ds = SyntheticShapes(10, 32, 0)
    u8 = np.stack([ds.image_uint8(i) for i in range(10)])  # (B, H, W, 3)
    ex = InceptionTorchScript(inception_file, batch_size=4)
    assert "inception-tiny.pt@sha256:" in ex.name and "float[0-255]" in ex.name and "return_features" in ex.name
    f = ex(u8)
    assert f.shape == (10, 16)
    x255 = torch.from_numpy(u8).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(f[:, :3], x255.mean((2, 3)))  # it saw [0, 255] RGB
    torch.testing.assert_close(f, torch.jit.load(str(inception_file))(x255, return_features=True))
    torch.testing.assert_close(ex(ds.images(range(10))), f)  # float [-1, 1] input: same features
    ex01 = InceptionTorchScript(inception_file, input_range="0-1")
    torch.testing.assert_close(ex01(u8)[:, :3], x255.mean((2, 3)) / 255)
    ex_resized = InceptionTorchScript(inception_file, resize=64)
    assert "resize=64" in ex_resized.name and ex_resized(u8).shape == (10, 16)
    plain = InceptionTorchScript(inception_file, call_kwargs={})  # classifier output: softmax sums to 1
    torch.testing.assert_close(plain(u8).sum(1), torch.ones(10))
    with pytest.raises(FileNotFoundError, match="--inception"):
        InceptionTorchScript(inception_file.parent / "missing.pt")
    with pytest.raises(ValueError, match="exactly one"):
        build_extractor()


def small_vision(**kw):
    return dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                patch_size=8, **kw)


def test_hf_vision_features_without_and_with_an_image_processor(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**small_vision())).eval()
    model.save_pretrained(tmp_path / "clipv")
    u8 = np.random.default_rng(0).integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    ex = HFVisionFeatures(str(tmp_path / "clipv"), batch_size=2)
    assert "CLIPVisionModel" in ex.name and "resize32-bicubic" in ex.name
    f = ex(u8)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=32, mode="bicubic", antialias=True).clamp(0, 255) / 255
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        ref = model(pixel_values=(x - mean.view(3, 1, 1)) / std.view(3, 1, 1)).pooler_output
    torch.testing.assert_close(f, ref)
    proc = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(tmp_path / "clipv")
    ex2 = HFVisionFeatures(str(tmp_path / "clipv"))
    assert "ImageProcessor" in ex2.name
    with torch.no_grad():
        ref2 = model(pixel_values=proc(images=list(u8), return_tensors="pt")["pixel_values"]).pooler_output
    torch.testing.assert_close(ex2(u8), ref2)


def test_hf_vision_features_dinov2_and_full_clip_checkpoint(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    dino = tf.Dinov2Model(tf.Dinov2Config(**small_vision())).eval()
    dino.save_pretrained(tmp_path / "dino")
    u8 = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ex = HFVisionFeatures(str(tmp_path / "dino"))
    assert "Dinov2Model" in ex.name and ex(u8).shape == (3, 32)
    x = as_uint8_nchw(u8).float() / 255
    with torch.no_grad():  # no processor saved: ImageNet normalization, the saved weights, the pooled output
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        torch.testing.assert_close(ex(u8), dino(pixel_values=(x - mean) / std).pooler_output)
    clip = tf.CLIPModel(tf.CLIPConfig(text_config=dict(vocab_size=30, hidden_size=32, intermediate_size=37,
                                                       num_hidden_layers=1, num_attention_heads=2),
                                      vision_config=small_vision(), projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")
    ex = HFVisionFeatures(str(tmp_path / "clip"))
    assert "class=CLIPVisionModel" in ex.name
    with torch.no_grad():
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
        ref = clip.vision_model(pixel_values=(x - mean) / std).pooler_output
    torch.testing.assert_close(ex(u8), ref)  # vision tower weights really loaded from the full checkpoint


# ---------------------------------------------------------------- CLIP score


def save_tiny_clip(folder: Path, with_processor: bool = True):
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = tf.BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    model = tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=len(tokens), max_position_embeddings=32, bos_token_id=2, eos_token_id=3,
                         hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
        vision_config=small_vision(), projection_dim=16)).eval()
    model.save_pretrained(folder)
    if with_processor:
        tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return model, tok


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "clip"
    model, tok = save_tiny_clip(folder)
    return folder, model, tok


def test_clip_score_arithmetic_matches_a_direct_computation(tiny_clip):
    import transformers as tf

    from engine.eval.clip_score import CLIPScorer

    folder, model, tok = tiny_clip
    ds = SyntheticShapes(12, 32, 1)
    u8, caps = np.stack([ds.image_uint8(i) for i in range(12)]), ds.captions(range(12))
    scorer = CLIPScorer(str(folder), batch_size=5)
    s = scorer.scores(u8, caps)
    assert s.shape == (12,) and (s >= 0).all() and (s <= 100).all()
    # direct: one forward of CLIPModel on all pairs; its normalised embeddings give the full similarity matrix
    px = tf.CLIPImageProcessor.from_pretrained(folder)(images=list(u8), return_tensors="pt")["pixel_values"]
    t = tok(caps, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=px)
    sim = out.image_embeds @ out.text_embeds.T  # (12, 12) cosines
    torch.testing.assert_close(s, 100 * sim.diag().clamp_min(0), atol=1e-4, rtol=1e-4)
    assert scorer(u8, caps) == pytest.approx(float(100 * sim.diag().clamp_min(0).mean()), abs=1e-4)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = scorer.scores(u8, [caps[p] for p in perm])
    torch.testing.assert_close(shuffled, 100 * sim[torch.arange(12), perm].clamp_min(0), atol=1e-4, rtol=1e-4)
    assert (sim < 0).any() or (sim > 0).all()  # a random model: the clamp at 0 is exercised or harmless
    with pytest.raises(ValueError, match="captions"):
        scorer.scores(u8, caps[:3])


def test_clip_score_without_image_processor_uses_clip_normalisation(tmp_path, tiny_clip):
    from engine.eval.clip_score import CLIPScorer

    model, tok = save_tiny_clip(tmp_path / "noproc", with_processor=False)
    u8 = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    scorer = CLIPScorer(str(tmp_path / "noproc"))
    assert scorer.processor is None
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    px = (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 - mean) / std
    caps = ["a red circle"] * 4
    t = tok(caps, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=px)
    want = 100 * (out.image_embeds * out.text_embeds).sum(-1).clamp_min(0)
    torch.testing.assert_close(scorer.scores(u8, caps), want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- GenEval-style detector


def real_set(n: int, size: int = 32, seed: int = 11):
    ds = SyntheticShapes(n, size, seed)
    return ds, np.stack([ds.image_uint8(i) for i in range(n)]), ds.captions(range(n))


def test_parse_prompt_reads_every_dataset_caption_and_variants():
    ds = SyntheticShapes(300, 32, 3)
    for i in range(300):
        assert parse_prompt(ds.caption(i)) == spec_from_describe(ds.describe(i)), ds.caption(i)
    red2, blue1 = Group("red", "circle", 2), Group("blue", "square", 1)
    assert parse_prompt("Two red circles left of a blue square.") == PromptSpec((red2, blue1), "left of")
    assert parse_prompt("a photo of a blue square right of two red circles") == PromptSpec((red2, blue1), "left of")
    assert parse_prompt("a blue square below 2 red circles") == PromptSpec((red2, blue1), "above")
    assert parse_prompt("three white triangles") == PromptSpec((Group("white", "triangle", 3),), None)
    for bad in ["a cat", "two red circles next to a blue square", "a pink circle", "zero red circles", ""]:
        assert parse_prompt(bad) is None, bad


def test_shape_templates_match_the_dataset_and_classify():
    for d in range(2, 40):
        for shape in SHAPES:
            assert np.array_equal(shape_template(shape, d, d), shape_mask(shape, d)), (shape, d)
    for shape in SHAPES:
        for h, w in [(6, 6), (9, 14), (20, 11), (48, 48)]:
            assert classify_shape(shape_template(shape, h, w)) == (shape, 1.0)
    assert classify_shape(np.eye(12, dtype=bool))[1] < 0.6  # a diagonal line is no shape


def test_colour_labels_of_palette_pixels_blends_and_noise():
    palette = [BACKGROUND, *COLOURS.values()]
    img = np.array([palette], dtype=np.uint8)  # (1, 7, 3)
    assert label_colours(img[None], 60).tolist() == [[list(range(7))]]
    bg, red = np.array(BACKGROUND, float), np.array(COLOURS["red"], float)
    blends = np.array([[bg + a * (red - bg) for a in (0.2, 0.45, 0.55, 0.8)]]).round().astype(np.uint8)
    assert label_colours(blends[None], 60).tolist() == [[[0, 0, 1, 1]]]  # edges of anti-aliased objects
    grey = np.full((1, 1, 1, 3), 128, np.uint8)  # far from every background-to-colour blend
    assert label_colours(grey, 60).tolist() == [[[0]]]


def bfs_components(colour_idx: np.ndarray, connectivity: int) -> int:
    h, w = colour_idx.shape
    seen, count = np.zeros_like(colour_idx, bool), 0
    nbrs = [(0, 1), (1, 0), (0, -1), (-1, 0)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if connectivity == 8 else [])
    for y in range(h):
        for x in range(w):
            if colour_idx[y, x] == 0 or seen[y, x]:
                continue
            count += 1
            seen[y, x] = True
            q = deque([(y, x)])
            while q:
                cy, cx = q.popleft()
                for dy, dx in nbrs:
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and colour_idx[ny, nx] == colour_idx[cy, cx]:
                        seen[ny, nx] = True
                        q.append((ny, nx))
    return count


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_match_a_bfs(connectivity):
    rng = np.random.default_rng(connectivity)
    idx = rng.integers(0, 3, (6, 17, 13)) * (rng.random((6, 17, 13)) < 0.6)
    labels = connected_components(idx, connectivity)
    for b in range(6):
        lab = labels[b]
        assert ((lab > 0) == (idx[b] > 0)).all()
        assert len(np.unique(lab[lab > 0])) == bfs_components(idx[b], connectivity)
        for v in np.unique(lab[lab > 0]):  # one colour per component
            assert len(np.unique(idx[b][lab == v])) == 1
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(idx, 6)


def test_detector_finds_every_object_of_real_images():
    ds, u8, _ = real_set(24, 40)
    dets = ShapeDetector().detect(u8)
    for i, found in enumerate(dets):
        facts = ds.describe(i)
        want = sorted((g["colour"], g["shape"], d) for g in facts["groups"] for (_, _, d) in g["boxes"])
        assert sorted((d.colour, d.shape, d.box[2]) for d in found) == want
        boxes = sorted((x0, y0) for g in facts["groups"] for (x0, y0, _) in g["boxes"])
        assert sorted(d.box[:2] for d in found) == boxes
        assert all(d.shape_iou == 1.0 for d in found)


def test_score_image_rules():
    def det(colour, shape, x, y):
        return Detection(colour, shape, 30, (int(x) - 3, int(y) - 3, 6, 6), (float(x), float(y)), 1.0)

    spec = PromptSpec((Group("red", "circle", 2), Group("blue", "square", 1)), "left of")
    good = [det("red", "circle", 5, 5), det("red", "circle", 5, 20), det("blue", "square", 25, 12)]
    assert score_image(spec, good, (32, 32)) == dict(colour=True, shape=True, count=True, position=True, all=True)
    r = score_image(spec, good[1:], (32, 32))  # one red circle missing
    assert r["count"] is False and r["colour"] and r["shape"] and r["position"] and r["all"] is False
    r = score_image(spec, [det("red", "circle", 28, 5), good[1], good[2]], (32, 32))  # one red circle right of blue
    assert r["position"] is False and r["count"] and r["all"] is False
    r = score_image(spec, [det("red", "square", 5, 5), det("red", "square", 5, 20), good[2]], (32, 32))
    assert r["colour"] and not r["shape"] and not r["count"] and not r["position"]
    above = PromptSpec((Group("red", "circle", 1), Group("blue", "square", 1)), "above")
    assert score_image(above, [det("red", "circle", 20, 4), det("blue", "square", 4, 25)], (32, 32))["position"]
    assert not score_image(above, [det("red", "circle", 4, 25), det("blue", "square", 20, 4)], (32, 32))["position"]
    one = PromptSpec((Group("green", "triangle", 1),), None)
    r = score_image(one, [det("green", "triangle", 9, 9), det("white", "circle", 20, 20)], (32, 32))
    assert r["position"] is None and r["all"]  # objects outside the prompt do not count against it
    assert score_image(one, [], (32, 32)) == dict(colour=False, shape=False, count=False, position=None, all=False)


def test_geneval_real_images_near_100_and_noise_near_0():
    ds, u8, caps = real_set(200)
    res = geneval_score(u8, caps, batch_size=64)
    assert res.num_images == 200 and res.num_unparsed == 0 and res.num_position > 50
    assert res.all >= 0.95 and min(res.colour, res.shape, res.count, res.position) >= 0.95
    res_f = geneval_score(ds.images(range(20)), caps[:20])  # float [-1, 1] input reads the same
    assert res_f.per_image == res.per_image[:20]
    rng = np.random.default_rng(0)
    for noise in [rng.integers(0, 256, u8.shape, dtype=np.uint8),
                  np.clip(rng.normal(128, 60, u8.shape), 0, 255).astype(np.uint8)]:
        r = geneval_score(noise, caps)
        assert r.all <= 0.10 and r.colour <= 0.10 and r.shape <= 0.10 and r.count <= 0.10 and r.position <= 0.10
    # mild pixel noise on real images is tolerated
    noisy = np.clip(u8 + rng.normal(0, 15, u8.shape), 0, 255).astype(np.uint8)
    assert geneval_score(noisy, caps).all >= 0.95


def test_geneval_each_component_fails_alone():
    ds, u8, caps = real_set(200, seed=12)
    i = next(k for k in range(200) if ds.describe(k)["relation"] and ds.describe(k)["groups"][0]["count"] >= 2)
    facts, img = ds.describe(i), u8[i].copy()
    x0, y0, d = facts["groups"][0]["boxes"][0]
    img[y0:y0 + d, x0:x0 + d] = BACKGROUND  # erase one object of the first group
    rec = GenEvalScorer().update(img[None], [caps[i]])[0]
    assert rec["colour"] and rec["shape"] and rec["position"] and not rec["count"] and not rec["all"]
    j = next(k for k in range(200) if ds.describe(k)["relation"] == "left of")
    mirrored = np.ascontiguousarray(u8[j][:, ::-1])  # shapes are left-right symmetric: only the relation breaks
    rec = GenEvalScorer().update(mirrored[None], [caps[j]])[0]
    assert rec["colour"] and rec["shape"] and rec["count"] and not rec["position"] and not rec["all"]
    recolour = u8[j].copy()
    g = ds.describe(j)["groups"][1]
    other = next(c for c in COLOURS if c not in (g["colour"], ds.describe(j)["groups"][0]["colour"]))
    recolour[(recolour == COLOURS[g["colour"]]).all(-1)] = COLOURS[other]
    rec = GenEvalScorer().update(recolour[None], [caps[j]])[0]
    assert not rec["colour"] and not rec["shape"] and not rec["count"] and not rec["position"]
    scorer = GenEvalScorer()
    scorer.update(u8[:4], [caps[0], "a cat", caps[2], caps[3]])
    assert scorer.result().num_unparsed == 1 and scorer.result().num_images == 3


# ---------------------------------------------------------------- the CLI, end to end


def test_eval_modules_import_without_heavy_deps():
    code = ("import sys, engine.eval.fid, engine.eval.geneval, engine.eval.clip_score; "
            "bad = {'transformers', 'PIL', 'matplotlib', 'diffusers'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.slow
def test_evaluate_cli_end_to_end(short_runs, inception_file, tiny_clip, tmp_path):
    tiny_run = short_runs / "a"
    out = tmp_path / "eval"
    cmd = [sys.executable, str(ROOT / "engine" / "evaluate.py"), "--run", str(tiny_run), "--num-images", "8",
           "--steps", "2", "--cfg", "2.0", "--seed", "3", "--batch-size", "5", "--inception", str(inception_file),
           "--features", str(tiny_clip[0]), "--clip", str(tiny_clip[0]), "--out", str(out), "--save-images",
           "--caption-use", "--train-gap", "--check-sigmas", "0.5,80"]
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "eval.json").read_text())
    assert r["checkpoint"].endswith("step_00000002") and r["step"] == 2 and r["weights"] == "ema"
    assert (r["num_images"], r["steps"], r["cfg_scale"], r["seed"]) == (8, 2, 2.0, 3)
    assert r["prompts"]["source"] == "synthetic" and r["prompts"]["data_seed"] == 1_000_000 and r["date"]
    g = r["metrics"]["geneval"]
    assert g["num_images"] == 8 and all(0 <= g[k] <= 1 for k in ["colour", "shape", "count", "all"])
    fid = r["metrics"]["fid"]
    assert set(fid) == {"inception", "features"}
    assert "inception-tiny.pt@sha256:" in fid["inception"]["extractor"]
    assert "CLIPVisionModel" in fid["features"]["extractor"]
    for f in fid.values():
        assert f["value"] >= 0 and f["num_generated"] == 8 and f["num_reference"] == 8 and f["reference"] == "synthetic"
    c = r["metrics"]["clip_score"]
    assert 0 <= c["value"] <= 100 and c["num_images"] == 8 and c["model"] == str(tiny_clip[0])
    assert (out / "grid.png").stat().st_size > 0 and len(list((out / "images").glob("*.png"))) == 8
    assert len((out / "geneval.jsonl").read_text().splitlines()) == 8
    use = r["metrics"]["caption_use"]
    assert use["sigmas"] == [0.5, 80.0] and r["metrics"]["train_gap"]["sigmas"] == [0.5, 80.0]
    assert use["num_images"] == 8 and set(use["attributes"]) == {"colour", "shape", "count", "relation"}
    assert all(len(a["ratio"]) == len(use["sigmas"]) and a["ratio"][0]["mean"] > 0 for a in use["attributes"].values())
    gap = r["metrics"]["train_gap"]
    assert 0 < gap["num_images"] <= 8 and len(gap["ratio"]) == len(gap["sigmas"]) and all(x > 0 for x in gap["ratio"])

    # in-process, same images: the reference statistics reused from the .npz give the same FID
    from engine.evaluate import main

    again = main(["--run", str(tiny_run), "--num-images", "8", "--steps", "2", "--cfg", "2.0", "--seed", "3",
                  "--batch-size", "5", "--inception", str(inception_file), "--no-geneval", "--grid", "0",
                  "--reference", str(out / "reference_inception.npz"), "--out", str(tmp_path / "b")])
    assert again["metrics"]["fid"]["inception"]["value"] == pytest.approx(fid["inception"]["value"], rel=1e-6)
    assert "geneval" not in again["metrics"] and not (tmp_path / "b" / "grid.png").exists()
    # ... and really read from that file: a reference mean moved by delta adds about |delta|^2 to the FID
    from engine.eval.fid import FeatureStats

    ref = FeatureStats.load(out / "reference_inception.npz")
    delta = 1e5  # large enough that the cross term 2·(mu_gen - mu_ref)·delta stays under 1% of |delta|^2
    ref.mean = ref.mean + delta
    shifted = ref.save(tmp_path / "shifted.npz")
    moved = main(["--run", str(tiny_run), "--num-images", "8", "--steps", "2", "--cfg", "2.0", "--seed", "3",
                  "--batch-size", "5", "--inception", str(inception_file), "--no-geneval", "--grid", "0",
                  "--reference", str(shifted), "--out", str(tmp_path / "c")])["metrics"]["fid"]["inception"]
    assert str(shifted) in moved["reference"]
    expected = fid["inception"]["value"] + delta**2 * ref.mean.numel()
    assert moved["value"] == pytest.approx(expected, rel=1e-2)


def test_folder_reference_resizes_and_reports_unreadable_files(tmp_path, inception_file):
    from argparse import Namespace

    from PIL import Image

    from engine.eval.protocol import file_prompt_set
    from engine.eval.reference import fid_metrics, folder_images

    ds = SyntheticShapes(5, 64, 5)
    (tmp_path / "sub").mkdir()
    for i in range(5):
        Image.fromarray(ds.image_uint8(i)).save(tmp_path / ("sub" if i % 2 else ".") / f"{i}.png")
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).convert("L").save(tmp_path / "wide_grey.jpg")
    (tmp_path / "broken.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "0.png").read_bytes()[:50])
    (tmp_path / "notes.txt").write_text("not an image")
    skipped = []
    batches = list(folder_images(tmp_path, (32, 32), None, 4, skipped))
    assert [b.shape for b in batches] == [(4, 32, 32, 3), (2, 32, 32, 3)] and batches[0].dtype == np.uint8
    assert sorted(Path(s.split(":")[0]).name for s in skipped) == ["broken.png", "truncated.png"]
    assert sum(len(b) for b in folder_images(tmp_path, (16, 16), 3, 2, [])) == 3  # --num-reference
    ex = {"inception": InceptionTorchScript(inception_file)}
    gen = {"inception": FeatureStats.of(ex["inception"](batches[0]), ex["inception"].name)}
    args = Namespace(num_reference=None, num_images=4, batch_size=4)
    out = tmp_path / "out"
    out.mkdir()
    entry = fid_metrics(ex, gen, str(tmp_path), None, args, (32, 32), out)["inception"]
    assert entry["num_reference"] == 6 and entry["reference_skipped"] == 2 and entry["num_generated"] == 4
    assert entry["value"] >= 0 and "rank-deficient" in entry["note"]
    assert "broken.png" in (out / "reference_skipped.txt").read_text()
    assert FeatureStats.load(out / "reference_inception.npz").n == 6
    (tmp_path / "prompts.txt").write_text("# comment\na red circle\n\ntwo blue squares\n")
    assert file_prompt_set(tmp_path / "prompts.txt", 5).prompts == ["a red circle", "two blue squares"] * 2 + ["a red circle"]
