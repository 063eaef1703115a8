"""The randomness of one training step (noise levels, noise, kept tokens, caption dropout), drawn as a pure function
of (seed, step) so that any world size sees the same numbers and a resumed run continues exactly."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.training.seeding import derive_seed
from models.flops import kept_tokens

if TYPE_CHECKING:
    from engine.diffusion.edm import EDM


@dataclass
class StepNoise:
    """All randomness of one step's (micro-)batch: noise levels, noise, kept tokens, caption drop decisions."""

    sigma: torch.Tensor  # (B,)
    noise: torch.Tensor  # (B, C, H, W)
    keep_idx: torch.Tensor | None  # (B, K) sorted token indices, None when nothing is masked
    drop_caption: torch.Tensor  # (B,) bool

    def slice(self, lo: int, hi: int) -> "StepNoise":
        keep = None if self.keep_idx is None else self.keep_idx[lo:hi]
        return StepNoise(self.sigma[lo:hi], self.noise[lo:hi], keep, self.drop_caption[lo:hi])


def draw_step_noise(
    edm: "EDM", seed: int, step: int, batch: int, shape: tuple[int, int, int], num_tokens: int,
    mask_ratio: float, caption_dropout: float, device: torch.device,
) -> StepNoise:
    """Randomness of a whole global batch as a pure function of (seed, step), drawn on `device` (no host sync).
    Every process draws the same global tensors and takes its slice, so any world size sees the same numbers
    and a resumed run continues exactly."""
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, step, "edm"))
    sigma = (torch.randn(batch, generator=gen, device=device) * edm.p_std + edm.p_mean).exp()
    noise = torch.randn(batch, *shape, generator=gen, device=device)
    keep = kept_tokens(num_tokens, mask_ratio)
    keep_idx = None
    if keep < num_tokens:
        scores = torch.rand(batch, num_tokens, generator=gen, device=device)
        keep_idx = scores.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, K): exactly K distinct tokens each
    drop = torch.rand(batch, generator=gen, device=device) < caption_dropout
    return StepNoise(sigma, noise, keep_idx, drop)
