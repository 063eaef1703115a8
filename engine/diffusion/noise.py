"""The randomness of one training step (noise levels, noise, kept tokens, caption dropout), drawn as a pure function
of (seed, step) so that any world size sees the same numbers and a resumed run continues exactly."""
from __future__ import annotations

import math
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
    stream_noise: tuple[torch.Tensor, ...] = ()  # a nested model's lower streams, low first: fresh, not pooled
    cond_noise: torch.Tensor | None = None  # (B, C, r, r) unit noise of a low-resolution condition (lowres_aug)
    cond_level: torch.Tensor | None = None  # (B,) its level, uniform in [0, lowres_aug]

    def slice(self, lo: int, hi: int) -> "StepNoise":
        part = lambda t: None if t is None else t[lo:hi]
        streams = tuple(n[lo:hi] for n in self.stream_noise)
        return StepNoise(self.sigma[lo:hi], self.noise[lo:hi], part(self.keep_idx), self.drop_caption[lo:hi], streams,
                         part(self.cond_noise), part(self.cond_level))


def draw_step_noise(
    edm: "EDM", seed: int, step: int, batch: int, shape: tuple[int, int, int], num_tokens: int,
    mask_ratio: float, caption_dropout: float, device: torch.device, stream_shapes: tuple = (),
) -> StepNoise:
    """Randomness of a whole global batch as a pure function of (seed, step), drawn on `device` (no host sync).
    Every process draws the same global tensors and takes its slice, so any world size sees the same numbers
    and a resumed run continues exactly. `shape`: the (highest) stream's; `stream_shapes`: a nested model's lower
    streams, each given independent noise (drawn last, so the other draws are those of a single-stream run)."""
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, step, "edm"))
    sigma = draw_sigma(edm, batch, gen, device)
    noise = torch.randn(batch, *shape, generator=gen, device=device)
    keep = kept_tokens(num_tokens, mask_ratio)
    keep_idx = None
    if keep < num_tokens:
        scores = torch.rand(batch, num_tokens, generator=gen, device=device)
        keep_idx = scores.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, K): exactly K distinct tokens each
    drop = torch.rand(batch, generator=gen, device=device) < caption_dropout
    streams = tuple(torch.randn(batch, *s, generator=gen, device=device) for s in stream_shapes)
    cond_noise = cond_level = None
    if edm.lowres_condition and edm.lowres_aug > 0:  # drawn last: the other draws are those of an unconditioned run
        r = edm.lowres_condition
        cond_level = torch.rand(batch, generator=gen, device=device) * edm.lowres_aug
        cond_noise = torch.randn(batch, shape[0], r, r, generator=gen, device=device)
    return StepNoise(sigma, noise, keep_idx, drop, streams, cond_noise, cond_level)


def draw_sigma(edm: "EDM", batch: int, gen: torch.Generator, device) -> torch.Tensor:
    """(B,) log-normal noise levels; with edm.sigma_range = (lo, hi) the log-normal truncated to [lo, hi), drawn by
    its inverse CDF from one uniform per sample (in float64: the tails of the normal CDF need it)."""
    if not edm.sigma_range:
        return (torch.randn(batch, generator=gen, device=device) * edm.p_std + edm.p_mean).exp()
    lo, hi = edm.sigma_range
    z = lambda s, default: torch.tensor(default if s is None else (math.log(s) - edm.p_mean) / edm.p_std,
                                        dtype=torch.float64, device=device)
    a, b = torch.special.ndtr(z(lo, -math.inf)), torch.special.ndtr(z(hi, math.inf))
    u = a + (b - a) * torch.rand(batch, generator=gen, device=device, dtype=torch.float64)
    sigma = (torch.special.ndtri(u) * edm.p_std + edm.p_mean).exp()
    return sigma.clamp(lo or 0.0, hi if hi is not None else math.inf).float()
