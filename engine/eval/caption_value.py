"""What each part of a synthetic caption is worth to the denoising loss: the dataset's own ceiling, no model involved.

At a noise level so high that the noisy image says nothing (sigma -> inf), the best denoiser outputs E[x0 | what it
knows], and its error is the spread of x0 among the images that share what it knows. Grouping many SyntheticShapes
samples by more and more of their caption (nothing, the colours, their order, the relation, the counts, the shapes)
gives that lowest possible error for each level of knowledge. The drop from one level to the next is all the loss
can ever reward a model for reading that part of the caption; a word whose drop is small teaches slowly.

Each group's spread is the unbiased within-group variance (sum of squares about the group mean / (n - 1)), so small
groups are not flattered; a group of one sample has no estimate and is left out (the count of samples used is
reported: with too few samples the finest levels keep mostly the commonest captions, so their error is not the
set's). The same group means, as predictors of the held-out images that --caption-use measures a model on, give
each level's error on exactly those images (including the small error of an estimated group mean), to set against
the model's own error there at a noise level that leaves nothing of the image (sigma 80).
"""
from __future__ import annotations

import numpy as np

from engine.data.synthetic import SyntheticShapes
from engine.eval.protocol import HELD_OUT_SEED, mean_ci

POOL_SEED = 3_000_017  # the images groups are formed from: no training, held-out or attribute-net seed

# From knowing nothing to knowing the whole caption. "colours" is the unordered set a bag of words gives; "ordered"
# adds which group is named first (the one left of / above the other).
LEVELS = ("nothing", "colours", "ordered colours", "+ relation", "+ relation, counts", "+ relation, shapes",
          "whole caption")


def knowledge_keys(facts: dict) -> dict[str, tuple]:
    """For each of LEVELS, the key that groups images a predictor knowing that much cannot tell apart."""
    groups, relation = facts["groups"], facts["relation"]
    colours = tuple(g["colour"] for g in groups)
    counts = tuple(g["count"] for g in groups)
    shapes = tuple(g["shape"] for g in groups)
    keys = ((), tuple(sorted(colours)), colours, (colours, relation), (colours, relation, counts),
            (colours, relation, shapes), (colours, relation, counts, shapes))
    return dict(zip(LEVELS, keys))


def group_stats(values: np.ndarray, keys: list, chunk: int = 8192) -> dict:
    """key -> (rows, mean row, sum of squares about it) of the rows of `values` (n, d) holding that key, in float64,
    a chunk of rows at a time (a group can hold every row of a large pool)."""
    members: dict = {}
    for row, key in enumerate(keys):
        members.setdefault(key, []).append(row)
    stats = {}
    for key, rows in members.items():
        total, squares = np.zeros(values.shape[1]), 0.0
        for lo in range(0, len(rows), chunk):
            x = values[rows[lo:lo + chunk]].astype(np.float64)
            total += x.sum(0)
            squares += float((x * x).sum())
        mean = total / len(rows)
        stats[key] = (len(rows), mean, squares - len(rows) * float(mean @ mean))
    return stats


def within_group_mse(stats: dict) -> tuple[float, int]:
    """Mean squared error per element of predicting each row by its group's mean (`group_stats`), with each group's
    variance estimated without bias (n_g - 1). Returns (mse, rows used); groups of one row are left out."""
    total, used, width = 0.0, 0, 1
    for n, mean, squares in stats.values():
        width = len(mean)
        if n >= 2:
            total += squares / (n - 1) * n  # n rows, each with the group's unbiased variance
            used += n
    if used == 0:
        raise ValueError("every group holds a single sample: nothing to estimate; use more samples")
    return total / used / width, used


def group_mean_errors(stats: dict, images: np.ndarray, image_keys: list) -> list[float]:
    """Per image of `images` (m, d): the MSE of predicting it by the mean of its key's group (`group_stats`); an image
    whose key no group holds is left out."""
    return [float(((x - stats[key][1]) ** 2).mean()) for x, key in zip(images, image_keys) if key in stats]


def synthetic_pixels(ds: SyntheticShapes, chunk: int = 1000) -> np.ndarray:
    """All of `ds`'s images as rows (n, 3·H·W), float32."""
    n, pixels = len(ds), 3 * ds.image_size ** 2
    values = np.empty((n, pixels), np.float32)
    for lo in range(0, n, chunk):
        idx = list(range(lo, min(n, lo + chunk)))
        values[lo:lo + len(idx)] = ds.images(idx).reshape(len(idx), pixels).numpy()
    return values


def caption_value(num_samples: int, image_size: int = 32, seed: int = POOL_SEED, held_out: int = 128) -> dict:
    """Lowest possible x0 error at sigma -> inf for each level of caption knowledge: on `num_samples` images of
    SyntheticShapes(seed) (the default fixed-background set), and on the first `held_out` held-out images (those
    --caption-use measures a model on), each predicted by its group's mean over the pool."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    pool = SyntheticShapes(num_samples, image_size, seed)
    values = synthetic_pixels(pool)
    keys = [knowledge_keys(pool.describe(i)) for i in range(num_samples)]
    test = SyntheticShapes(held_out, image_size, HELD_OUT_SEED)
    test_values = synthetic_pixels(test)
    test_keys = [knowledge_keys(test.describe(i)) for i in range(held_out)]
    levels = {}
    for level in LEVELS:
        stats = group_stats(values, [k[level] for k in keys])  # one pass over the pool per level
        mse, used = within_group_mse(stats)
        errors = group_mean_errors(stats, test_values, [k[level] for k in test_keys])
        levels[level] = {"mse": mse, "groups": len(stats), "samples_used": used,
                         "held_out": mean_ci(errors)}
    return {"num_samples": num_samples, "image_size": image_size, "seed": seed, "held_out_seed": HELD_OUT_SEED,
            "held_out_images": held_out, "levels": levels}


def caption_value_table(result: dict) -> str:
    """One line per level: the error, its share below knowing nothing, the number of groups and the error on the
    held-out images."""
    base = result["levels"]["nothing"]["mse"]
    lines = [f"{'knows':22s} {'best x0 MSE':>11s} {'below nothing':>14s} {'groups':>7s} {'samples used':>13s} "
             f"{'held-out MSE':>13s}"]
    for level, v in result["levels"].items():
        h = v["held_out"]
        held = "-" if h["mean"] is None else f"{h['mean']:.4f} ({h['n']} images)"
        lines.append(f"{level:22s} {v['mse']:11.4f} {1 - v['mse'] / base:13.1%} {v['groups']:7d} "
                     f"{v['samples_used']:13d} {held:>13s}")
    return "\n".join(lines)
