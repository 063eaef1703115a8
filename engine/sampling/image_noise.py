"""Noise fixed per image: draws seeded by a hash of the image's own start noise. An image's result then does not
depend on the batch it is sampled in, and two runs or samplers given the same start noise get the same draws, so
the protocol's paired comparisons stay paired (engine/eval/compare.py)."""
from __future__ import annotations

import hashlib
from dataclasses import replace

import torch

from engine.sampling.solvers import Churn


def image_seed(noise: torch.Tensor, key: bytes = b"") -> int:
    """A 63-bit seed hashed from one image's start noise; `key` makes independent streams from the same noise."""
    digest = hashlib.blake2b(noise.detach().float().cpu().numpy().tobytes(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") >> 1


class ImageNoise:
    """Unit Gaussian like x (B, ...) on each call, image b's from its own generator seeded by start_noise[b]: a
    stream of fresh draws, fixed by the start noise and the order of the calls."""

    def __init__(self, start_noise: torch.Tensor, key: bytes):
        self.generators = [torch.Generator().manual_seed(image_seed(n, key)) for n in start_noise]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"noise for {x.shape[0]} images asked of a stream made for {len(self.generators)}")
        draws = [torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in self.generators]
        return torch.stack(draws).to(device=x.device, dtype=x.dtype)


def with_image_noise(churn: Churn, start_noise: torch.Tensor, key: bytes = b"churn") -> Churn:
    """`churn` drawing its fresh noise per image from that image's start noise (B, ...)."""
    return replace(churn, noise=ImageNoise(start_noise, key))
