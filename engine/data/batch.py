"""The one type every data source yields to the training step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    x: torch.Tensor  # (B, C, H, W) clean inputs (pixels in [-1, 1] or scaled latents)
    y: torch.Tensor  # (B, L, D) caption token embeddings
    # (B, L) bool, True = real token; None = every token is real, known without looking (data.attend_to_padding):
    # attention then gets no mask, which keeps SDPA on its flash kernel (a boolean mask, even all true, does not).
    y_mask: torch.Tensor | None
