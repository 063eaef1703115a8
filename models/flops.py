"""Model FLOPs for MFU, counted by running the real forward on the meta device under torch's FlopCounterMode.

Counted: matrix products (linear, conv, bmm, attention), 2 FLOPs per multiply-add; elementwise work is not (the usual
MFU convention). Training FLOPs = 3 × forward (backward costs two forwards)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.config import ModelConfig
from models.microdit import MicroDiT
from models.nested import NestedConfig, NestedMicroDiT


def forward_flops_per_image(cfg: ModelConfig | NestedConfig, caption_len: int, mask_ratio: float = 0.0) -> int:
    """FLOPs of one forward pass for one image with `caption_len` caption tokens and the given mask ratio (of the
    high-resolution stream of a nested model, whose every stream is counted)."""
    nested = isinstance(cfg, NestedConfig)
    with torch.device("meta"):
        # the math reference attention: counted as its two bmm's
        model = NestedMicroDiT(cfg, {"attention": "torch"}) if nested else MicroDiT(cfg, {"attention": "torch"})
        sizes = cfg.resolutions if nested else [cfg.input_size]
        channels = cfg.in_channels + (0 if nested else cfg.cond_channels)  # a conditioning image is part of the input
        xs = [torch.empty(1, channels, r, r) for r in sizes]
        y = torch.empty(1, caption_len, (cfg.inner if nested else cfg).caption_channels)
        keep = kept_tokens(cfg.num_patches, mask_ratio)
        keep_idx = torch.zeros(1, keep, dtype=torch.long) if keep < cfg.num_patches else None
        with FlopCounterMode(display=False) as counter:
            model(xs if nested else xs[0], torch.empty(1), y, None, keep_idx)
    return counter.get_total_flops()


def train_flops_per_image(cfg: ModelConfig | NestedConfig, caption_len: int, mask_ratio: float = 0.0) -> int:
    return 3 * forward_flops_per_image(cfg, caption_len, mask_ratio)


def tokens_per_image(cfg: ModelConfig | NestedConfig, mask_ratio: float) -> int:
    """Image tokens the network's last blocks process per image: the kept ones, plus a nested model's inner ones."""
    kept = kept_tokens(cfg.num_patches, mask_ratio)
    if isinstance(cfg, NestedConfig):
        return kept + cfg.inner.num_patches
    return kept


def kept_tokens(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept after deferred masking: int(N · (1 - r)) as the official code counts them (it truncates: r = 0.7,
    N = 256 keeps 76, not 77), but at least one, where the official code would keep none and fail."""
    return max(1, int(num_tokens * (1.0 - mask_ratio)))
