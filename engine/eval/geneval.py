"""GenEval-style scoring for the built-in SyntheticShapes dataset: a procedural detector reads generated pixels.

GenEval (Ghosh et al. 2023) checks generated images against their prompt with an object detector. SyntheticShapes
has a closed vocabulary (6 palette colours, circle/square/triangle, 1-3 objects per group, "left of"/"above"), so
the detector here is a few lines of image processing instead of a Mask2Former:

1. Segment: every pixel is fitted as a blend of BACKGROUND with each palette colour (anti-aliased or blurred
   edges are such blends) and takes the colour of the best fit; it is background when it is less than half-way
   from the background to that colour, or farther than `max_dist` (RGB) from every blend.
2. Connected components of same-colour pixels (4-connected by default), labelled on all images of a batch at once
   by max-label propagation in torch; components smaller than `min_area_frac` of the image are dropped as noise.
3. Shape: the component's pixels are compared with a filled circle, square and apex-up triangle drawn in its
   bounding box (the same rasterisation as the dataset's `shape_mask` when the box is square); the best IoU wins,
   and one below `min_shape_iou` reads as shape "unknown".

A prompt ("two red circles left of a blue square", optionally "a photo of ...", "right of"/"below" too) becomes
groups of (colour, shape, count) and a relation. Per image, True/False for:
  colour   every group's colour is present (any shape);
  shape    every group's (colour, shape) is present;
  count    every group's (colour, shape) is present exactly `count` times;
  position (two-group prompts only, else None) every object of the first group has its centroid more than
           `margin` · image side left of (above) every object of the second group;
  all      all of the above that apply.
Means are over images; position's mean is over the images whose prompt has a relation.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from engine.data.synthetic import BACKGROUND, COLOURS, SHAPES

TASKS = ("colour", "shape", "count", "position", "all")
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
            "eight": 8, "nine": 9, "ten": 10}
_RELATIONS = {"left of": ("left of", False), "right of": ("left of", True), "above": ("above", False),
              "below": ("above", True)}


# ---------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Group:
    colour: str
    shape: str
    count: int


@dataclass(frozen=True)
class PromptSpec:
    """groups[0] <relation> groups[1]; relation is "left of", "above" or None (one group)."""
    groups: tuple[Group, ...]
    relation: str | None = None


_COUNT_RE = "|".join(sorted(_NUMBERS, key=len, reverse=True)) + r"|\d+"
_GROUP_RE = (rf"(?P<n>{_COUNT_RE})\s+(?P<colour>{'|'.join(COLOURS)})\s+"
             rf"(?P<shape>{'|'.join(SHAPES)})(?:e?s)?")


def _group(text: str) -> Group | None:
    m = re.fullmatch(_GROUP_RE, text.strip())
    if m is None:
        return None
    n = m["n"]
    count = int(n) if n.isdigit() else _NUMBERS[n]
    return Group(m["colour"], m["shape"], count) if count >= 1 else None


def parse_prompt(prompt: str) -> PromptSpec | None:
    """PromptSpec of a SyntheticShapes-style caption, or None when the prompt is not in that language.

    "two red circles left of a blue square" -> (Group(red, circle, 2), Group(blue, square, 1)), "left of".
    "right of" and "below" are stored as "left of"/"above" with the groups swapped."""
    text = re.sub(r"\s+", " ", prompt.lower()).strip().rstrip(".")
    text = re.sub(r"^(a )?(photo|picture|image) of ", "", text)
    text = re.sub(r" on an? \w+ background$", "", text)  # the prompted-backgrounds variant of the dataset
    for word, (relation, swap) in _RELATIONS.items():
        parts = text.split(f" {word} ")
        if len(parts) == 2:
            a, b = _group(parts[0]), _group(parts[1])
            if a is None or b is None:
                return None
            return PromptSpec((b, a) if swap else (a, b), relation)
    g = _group(text)
    return None if g is None else PromptSpec((g,), None)


def spec_from_describe(facts: dict) -> PromptSpec:
    """The PromptSpec of SyntheticShapes.describe(i) (ground truth, no parsing)."""
    return PromptSpec(tuple(Group(g["colour"], g["shape"], g["count"]) for g in facts["groups"]), facts["relation"])


# ---------------------------------------------------------------- detection

@dataclass
class Detection:
    colour: str
    shape: str  # circle | square | triangle | unknown
    area: int  # pixels
    box: tuple[int, int, int, int]  # x0, y0, width, height
    centroid: tuple[float, float]  # x, y in pixels
    shape_iou: float  # IoU with the best shape template


def shape_template(shape: str, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) filled `shape` touching every row and column of its box; equals synthetic.shape_mask(d)
    for h = w = d."""
    y = (np.arange(h) + 0.5)[:, None]
    x = (np.arange(w) + 0.5)[None, :]
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "circle":
        return ((x - w / 2) / (w / 2)) ** 2 + ((y - h / 2) / (h / 2)) ** 2 <= 1
    if shape == "triangle":  # apex up: half-width (row + 1) / 2 in a square box, scaled by w / h
        half = (np.arange(h)[:, None] + 1) / 2 * (w / h)
        return np.abs(x - w / 2) <= half
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(best shape, its IoU) for a component's boolean mask cropped to its bounding box."""
    h, w = mask.shape
    best, best_iou = "unknown", 0.0
    for shape in SHAPES:
        t = shape_template(shape, h, w)
        iou = float((t & mask).sum() / (t | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def _as_uint8_hwc(images) -> np.ndarray:
    """uint8 (B, H, W, 3) from uint8 (B, H, W, 3) / (H, W, 3) arrays or float (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        arr = images[None] if images.ndim == 3 else images
    elif isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        arr = images.cpu().numpy()
        arr = arr[None] if arr.ndim == 3 else arr
    else:
        from engine.outputs.images import to_uint8
        arr = to_uint8(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3) or float (B, 3, H, W), got shape {arr.shape}")
    return arr


def label_colours(images: np.ndarray, max_dist: float, min_alpha: float = 0.5,
                  background: np.ndarray | None = None) -> np.ndarray:
    """int64 (B, H, W): 0 = background, k = k-th colour of COLOURS (1-based).

    Each pixel p is fitted as a blend bg + a·(c - bg), a in [0, 1], of the background with each palette colour c
    (anti-aliased and blurred edges are such blends); the colour with the smallest residual |p - blend| wins, and
    the pixel is background when that residual exceeds `max_dist` or a < `min_alpha`. `background`: (B, 3) RGB
    per image (default: the dataset's fixed BACKGROUND)."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (C, 3)
    if background is None:
        bg = torch.tensor(BACKGROUND, dtype=torch.float32)
        v = palette - bg  # (C, 3)
        p = torch.from_numpy(images).float() - bg  # (B, H, W, 3)
        pv, vv = p @ v.T, (v * v).sum(-1)  # (B, H, W, C), (C,)
    else:  # one background per image
        bg = torch.tensor(np.asarray(background), dtype=torch.float32).view(-1, 1, 1, 3)  # (B, 1, 1, 3)
        v = palette - bg.view(-1, 1, 3)  # (B, C, 3)
        p = torch.from_numpy(images).float() - bg  # (B, H, W, 3)
        pv = torch.einsum("bhwk,bck->bhwc", p, v)  # (B, H, W, C)
        vv = (v * v).sum(-1).view(v.shape[0], 1, 1, -1)  # (B, 1, 1, C)
    a = (pv / vv).clamp(0, 1)
    resid = ((p * p).sum(-1, keepdim=True) - 2 * a * pv + a * a * vv).clamp_min(0)  # |p - a v|^2, (B, H, W, C)
    r, idx = resid.min(-1)
    alpha = a.gather(-1, idx[..., None])[..., 0]
    idx = idx + 1
    idx[(r > max_dist**2) | (alpha < min_alpha)] = 0
    return idx.numpy()


def connected_components(colour_idx: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """int64 (B, H, W) component labels (0 = background; a label is unique within its image) of same-colour
    pixels; all images at once by propagating the largest pixel index through same-colour neighbours."""
    c = torch.from_numpy(colour_idx)
    B, H, W = c.shape
    fg = c > 0
    lab = torch.where(fg, torch.arange(1, H * W + 1).view(1, H, W).expand(B, H, W), 0)
    shifts = [(0, 1), (0, -1), (1, 0), (-1, 0)]
    if connectivity == 8:
        shifts += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    elif connectivity != 4:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    # pad by one with background so shifted views never wrap around
    cp = torch.nn.functional.pad(c, (1, 1, 1, 1))
    same = [(cp[:, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W] == c) & fg for dy, dx in shifts]  # (B, H, W) each
    for _ in range(H * W):
        lp = torch.nn.functional.pad(lab, (1, 1, 1, 1))
        new = lab
        for (dy, dx), ok in zip(shifts, same):
            new = torch.maximum(new, torch.where(ok, lp[:, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W], 0))
        if torch.equal(new, lab):
            break
        lab = new
    return lab.numpy()


class ShapeDetector:
    """Finds coloured shapes in RGB images; `detect(images) -> list (per image) of list[Detection]`.

    Args:
        max_dist: RGB distance from a pixel to its best background-to-colour blend beyond which the pixel matches
            no palette colour (palette colours are >= 126 apart, the background >= 180 from any colour).
        min_alpha: a pixel belongs to a colour when it is at least this far along the blend from the background.
        min_area_frac: components smaller than this fraction of the image are ignored (the dataset's smallest
            object covers about 2% of the image; pixel noise rarely forms components of this size).
        min_shape_iou: below this IoU with every template the shape is "unknown".
        connectivity: 4 or 8 (the dataset's objects never touch, not even diagonally).
        background: "fixed" (the dataset's dark BACKGROUND) or "estimate" (each image's per-channel median: for the
            prompted-backgrounds variant, whose objects never cover half an image).
    """

    def __init__(self, max_dist: float = 60.0, min_alpha: float = 0.5, min_area_frac: float = 0.008,
                 min_shape_iou: float = 0.6, connectivity: int = 4, background: str = "fixed"):
        if background not in ("fixed", "estimate"):
            raise ValueError(f"background must be 'fixed' or 'estimate', got {background!r}")
        self.background = background
        self.max_dist, self.min_alpha, self.min_area_frac = max_dist, min_alpha, min_area_frac
        self.min_shape_iou = min_shape_iou
        self.connectivity = connectivity
        self.colour_names = list(COLOURS)

    def detect(self, images) -> list[list[Detection]]:
        arr = _as_uint8_hwc(images)
        B, H, W, _ = arr.shape
        bg = np.median(arr.reshape(B, -1, 3), axis=1) if self.background == "estimate" else None  # (B, 3)
        colour_idx = label_colours(arr, self.max_dist, self.min_alpha, bg)
        labels = connected_components(colour_idx, self.connectivity)
        min_area = max(4, int(np.ceil(self.min_area_frac * H * W)))
        return [self._objects(labels[b], colour_idx[b], min_area) for b in range(B)]

    def _objects(self, lab: np.ndarray, colour_idx: np.ndarray, min_area: int) -> list[Detection]:
        ids, inverse, areas = np.unique(lab.ravel(), return_inverse=True, return_counts=True)
        out = []
        for k in np.flatnonzero((ids > 0) & (areas >= min_area)):
            ys, xs = np.divmod(np.flatnonzero(inverse == k), lab.shape[1])
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            crop = lab[y0:y1, x0:x1] == ids[k]
            shape, iou = classify_shape(crop)
            if iou < self.min_shape_iou:
                shape = "unknown"
            out.append(Detection(self.colour_names[colour_idx[ys[0], xs[0]] - 1], shape, int(areas[k]),
                                 (int(x0), int(y0), int(x1 - x0), int(y1 - y0)),
                                 (float(xs.mean() + 0.5), float(ys.mean() + 0.5)), round(iou, 4)))
        return sorted(out, key=lambda d: (d.centroid[1], d.centroid[0]))


# ---------------------------------------------------------------- scoring

def score_image(spec: PromptSpec, dets: list[Detection], image_size: tuple[int, int], margin: float = 0.0) -> dict:
    """Per-task booleans (position None without a relation) for one image's detections against its prompt."""
    H, W = image_size
    match = [[d for d in dets if d.colour == g.colour and d.shape == g.shape] for g in spec.groups]
    colours = {d.colour for d in dets}
    res = {
        "colour": all(g.colour in colours for g in spec.groups),
        "shape": all(len(m) > 0 for m in match),
        "count": all(len(m) == g.count for m, g in zip(match, spec.groups)),
        "position": None,
    }
    if spec.relation is not None:
        a, b = match
        axis, side = (0, W) if spec.relation == "left of" else (1, H)
        res["position"] = bool(a and b) and all(p.centroid[axis] + margin * side < q.centroid[axis]
                                                for p in a for q in b)
    res["all"] = res["colour"] and res["shape"] and res["count"] and res["position"] is not False
    return res


@dataclass
class GenEvalResult:
    """Mean accuracies (0-1) over scored images, and the per-image records behind them."""
    colour: float
    shape: float
    count: float
    position: float | None  # None when no scored prompt has a relation
    all: float
    num_images: int  # images scored
    num_position: int  # images whose prompt has a relation
    num_unparsed: int  # prompts not in the dataset's language (not scored)
    per_image: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("per_image")
        return d


class GenEvalScorer:
    """Streams (images, prompts) batches through the detector; `result()` gives the means.

    `specs` may be given instead of parsing (e.g. spec_from_describe for the dataset's ground truth)."""

    def __init__(self, detector: ShapeDetector | None = None, margin: float = 0.0):
        self.detector = detector or ShapeDetector()
        self.margin = margin
        self.records: list[dict] = []
        self.unparsed = 0
        self.fed = 0  # images seen so far: a record's "index" is its position in the whole stream

    def update(self, images, prompts: list[str], specs: list[PromptSpec | None] | None = None) -> list[dict]:
        arr = _as_uint8_hwc(images)
        if len(prompts) != len(arr):
            raise ValueError(f"{len(prompts)} prompts for {len(arr)} images")
        specs = specs if specs is not None else [parse_prompt(p) for p in prompts]
        keep = [i for i, s in enumerate(specs) if s is not None]
        self.unparsed += len(prompts) - len(keep)
        dets = self.detector.detect(arr[keep]) if keep else []
        new = []
        for i, d in zip(keep, dets):
            rec = {"index": self.fed + i, "prompt": prompts[i], **score_image(specs[i], d, arr.shape[1:3], self.margin),
                   "detected": [f"{x.colour} {x.shape}" for x in d]}
            new.append(rec)
        self.records += new
        self.fed += len(arr)
        return new

    def result(self) -> GenEvalResult:
        recs = self.records
        n = len(recs)

        def mean(key, rows):
            return sum(bool(r[key]) for r in rows) / len(rows) if rows else None

        pos = [r for r in recs if r["position"] is not None]
        return GenEvalResult(
            colour=mean("colour", recs) or 0.0, shape=mean("shape", recs) or 0.0, count=mean("count", recs) or 0.0,
            position=mean("position", pos), all=mean("all", recs) or 0.0, num_images=n, num_position=len(pos),
            num_unparsed=self.unparsed, per_image=list(recs))


def geneval_score(images, prompts: list[str], detector: ShapeDetector | None = None, margin: float = 0.0,
                  batch_size: int = 256) -> GenEvalResult:
    """One-call GenEval-style score of images (uint8 (B, H, W, 3) or float (B, 3, H, W) in [-1, 1])."""
    scorer = GenEvalScorer(detector, margin)
    arr = _as_uint8_hwc(images)
    for i in range(0, len(arr), batch_size):
        scorer.update(arr[i:i + batch_size], prompts[i:i + batch_size])
    return scorer.result()
