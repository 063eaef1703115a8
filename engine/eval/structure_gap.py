"""How far the pairwise structure of a generated set is from its paired real images', in the attribute net's feature
space (engine/eval/attribute_net.py): a check of batch structure that uses none of a training method's networks (SADM's
discriminator in particular).

Image i of an evaluation is generated from prompt i, and reference image i is the data set's own image for that
prompt, so the two sets have pairs (i, j) in common:

- ``struct_attr``: mean over pairs of |d_gen(i, j) - d_ref(i, j)|, over the mean of d_ref (paired; 0 = the same
  distances between every two images as the real set);
- ``pdist_w1``: the 1-D Wasserstein distance between the two sets of pairwise distances, over the mean of d_ref
  (unpaired: the histogram of distances, whichever pairs they belong to).
"""
from __future__ import annotations

import numpy as np


def pair_distances(features: np.ndarray) -> np.ndarray:
    """Euclidean distances of every pair i < j of rows, (n (n - 1) / 2,)."""
    f = features.astype(np.float64)
    sq = (f * f).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0)
    i, j = np.triu_indices(len(f), k=1)
    return np.sqrt(d2[i, j])


def struct_attr(features: np.ndarray, reference: np.ndarray) -> float:
    g, r = pair_distances(features), pair_distances(reference)
    return float(np.abs(g - r).mean() / max(r.mean(), 1e-12))


def pdist_w1(features: np.ndarray, reference: np.ndarray) -> float:
    g, r = np.sort(pair_distances(features)), np.sort(pair_distances(reference))
    return float(np.abs(g - r).mean() / max(r.mean(), 1e-12))


STATISTICS = {"struct_attr": struct_attr, "pdist_w1": pdist_w1}
