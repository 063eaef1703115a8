"""Attribute distributions of generated images, read by the procedural detector (independent of any predictor a
method guides with): per-image dominant colour, the colour histogram, the fairness discrepancy
FD = ||p_generated - p_target||_2 (Choi et al. 2020), and shape / count accuracy of colour-free prompts
("a circle", "two squares")."""
from __future__ import annotations

import re

import numpy as np
import torch

from engine.data.synthetic import COLOURS, SHAPES
from engine.eval.geneval import _NUMBERS, ShapeDetector
from engine.eval.protocol import mean_ci, statistic_ci

_FREE_RE = re.compile(rf"(?P<n>{'|'.join(_NUMBERS)})\s+(?:(?P<colour>{'|'.join(COLOURS)})\s+)?"
                      rf"(?P<shape>{'|'.join(SHAPES)})(?:e?s)?")


def parse_single_group(prompt: str) -> tuple[int, str | None, str] | None:
    """(count, colour or None, shape) of a one-group prompt such as "a circle" or "two red squares"; else None."""
    m = _FREE_RE.fullmatch(re.sub(r"\s+", " ", prompt.lower()).strip().rstrip("."))
    return None if m is None else (_NUMBERS[m["n"]], m["colour"], m["shape"])


def read_images(images, prompts: list[str], detector: ShapeDetector | None = None) -> list[dict]:
    """Per image: {"colour": colour of the largest detected object or None, "detected": bool, "objects": detections,
    "foreground": fraction of pixels the detector reads as a palette colour (a quality check: the dataset's objects
    cover ~2-20% of an image, a picture broken into colour noise far more), "shape": bool, "count": bool}; shape and
    count are None for prompts that are not one group."""
    from engine.eval.geneval import _as_uint8_hwc, label_colours

    detector = detector or ShapeDetector()
    arr = _as_uint8_hwc(images)
    dets = detector.detect(arr)
    fg = (label_colours(arr, detector.max_dist, detector.min_alpha) > 0).mean(axis=(1, 2))  # (B,)
    out = []
    for prompt, d, f in zip(prompts, dets, fg):
        spec = parse_single_group(prompt)
        rec = {"colour": max(d, key=lambda x: x.area).colour if d else None, "detected": bool(d),
               "objects": len(d), "foreground": float(f)}
        if spec is None:
            rec.update(shape=None, count=None)
        else:
            n, _, shape = spec
            rec.update(shape=any(x.shape == shape for x in d), count=sum(x.shape == shape for x in d) == n)
        out.append(rec)
    return out


def histogram(colours: list[str | None], classes: list[str] | None = None) -> np.ndarray:
    """(K,) fraction of the images with a detection whose dominant colour is each class (zeros if none)."""
    classes = list(COLOURS) if classes is None else classes
    c = [x for x in colours if x is not None]
    h = np.array([c.count(k) for k in classes], dtype=np.float64)
    return h / max(len(c), 1)


def fairness_discrepancy(colours: list[str | None], target, classes: list[str] | None = None) -> float:
    t = np.asarray(target.tolist() if isinstance(target, torch.Tensor) else target, dtype=np.float64)
    return float(np.linalg.norm(histogram(colours, classes) - t))


def summarise(records: list[dict], target, classes: list[str] | None = None, seed: int = 0) -> dict:
    """Histogram, FD, red fraction, no-detection rate, shape and count accuracy, with bootstrap 95% CIs over images.
    Distribution guidance couples the images of a batch, so image-level intervals are optimistic for it: compare the
    per-seed values too."""
    classes = list(COLOURS) if classes is None else classes
    colours = [r["colour"] for r in records]
    n = len(records)
    return {
        "n": n,
        "histogram": dict(zip(classes, histogram(colours, classes).round(4).tolist())),
        "fd": statistic_ci(lambda idx: fairness_discrepancy([colours[i] for i in idx], target, classes), n, seed=seed,
                           floor=0.0),
        "red_fraction": mean_ci([None if c is None else c == "red" for c in colours], seed=seed),
        "no_detection": mean_ci([not r["detected"] for r in records], seed=seed),
        "shape": mean_ci([r["shape"] for r in records], seed=seed),
        "count": mean_ci([r["count"] for r in records], seed=seed),
        "objects": mean_ci([r["objects"] for r in records], seed=seed),
        "foreground": mean_ci([r["foreground"] for r in records], seed=seed),
    }
