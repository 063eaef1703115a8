"""The structure discriminator of SADM (Yang et al., CVPR 2024): an encoder of one image's patch values into a unit
vector (the "manifold space"), in which engine/diffusion/structure.py compares the pairwise structure of real and
predicted batches.

It reads patch tokens, not images: under deferred masking each sample keeps its own subset of patches, so the encoder
is a set encoder (per-patch MLP plus a learned position embedding, one self-attention layer, mean over the kept
patches) and sees real and predicted values of the same patches. The output is L2-normalised so that the adversary,
which maximises a distance between affinities, cannot win by scaling its features.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class StructureDiscriminator(nn.Module):
    def __init__(self, patch_channels: int, num_patches: int, width: int = 64, heads: int = 4):
        super().__init__()
        self.tokens = nn.Sequential(nn.Linear(patch_channels, width), nn.GELU(), nn.Linear(width, width))
        self.pos = nn.Parameter(torch.randn(num_patches, width) * 0.02)  # (N, W)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads if width % heads == 0 else 1, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, patches: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """patches (B, K, P) at token positions keep_idx (B, K) (None: all N in order) -> (B, W) unit vectors."""
        B, K, _ = patches.shape
        pos = self.pos[:K].expand(B, K, -1) if keep_idx is None else self.pos[keep_idx]  # (B, K, W)
        h = self.tokens(patches) + pos  # (B, K, W)
        a = self.norm(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]  # (B, K, W): patches see each other (counts, relations)
        return F.normalize(self.head(h.mean(dim=1)), dim=-1)  # (B, W)
