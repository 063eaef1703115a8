"""SyntheticShapes: a built-in text-to-image dataset of coloured shapes, deterministic from a seed.

Each image holds one or two *groups*; a group is 1-3 objects of one colour and one shape. With two groups, the
first group lies entirely left of (or above) the second, so captions read like
"two red circles left of a blue square" or "a yellow triangle". Sample i is a pure function of (seed, i): any index
can be produced in any order, by any process, and always gives the same image and caption.

Layout guarantees non-overlap by construction: the image (or, with two groups, each half of it) is cut into equal
cells along one axis, one object per cell, and each object leaves the last row and column of its cell empty, so
objects never touch, not even diagonally.

With backgrounds="prompted" each image also gets a black, grey or white background that its caption names
("a yellow triangle on a white background"), drawn from a stream of its own, so the shapes are those of the default
set; white is never drawn behind a white group. The image mean then depends on the prompt: the set SingDiffusion's
initial-step model is measured on. The default ("fixed") set is unchanged, byte for byte.

Two knobs make a biased set for debiasing studies, each from a stream of its own and off by default (the default set
stays byte-identical): `colour_weights` draws every group's colour from the given distribution (e.g. red 0.8, the rest
uniform; the layout and shapes stay the default set's), and `caption_colour_dropout` removes the colour words from that
fraction of captions ("two squares left of a triangle"), so colour-free prompts inherit the bias.
"""
from __future__ import annotations

import operator
from functools import lru_cache

import numpy as np
import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (170, 60, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "above")
BACKGROUND: tuple[int, int, int] = (24, 24, 24)
PROMPTED_BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": BACKGROUND, "grey": (128, 128, 128),
                                                         "white": (232, 232, 232)}
BACKGROUND_MODES = ("fixed", "prompted")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
MAX_COUNT = 3


def parse_named_weights(text: str, names, kind: str = "colour") -> dict[str, float]:
    """"a=0.5,b=0.3" -> {a: 0.5, b: 0.3} over known `names`. ValueError names an unknown name, a value that is not a
    number, a negative weight or a name given twice. (Shared by data.colour_bias and debiasing targets.)"""
    given: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in names:
            raise ValueError(f"{item.strip()!r} must be {kind}=weight with a {kind} of {', '.join(names)}")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"{item.strip()!r}: {value.strip()!r} is not a number") from None
        if w < 0 or name in given:
            raise ValueError(f"{item.strip()!r}: weights must be >= 0, each {kind} named once")
        given[name] = w
    return given


def parse_colour_weights(text: str) -> dict[str, float] | None:
    """"red=0.8" -> red 0.8, the other colours share the rest equally; "red=0.5,blue=0.3" likewise. Empty -> None
    (uniform, the default set). ValueError names an unknown colour, a weight outside [0, 1] or a sum above 1."""
    if not text.strip():
        return None
    given = parse_named_weights(text, COLOURS)
    if any(w > 1 for w in given.values()):
        raise ValueError(f"{text.strip()!r}: weights must be in [0, 1]")
    rest = [c for c in COLOURS if c not in given]
    left = 1.0 - sum(given.values())
    if left < -1e-9 or (not rest and abs(left) > 1e-6):
        raise ValueError(f"weights sum to {1 - left:.4g}; they must sum to at most 1 (exactly 1 when all are named)")
    return {c: given.get(c, max(left, 0.0) / len(rest) if rest else 0.0) for c in COLOURS}


@lru_cache(maxsize=None)
def shape_mask(shape: str, d: int) -> np.ndarray:
    """Boolean (d, d) mask of `shape` filling a d×d box; every row and column of the box is touched."""
    c = np.arange(d) + 0.5  # pixel centres
    y, x = c[:, None], c[None, :]
    if shape == "square":
        return np.ones((d, d), dtype=bool)
    if shape == "circle":
        return (x - d / 2) ** 2 + (y - d / 2) ** 2 <= (d / 2) ** 2
    if shape == "triangle":  # apex up; half-width grows so the top row already has a pixel
        half = (np.arange(d)[:, None] + 1) / 2
        return np.abs(x - d / 2) <= half
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _cells(x0: int, y0: int, w: int, h: int, n: int, horizontal: bool) -> list[tuple[int, int, int, int]]:
    """Split the box (x0, y0, w, h) into n equal integer cells along x (horizontal) or y."""
    length = w if horizontal else h
    cuts = [length * k // n for k in range(n + 1)]
    if horizontal:
        return [(x0 + a, y0, b - a, h) for a, b in zip(cuts, cuts[1:])]
    return [(x0, y0 + a, w, b - a) for a, b in zip(cuts, cuts[1:])]


class SyntheticShapes:
    """Coloured shapes on a dark background with compositional captions.

    Args:
        num_samples: dataset length (>= 1); any index in [0, num_samples) is valid.
        image_size: side H = W in pixels (>= 16); object sizes scale with it.
        seed: dataset seed; sample i depends only on (seed, i).
        backgrounds: "fixed" (the dark background) or "prompted" (black / grey / white, named in the caption).
        colour_weights: None (uniform colours, the default set) or {colour: probability} for every group's colour.
        caption_colour_dropout: fraction of captions written without colour words (0 = none, the default set).

    `ds[i]` gives (image float32 (3, H, W) in [-1, 1], caption str). `describe(i)` gives the facts behind it.
    """

    def __init__(self, num_samples: int, image_size: int = 32, seed: int = 0, backgrounds: str = "fixed",
                 colour_weights: dict[str, float] | None = None, caption_colour_dropout: float = 0.0):
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if int(image_size) < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if backgrounds not in BACKGROUND_MODES:
            raise ValueError(f"backgrounds must be one of {BACKGROUND_MODES}, got {backgrounds!r}")
        if not 0 <= caption_colour_dropout <= 1:
            raise ValueError(f"caption_colour_dropout must be in [0, 1], got {caption_colour_dropout}")
        if colour_weights is not None and (set(colour_weights) != set(COLOURS)
                                           or abs(sum(colour_weights.values()) - 1) > 1e-6):
            raise ValueError(f"colour_weights must give every colour of {list(COLOURS)} a weight, summing to 1")
        self.backgrounds = backgrounds
        self.colour_weights, self.caption_colour_dropout = colour_weights, float(caption_colour_dropout)
        self.num_samples, self.image_size, self.seed = int(num_samples), int(image_size), int(seed)
        self.min_size = max(5, round(0.18 * self.image_size))  # smallest object side that still reads as its shape
        self.max_size = round(0.45 * self.image_size)

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, i) -> int:
        try:
            i = operator.index(i)  # ints, numpy ints, 0-d integer tensors; not floats or strings
        except TypeError:
            raise TypeError(f"index must be an integer, got {type(i).__name__}") from None
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for SyntheticShapes of length {self.num_samples}")
        return i

    def describe(self, i: int) -> dict:
        """Structured facts of sample i: {"groups": [{"colour", "shape", "count", "size", "boxes"}], "relation"}.

        `boxes` are (x0, y0, side) of each object's tight bounding square in pixels; relation is "left of",
        "above" or None, and reads "groups[0] <relation> groups[1]". With prompted backgrounds a "background" key
        names it (PROMPTED_BACKGROUNDS). Plain Python types (JSON-serialisable).
        """
        i = self._check_index(i)
        rng = np.random.default_rng([self.seed, i])
        s = self.image_size
        colours, shapes = list(COLOURS), list(SHAPES)
        n_groups = int(rng.integers(1, 3))
        kinds = [(colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])]
        if n_groups == 2:  # the second group must be describable apart from the first
            others = [(c, sh) for c in colours for sh in shapes if (c, sh) != kinds[0]]
            kinds.append(others[rng.integers(len(others))])
            relation = RELATIONS[rng.integers(len(RELATIONS))]
            half = s // 2
            regions = [(0, 0, half, s), (half, 0, s - half, s)] if relation == "left of" else \
                [(0, 0, s, half), (0, half, s, s - half)]
            # objects of a group line up along the long side of its half
            axes = [relation == "above"] * 2
        else:
            relation, regions, axes = None, [(0, 0, s, s)], [bool(rng.integers(2))]
        if self.colour_weights is not None:
            kinds = self._biased_colours(i, kinds)
        groups = []
        for (colour, shape), region, horizontal in zip(kinds, regions, axes):
            count = int(rng.integers(1, MAX_COUNT + 1))
            cells = _cells(*region, count, horizontal)
            room = min(min(w, h) for _, _, w, h in cells) - 1  # keep one empty row/column per cell
            hi = min(room, self.max_size)
            d = int(rng.integers(min(self.min_size, hi), hi + 1))
            boxes = [(int(cx + rng.integers(0, w - d)), int(cy + rng.integers(0, h - d)), d)
                     for cx, cy, w, h in cells]
            groups.append({"colour": colour, "shape": shape, "count": count, "size": d, "boxes": boxes})
        facts = {"groups": groups, "relation": relation}
        if self.backgrounds == "prompted":  # its own stream: the shapes stay those of the fixed set
            allowed = [b for b in PROMPTED_BACKGROUNDS if b != "white" or all(g["colour"] != "white" for g in groups)]
            facts["background"] = allowed[int(np.random.default_rng([self.seed, i, 1]).integers(len(allowed)))]
        if self.caption_colour_dropout > 0:  # its own stream: images are those without the knob
            u = np.random.default_rng([self.seed, i, 3]).random()
            facts["caption_colours"] = bool(u >= self.caption_colour_dropout)
        return facts

    def _biased_colours(self, i: int, kinds: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Group colours redrawn from colour_weights on a stream of their own (the layout keeps the default draws);
        a second group never repeats the first group's (colour, shape)."""
        rng = np.random.default_rng([self.seed, i, 2])
        names, w = list(self.colour_weights), np.array(list(self.colour_weights.values()))
        out = []
        for _, shape in kinds:
            p = w.copy()
            if out and out[0][1] == shape:
                p[names.index(out[0][0])] = 0.0
            p = p / p.sum() if p.sum() > 0 else np.array([n != out[0][0] for n in names], float) / (len(names) - 1)
            out.append((names[int(rng.choice(len(names), p=p))], shape))
        return out

    def caption(self, i: int) -> str:
        """Caption of sample i, e.g. "two red circles left of a blue square" (or "two circles ..." when its colour
        words were dropped)."""
        facts = self.describe(i)
        return caption_of(facts, facts.get("caption_colours", True))

    def image_uint8(self, i: int) -> np.ndarray:
        """Sample i as uint8 (H, W, 3)."""
        img = np.empty((self.image_size, self.image_size, 3), dtype=np.uint8)
        self._render(i, img)
        return img

    def _render(self, i: int, out: np.ndarray) -> None:
        facts = self.describe(i)
        out[:] = PROMPTED_BACKGROUNDS[facts["background"]] if "background" in facts else BACKGROUND
        for g in facts["groups"]:
            mask, colour = shape_mask(g["shape"], g["size"]), COLOURS[g["colour"]]
            for x0, y0, d in g["boxes"]:
                out[y0:y0 + d, x0:x0 + d][mask] = colour

    def images(self, indices) -> torch.Tensor:
        """Samples `indices` as float32 (B, 3, H, W) in [-1, 1]; one uint8 buffer, converted once."""
        idx = [self._check_index(i) for i in _as_list(indices)]
        buf = np.empty((len(idx), self.image_size, self.image_size, 3), dtype=np.uint8)
        for b, i in enumerate(idx):
            self._render(i, buf[b])
        x = torch.from_numpy(buf).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        return x.float().div_(127.5).sub_(1.0).contiguous()

    def captions(self, indices) -> list[str]:
        """Captions of samples `indices`."""
        return [self.caption(i) for i in _as_list(indices)]

    def __getitem__(self, i) -> tuple[torch.Tensor, str]:
        i = self._check_index(i)
        return self.images([i])[0], self.caption(i)

    def __repr__(self) -> str:
        extra = f", backgrounds={self.backgrounds!r}" if self.backgrounds != "fixed" else ""
        extra += f", colour_weights={self.colour_weights}" if self.colour_weights is not None else ""
        extra += f", caption_colour_dropout={self.caption_colour_dropout}" if self.caption_colour_dropout else ""
        return (f"SyntheticShapes(num_samples={self.num_samples}, image_size={self.image_size}, seed={self.seed}"
                f"{extra})")


def caption_of(facts: dict, colours: bool = True) -> str:
    """The caption of describe()'s facts; colours=False leaves out the colour words ("two circles above a square")."""
    phrases = [f"{COUNT_WORDS[g['count']]} {g['colour'] + ' ' if colours else ''}{g['shape']}"
               f"{'s' if g['count'] > 1 else ''}" for g in facts["groups"]]
    text = f" {facts['relation']} ".join(phrases)
    return f"{text} on a {facts['background']} background" if "background" in facts else text


def synthetic_train_set(cfg, seed: int | None = None) -> SyntheticShapes:
    """The training set a config describes (data.* and run.seed), its colour knobs included; with `seed`, the same
    distribution under another seed (e.g. held-out images of it)."""
    d = cfg.data
    return SyntheticShapes(d.num_samples, d.image_size, cfg.run.seed if seed is None else seed, d.backgrounds,
                           parse_colour_weights(d.colour_bias), d.caption_colour_dropout)


def _as_list(indices) -> list:
    if isinstance(indices, torch.Tensor):
        return indices.reshape(-1).tolist()
    return np.asarray(indices).reshape(-1).tolist()
