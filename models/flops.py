"""Model FLOPs for MFU, counted by running the real forward on the meta device under torch's FlopCounterMode.

Counted: matrix products (linear, conv, bmm, attention), 2 FLOPs per multiply-add; elementwise work is not (the usual
MFU convention). Training FLOPs = 3 × forward (backward costs two forwards)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.config import ModelConfig
from models.microdit import MicroDiT


def forward_flops_per_image(cfg: ModelConfig, caption_len: int, mask_ratio: float = 0.0) -> int:
    """FLOPs of one forward pass for one image with `caption_len` caption tokens and the given mask ratio."""
    with torch.device("meta"):
        model = MicroDiT(cfg, {"attention": "torch"})  # the math reference: counted as its two bmm's
        x = torch.empty(1, cfg.in_channels, cfg.input_size, cfg.input_size)
        y = torch.empty(1, caption_len, cfg.caption_channels)
        keep = kept_tokens(cfg.num_patches, mask_ratio)
        keep_idx = torch.zeros(1, keep, dtype=torch.long) if keep < cfg.num_patches else None
        with FlopCounterMode(display=False) as counter:
            model(x, torch.empty(1), y, None, keep_idx)
    return counter.get_total_flops()


def train_flops_per_image(cfg: ModelConfig, caption_len: int, mask_ratio: float = 0.0) -> int:
    return 3 * forward_flops_per_image(cfg, caption_len, mask_ratio)


def kept_tokens(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept after deferred masking: int(N · (1 - r)) as the official code counts them (it truncates: r = 0.7,
    N = 256 keeps 76, not 77), but at least one, where the official code would keep none and fail."""
    return max(1, int(num_tokens * (1.0 - mask_ratio)))
