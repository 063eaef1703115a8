"""SyntheticShapes: determinism, caption/describe/pixel agreement, layout guarantees, speed, argument errors."""
import re
import time

import numpy as np
import pytest
import torch

from engine.data.synthetic import BACKGROUND, COLOURS, SHAPES, SyntheticShapes

WORD_COUNT = {"a": 1, "two": 2, "three": 3}
GROUP = r"(a|two|three) (\w+) (circle|square|triangle)(s?)"
CAPTION_RE = re.compile(rf"^{GROUP}(?: (left of|above) {GROUP})?$")


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, each as an (n, 2) array of (y, x)."""
    seen, comps = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pix = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.array(pix))
    return comps


def shape_of(pix: np.ndarray) -> str:
    """Classify a component by how much of its bounding box it fills (square 1, circle ~0.8, triangle ~0.6)."""
    h, w = np.ptp(pix[:, 0]) + 1, np.ptp(pix[:, 1]) + 1
    fill = len(pix) / (h * w)
    return "square" if fill == 1 else "circle" if fill > 0.72 else "triangle"


def to_uint8(img: torch.Tensor) -> np.ndarray:
    return ((img + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_same_seed_and_index_give_identical_sample_in_any_order():
    a, b = SyntheticShapes(1000, seed=3), SyntheticShapes(1000, seed=3)
    img, cap = a[417]
    for i in (0, 999, 5):  # touch other indices first: nothing may depend on history
        b[i]
    img2, cap2 = b[417]
    assert cap == cap2 and torch.equal(img, img2)
    assert torch.equal(a.images([7, 2, 7]), torch.stack([a[7][0], a[2][0], a[7][0]]))
    assert a.captions(torch.tensor([7, 2])) == [a[7][1], a[2][1]]


def test_different_seed_gives_different_samples():
    a, b = SyntheticShapes(200, seed=0), SyntheticShapes(200, seed=1)
    same_img = sum(torch.equal(x, y) for x, y in zip(a.images(range(200)), b.images(range(200))))
    same_cap = sum(x == y for x, y in zip(a.captions(range(200)), b.captions(range(200))))
    assert same_img == 0 and same_cap < 40


@pytest.mark.parametrize("size", [16, 32, 48])
def test_image_dtype_shape_and_values(size):
    ds = SyntheticShapes(50, image_size=size, seed=1)
    x = ds.images(range(50))
    assert x.dtype == torch.float32 and x.shape == (50, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1
    allowed = {BACKGROUND, *COLOURS.values()}
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    colours = {tuple(c) for c in np.unique(pixels, axis=0).tolist()}
    assert colours <= allowed and BACKGROUND in colours


def test_caption_matches_describe():
    ds = SyntheticShapes(300, seed=2)
    for i in range(300):
        facts, m = ds.describe(i), CAPTION_RE.match(ds.caption(i))
        assert m, ds.caption(i)
        words, groups = m.groups(), facts["groups"]
        assert words[4] == facts["relation"]
        assert len(groups) == (1 if facts["relation"] is None else 2)
        stated = [words[:4]] + ([words[5:]] if facts["relation"] else [])
        for (count, colour, shape, plural), g in zip(stated, groups):
            assert (WORD_COUNT[count], colour, shape) == (g["count"], g["colour"], g["shape"])
            assert len(g["boxes"]) == g["count"] and (plural == "s") == (g["count"] > 1)
        if len(groups) == 2:  # two groups must be told apart by colour or shape
            assert (groups[0]["colour"], groups[0]["shape"]) != (groups[1]["colour"], groups[1]["shape"])


@pytest.mark.parametrize("size", [32, 64])
def test_pixels_match_caption_colour_count_shape_and_relation(size):
    ds = SyntheticShapes(100, image_size=size, seed=5)
    for i in range(100):
        facts, img = ds.describe(i), to_uint8(ds[i][0])
        groups = facts["groups"]
        for g in groups:
            for x0, y0, d in g["boxes"]:  # the centre of every object shows the stated colour
                assert tuple(img[y0 + d // 2, x0 + d // 2]) == COLOURS[g["colour"]]
        for colour in {g["colour"] for g in groups}:
            comps = components((img == COLOURS[colour]).all(-1))
            stated = [g for g in groups if g["colour"] == colour]
            assert len(comps) == sum(g["count"] for g in stated), (i, ds.caption(i))
            assert sorted(shape_of(c) for c in comps) == sorted(g["shape"] for g in stated for _ in range(g["count"]))
        if facts["relation"] and groups[0]["colour"] != groups[1]["colour"]:
            first, second = ((img == COLOURS[g["colour"]]).all(-1).nonzero() for g in groups)
            axis = 1 if facts["relation"] == "left of" else 0  # x for "left of", y for "above"
            assert first[axis].max() < second[axis].min(), (i, ds.caption(i))


@pytest.mark.parametrize("size", [16, 32, 40, 64])
def test_objects_fit_and_never_overlap(size):
    ds = SyntheticShapes(300, image_size=size, seed=9)
    for i in range(300):
        occupied = np.zeros((size, size), dtype=int)
        for g in ds.describe(i)["groups"]:
            for x0, y0, d in g["boxes"]:
                assert 0 <= x0 and 0 <= y0 and x0 + d <= size and y0 + d <= size
                occupied[max(y0 - 1, 0):y0 + d, max(x0 - 1, 0):x0 + d] += 1  # box grown by the 1-px gap
        assert occupied.max() == 1, (size, i)


def test_captions_cover_the_vocabulary():
    caps = SyntheticShapes(600, seed=0).captions(range(600))
    text = " ".join(caps)
    for word in [*COLOURS, *SHAPES, "two", "three", "left of", "above"]:
        assert word in text, word
    assert any(CAPTION_RE.match(c).group(5) is None for c in caps)
    assert len(set(caps)) > 200


def test_5000_images_are_fast():
    ds = SyntheticShapes(5000)
    t = time.perf_counter()
    x, caps = ds.images(range(5000)), ds.captions(range(5000))
    assert x.shape == (5000, 3, 32, 32) and len(caps) == 5000
    assert time.perf_counter() - t < 10


@pytest.mark.parametrize("kwargs, name", [(dict(num_samples=0), "num_samples"),
                                          (dict(num_samples=10, image_size=8), "image_size"),
                                          (dict(num_samples=10, seed=-1), "seed")])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticShapes(**kwargs)


def test_index_out_of_range():
    ds = SyntheticShapes(10)
    for bad in (10, -1):
        with pytest.raises(IndexError, match="index"):
            ds[bad]
    with pytest.raises(IndexError, match="index"):
        ds.images([0, 12])
    with pytest.raises(TypeError, match="index"):
        ds["3"]
    assert len(ds) == 10
