"""Paired comparison of two arms that were each trained with several seeds (engine/evaluate.py --compare A0,A1 B0,B1).

On the CPU reference two trainings of one recipe that differ only in run.seed score as far apart as most levers move
them, so an interval over prompts alone (engine/eval/compare.py) overstates what one run per arm shows. Here each arm
is a list of evaluations of runs trained with seeds 0..K-1 (the same prompts and noise everywhere), paired by position:
seed k of A with seed k of B. A metric's difference is the mean over the K pairs of each pair's mean difference over
images. Its interval comes from a two-level bootstrap that draws the images and, independently, the K pairs with
replacement, so it widens with the spread between seed pairs as well as with the prompts. engine/eval/compare.py
checks that the evaluations are comparable and sends a single seed per arm to its plain paired comparison.
"""
from __future__ import annotations

import numpy as np

from engine.eval.attribute_net import frechet_of_features
from engine.eval.protocol import BOOTSTRAP_RESAMPLES, bootstrap_indices, percentile_ci
from engine.eval.structure_gap import STATISTICS


def pair_draws(pairs: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, pairs) seed-pair indices drawn with replacement, from a stream apart from the images' draws."""
    return np.random.default_rng([seed, 1]).integers(0, pairs, size=(resamples, pairs))


def replicated_difference(a: list[np.ndarray], b: list[np.ndarray], idx: np.ndarray, pairs_idx: np.ndarray) -> dict:
    """Per-image values of each seed of A and B (lists of (N,) with NaN where the metric does not apply): the mean
    over pairs of the per-pair mean of B - A, its two-level bootstrap CI and each pair's own difference."""
    diff = np.stack([bk - ak for ak, bk in zip(a, b)])  # (K, N)
    ok = ~np.isnan(diff)
    if not ok.any(axis=1).all():
        return {"a": None, "b": None, "diff": None, "ci": None, "n": 0, "per_pair": None}
    d = np.where(ok, diff, 0.0)
    per_pair = d.sum(axis=1) / ok.sum(axis=1)
    boot_pair = d[:, idx].sum(axis=2) / np.maximum(ok[:, idx].sum(axis=2), 1)  # (K, R): each pair on each image draw
    boot = boot_pair[pairs_idx, np.arange(len(idx))[:, None]].mean(axis=1)  # (R,): the drawn pairs' mean
    return {"a": float(np.mean([np.nanmean(x) for x in a])), "b": float(np.mean([np.nanmean(x) for x in b])),
            "diff": float(per_pair.mean()), "ci": list(percentile_ci(boot)), "n": int(ok.sum(axis=1).min()),
            "per_pair": [float(v) for v in per_pair]}


def replicated_statistic(a: list, b: list, statistic, resamples: int, seed: int = 0) -> dict | None:
    """A set statistic of generated vs reference features (the attribute Fréchet distance, a structure gap): B - A
    per seed pair on all images, their mean, and the two-level bootstrap CI of that mean."""
    if any(e.features is None or e.reference is None for e in (*a, *b)):
        return None
    ref, n = a[0].reference, len(a[0].reference)

    def stat(e, i: np.ndarray) -> float:
        return statistic(e.features[i], ref[i])

    everything = np.arange(n)
    whole_a, whole_b = [stat(e, everything) for e in a], [stat(e, everything) for e in b]
    per_pair = [vb - va for va, vb in zip(whole_a, whole_b)]
    draws = pair_draws(len(a), resamples, seed)
    boot = []
    for i, pairs in zip(bootstrap_indices(n, resamples, seed), draws):
        by_pair = {k: stat(b[k], i) - stat(a[k], i) for k in set(pairs.tolist())}
        boot.append(np.mean([by_pair[k] for k in pairs]))
    return {"a": float(np.mean(whole_a)), "b": float(np.mean(whole_b)),
            "diff": float(np.mean(per_pair)), "ci": list(percentile_ci(np.array(boot))), "n": n,
            "resamples": resamples, "per_pair": [float(v) for v in per_pair]}


def compare_replicates(a: list, b: list, metrics: tuple[str, ...], statistic_resamples: int, seed: int = 0) -> dict:
    """Arm B against arm A: lists of evaluations (compare.Evaluation) of one recipe each, trained with seeds paired by
    position. Per metric and per set statistic (with statistic_resamples draws: each costs milliseconds): the mean
    over seed pairs of B - A, its CI and each pair's own."""
    if len(a) != len(b):
        raise ValueError(f"arms of {len(a)} and {len(b)} seeds: replicates are paired by position, so each arm needs "
                         "the same number")
    idx = bootstrap_indices(a[0].record["num_images"], BOOTSTRAP_RESAMPLES, seed)
    pairs_idx = pair_draws(len(a), BOOTSTRAP_RESAMPLES, seed)
    out = {m: replicated_difference([e.per_image[m] for e in a], [e.per_image[m] for e in b], idx, pairs_idx)
           for m in metrics}
    fd = replicated_statistic(a, b, frechet_of_features, statistic_resamples, seed)
    if fd is not None:
        out["fd_attr"] = fd
        for name, statistic in STATISTICS.items():
            out[name] = replicated_statistic(a, b, statistic, statistic_resamples, seed)
    return out
