"""Few-shot tasks from the synthetic renderer, for the TiF learner (engine/adapters/tif.py).

Classes differ by a subtle attribute: the shape of one small object (circle / square / triangle at 6-7 px on 32 px,
where they differ by a handful of corner pixels), or, with `kind="notch"`, a plain square against a square with a
notch cut from its top-right corner (a shape no synthetic caption names). A salient nuisance, colour, is tied to the
class in every shot (class c is always COLOURS_TIED[c]); the test sets come with the same tie ("aligned") and with the
colours rotated by one class ("swapped"), where a colour-reading classifier is always wrong. A task is a pure function
of (seed, shots, kind).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.config import ConfigError
from engine.data.synthetic import BACKGROUND, COLOURS, shape_mask

COLOURS_TIED = ("red", "blue", "green")
KINDS = {"shape": ("circle", "square", "triangle"), "notch": ("square", "notched")}
MAX_SHOTS = 16


def object_mask(kind: str, d: int) -> np.ndarray:
    if kind == "notched":
        m = shape_mask("square", d).copy()
        n = max(2, d // 3)
        m[:n, d - n:] = False  # the top-right corner cut away
        return m
    return shape_mask(kind, d)


@dataclass
class FewShotTask:
    classes: tuple[str, ...]
    shots: torch.Tensor  # (C * K, 3, S, S) in [-1, 1], class-major
    shot_labels: torch.Tensor  # (C * K,)
    aligned: torch.Tensor  # (C * T, 3, S, S)
    swapped: torch.Tensor
    test_labels: torch.Tensor  # (C * T,)


def render(rng: np.random.Generator, kind: str, colour: str, size: int, sizes: tuple[int, int]) -> np.ndarray:
    d = int(rng.integers(sizes[0], sizes[1] + 1))
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    x0, y0 = (int(v) for v in rng.integers(1, size - d, size=2))
    img[y0:y0 + d, x0:x0 + d][object_mask(kind, d)] = COLOURS[colour]
    return img


def make_task(seed: int, shots: int, kind: str = "shape", test_per_class: int = 30, image_size: int = 32,
              sizes: tuple[int, int] = (6, 7)) -> FewShotTask:
    """The task of `seed` with `shots` training images per class (ConfigError beyond MAX_SHOTS: the pool a seed draws
    its shots from, so K-shot sets of one seed are nested)."""
    if kind not in KINDS:
        raise ConfigError(f"few-shot task kind {kind!r} must be one of {', '.join(KINDS)}")
    if not 1 <= shots <= MAX_SHOTS:
        raise ConfigError(f"shots K={shots}: a task has {MAX_SHOTS} shots per class available "
                          f"(K must be 1..{MAX_SHOTS})")
    classes = KINDS[kind]
    C = len(classes)

    def images(stream: int, n: int, colour_of) -> torch.Tensor:
        out = []
        for c in range(C):
            rng = np.random.default_rng([seed, stream, c])
            out += [render(rng, classes[c], colour_of(c), image_size, sizes) for _ in range(n)]
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        return x.float().div(127.5).sub(1.0).contiguous()

    pool = images(0, MAX_SHOTS, lambda c: COLOURS_TIED[c])
    keep = torch.cat([torch.arange(c * MAX_SHOTS, c * MAX_SHOTS + shots) for c in range(C)])
    return FewShotTask(
        classes=classes, shots=pool[keep], shot_labels=torch.arange(C).repeat_interleave(shots),
        aligned=images(1, test_per_class, lambda c: COLOURS_TIED[c]),
        swapped=images(2, test_per_class, lambda c: COLOURS_TIED[(c + 1) % C]),
        test_labels=torch.arange(C).repeat_interleave(test_per_class))
