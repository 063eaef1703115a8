"""SADM's batch structure (Yang et al., CVPR 2024): an affinity matrix over the samples of a micro-batch in the
discriminator's embedding space, and the structural distance between the matrix of the real samples x0 and that of
the denoiser's one-step predictions D(x0 + sigma n; sigma).

The paper states the idea (pairwise relations in each batch, an affinity matrix, a structure discriminator that
maximises the real-vs-generated structural distance while the denoiser minimises it); the kernel, the distance and
the noise gate here are choices (config keys sadm.kernel, sadm.distance, sadm.sigma_max).
"""
from __future__ import annotations

import torch

KERNELS = ("cosine", "gauss", "student_t")
DISTANCES = ("l1", "l2")


def affinity(emb: torch.Tensor, kernel: str) -> torch.Tensor:
    """(B, W) unit vectors -> (B, B) symmetric affinities. With unit vectors |a - b|² = 2 - 2 cos(a, b), so every
    kernel is a decreasing function of that distance: cosine itself (in [-1, 1]), Gaussian exp(-|a - b|²) and
    Student-t 1 / (1 + |a - b|²) (both in (0, 1], the latter with heavier tails)."""
    cos = emb @ emb.T  # (B, B)
    cos = (cos + cos.T) / 2  # exactly symmetric whatever order the matmul summed in
    if kernel == "cosine":
        return cos
    d2 = (2 - 2 * cos).clamp_min(0)
    if kernel == "gauss":
        return torch.exp(-d2)
    if kernel == "student_t":
        return 1 / (1 + d2)
    raise ValueError(f"unknown structure kernel {kernel!r}; choices: {', '.join(KERNELS)}")


def pair_mask(sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """(B, B) float weights of the pairs that count: i != j, both samples' noise below sigma_max (0 = every level).
    At high noise D's output is the posterior mean, whose batch structure cannot match the data's: the gate keeps
    the structure term from fighting the denoising loss there."""
    keep = torch.ones_like(sigma, dtype=torch.bool) if sigma_max <= 0 else sigma < sigma_max  # (B,)
    pairs = keep[:, None] & keep[None, :]
    pairs &= ~torch.eye(len(sigma), dtype=torch.bool, device=sigma.device)
    return pairs.float()


def structure_distance(s_real: torch.Tensor, s_fake: torch.Tensor, mask: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean over the masked pairs of |S_real - S_fake| (l1) or its square (l2); 0 when no pair counts."""
    diff = s_real - s_fake
    if distance == "l1":
        d = diff.abs()
    elif distance == "l2":
        d = diff.square()
    else:
        raise ValueError(f"unknown structure distance {distance!r}; choices: {', '.join(DISTANCES)}")
    return (d * mask).sum() / mask.sum().clamp_min(1)


def structure_loss(disc, real: torch.Tensor, fake: torch.Tensor, keep_idx, sigma: torch.Tensor, kernel: str,
                   distance: str, sigma_max: float) -> torch.Tensor:
    """L_S of one micro-batch: real and predicted patch values (B, K, P) of the same kept patches."""
    s_real = affinity(disc(real, keep_idx), kernel)
    s_fake = affinity(disc(fake, keep_idx), kernel)
    return structure_distance(s_real, s_fake, pair_mask(sigma, sigma_max), distance)
