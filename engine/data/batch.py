"""The one type every data source yields to the training step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    x: torch.Tensor  # (B, C, H, W) clean inputs (pixels in [-1, 1] or scaled latents)
    y: torch.Tensor  # (B, L, D) caption token embeddings
    y_mask: torch.Tensor  # (B, L) bool, True = real token
