"""Deterministic global-batch indices: which samples optimisation step `step` sees.

The data order is a pure function of (seed, num_samples): epoch e is a fixed permutation, the stream is the
concatenation of epochs, and step s takes stream positions [s*B, (s+1)*B). Nothing is stateful, so a resumed run
needs only the step number, and any split of the global batch over ranks sees exactly the same samples.
"""
from __future__ import annotations

from functools import lru_cache

import torch

_MASK64 = (1 << 64) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """Well-mixed 63-bit generator seed for (seed, epoch) (splitmix64 finaliser; stable across Python runs)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@lru_cache(maxsize=2)  # consecutive steps reuse the current (and next) epoch's permutation
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of `epoch`: LongTensor (num_samples,), a permutation of range(num_samples). Do not mutate."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=g)


def global_batch_indices(step: int, global_batch: int, num_samples: int, seed: int) -> torch.Tensor:
    """Sample indices of optimisation step `step` (0-based): LongTensor (global_batch,).

    The batch may span an epoch boundary (or several epochs when global_batch > num_samples).
    """
    for name, value, low in (("step", step, 0), ("global_batch", global_batch, 1),
                             ("num_samples", num_samples, 1), ("seed", seed, 0)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    start, end = step * global_batch, (step + 1) * global_batch  # stream positions [start, end)
    parts = []
    for epoch in range(start // num_samples, (end - 1) // num_samples + 1):
        lo = max(start - epoch * num_samples, 0)
        hi = min(end - epoch * num_samples, num_samples)
        parts.append(epoch_permutation(num_samples, seed, epoch)[lo:hi])
    return torch.cat(parts)  # a fresh tensor, never a view of the cached permutation


def rank_slice(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch: indices[rank*B/W : (rank+1)*B/W]."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    n = len(indices)
    if n % world_size:
        raise ValueError(f"global_batch ({n}) must be divisible by world_size ({world_size})")
    per = n // world_size
    return indices[rank * per:(rank + 1) * per]
