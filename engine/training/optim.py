"""AdamW (fused where the device supports it) and the warmup + cosine/constant learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from engine.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, biases or 1-D parameters), or on every parameter with
    cfg.decay_norms_and_biases (the official code). Fused AdamW also lets a non-finite step be skipped on the device
    (optimizer.found_inf) without a host sync."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decayed = lambda p: cfg.decay_norms_and_biases or p.dim() >= 2
    groups = [{"params": [p for p in trained if decayed(p)], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trained if not decayed(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup from 0 at step 0 to 1 at step
    warmup_steps, then cosine (to min_lr_ratio at step total_steps) or constant. These are the official trainer's
    schedules (Composer's CosineAnnealingWithWarmup and ConstantWithWarmup, evaluated at the batch count)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
