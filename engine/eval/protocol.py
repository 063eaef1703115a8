"""The comparison protocol's fixed parts: a held-out prompt set, paired initial noise, bootstrap confidence intervals.

Two runs (or two sampler settings of one run) are compared on identical inputs: the same prompts in the same order
and, for image i, the same initial noise whatever the batch size. Differences are then paired per image, which
removes most of the prompt-to-prompt variance from the comparison.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import ConfigError
from engine.training.seeding import derive_seed

HELD_OUT_SEED = 1_000_000  # SyntheticShapes seed of the prompt set: one set for every run, never a training seed
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class PromptSet:
    """Prompts of an evaluation, with what is needed to score and reproduce them."""

    source: str  # "synthetic" or the prompt file
    prompts: list[str]
    specs: list | None  # ground truth (engine.eval.geneval.PromptSpec) for synthetic prompts, else None
    data_seed: int | None  # SyntheticShapes seed of synthetic prompts (and of their paired reference images)
    seen: list[bool] | None  # synthetic: whether the caption also occurs in the training set
    backgrounds: str = "fixed"  # synthetic: the data set's background variant (engine/data/synthetic.py)

    def record(self) -> dict:
        """What eval.json keeps: enough to rebuild the set and to refuse comparing different sets."""
        rec = {"source": self.source, "count": len(self.prompts), "unique": len(set(self.prompts)),
               "sha256": prompts_hash(self.prompts)}
        if self.data_seed is not None:
            rec["data_seed"] = self.data_seed
        if self.seen is not None:
            rec["seen_in_training"] = int(sum(self.seen))
        return rec


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def synthetic_prompt_set(n: int, image_size: int, data_seed: int, train_captions: set[str] | None = None,
                         backgrounds: str = "fixed") -> PromptSet:
    """The first n samples of SyntheticShapes(data_seed): prompts, ground truth, and which captions training saw.

    The layouts (hence the paired reference images) are never the training images: the seed differs. Captions can
    coincide: the dataset has only 54 one-group captions, so a one-group prompt is always one training also saw;
    two-group captions (about 5,700 possible) are mostly unseen. `seen` records which, so scores can be split."""
    from engine.data.synthetic import SyntheticShapes
    from engine.eval.geneval import spec_from_describe

    ds = SyntheticShapes(n, image_size, data_seed, backgrounds)
    prompts = ds.captions(range(n))
    specs = [spec_from_describe(ds.describe(i)) for i in range(n)]
    seen = None if train_captions is None else [p in train_captions for p in prompts]
    return PromptSet("synthetic", prompts, specs, data_seed, seen, backgrounds)


def file_prompt_set(path, n: int) -> PromptSet:
    """Prompts of a text file (blank lines and #-comments skipped), cycled to n."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts-from {path}: no such file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts-from {path}: no prompts in the file")
    return PromptSet(str(path), [prompts[i % len(prompts)] for i in range(n)], None, None, None)


def paired_noise(seed: int, start: int, count: int, shape: tuple[int, ...], device=None,
                 stream: int | None = None) -> torch.Tensor:
    """Initial noise of images start .. start+count-1: image i's noise depends only on (seed, i), so any batch size
    and any run gives image i the same draw. (count, *shape) float32. `stream`: a nested model's lower stream r,
    drawn from a seed of its own (independent of the image's main noise)."""
    out = torch.empty(count, *shape)
    for j in range(count):
        parts = (seed, "eval-noise", start + j) + (() if stream is None else ("stream", stream))
        g = torch.Generator().manual_seed(derive_seed(*parts))
        out[j] = torch.randn(shape, generator=g)
    return out.to(device) if device is not None else out


def start_noise(edm, channels: int, size: int, seed: int, start: int, count: int, device=None):
    """The paired initial noise of a model whose (highest) stream is `size` wide: paired_noise, and for a nested model
    a list, low first, whose highest stream starts from what a single-resolution model of that size would."""
    if not edm.nested:
        return paired_noise(seed, start, count, (channels, size, size), device)
    sizes = list(edm.resolutions)
    return [paired_noise(seed, start, count, (channels, r, r), device, stream=None if i == len(sizes) - 1 else i)
            for i, r in enumerate(sizes)]


def to_size(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """(B, C, h, h) upsampled by pixel replication to (B, C, size, size) when smaller (a model trained on pooled
    data makes pooled images: each pixel stands for a size/h square)."""
    if size is None or images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="nearest")


# ---------------------------------------------------------------- confidence intervals


def bootstrap_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) indices drawn with replacement; the same seed gives the same resamples for every metric."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_ci(values, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Mean of per-image values with a percentile bootstrap CI over images: {"mean", "ci": [lo, hi], "n"}.
    None values (a metric that does not apply to an image) are left out; no values gives mean None."""
    v = np.asarray([float(x) for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "ci": None, "n": 0}
    means = v[bootstrap_indices(len(v), resamples, seed)].mean(axis=1)
    return {"mean": float(v.mean()), "ci": list(percentile_ci(means, level)), "n": int(len(v))}


def statistic_ci(stat, n: int, level: float = 0.95, resamples: int = 200, seed: int = 0,
                 floor: float | None = None) -> dict:
    """A statistic of a set of n images (e.g. a Fréchet distance) with a bootstrap CI: `stat(indices)` is called on
    all indices and on each resample. Fewer resamples than for means: each call may cost milliseconds.

    The interval is the resamples' spread around the statistic (their quantiles minus their mean, added to it). A
    resample repeats images, which a fresh evaluation never does, and that alone moves a set statistic: a Fréchet
    distance of 256 images rises by more than its own spread, so a plain percentile interval can miss the value it is
    given for. `floor` clips the interval of a statistic that cannot go below it (a distance: 0)."""
    value = float(stat(np.arange(n)))
    boot = np.array([stat(idx) for idx in bootstrap_indices(n, resamples, seed)], dtype=np.float64)
    lo, hi = (value + q - float(boot.mean()) for q in percentile_ci(boot, level))
    if floor is not None:
        lo, hi = max(lo, floor), max(hi, floor)
    return {"value": value, "ci": [lo, hi], "n": n, "resamples": resamples,
            "resample_shift": float(boot.mean()) - value}
