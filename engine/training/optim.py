"""The optimizer (fused AdamW, or Muon for the hidden matrices) and the warmup + cosine/constant learning-rate
schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from engine.config import OptimConfig
from engine.training.muon import MuonAdamW


# Matrices that Muon leaves to AdamW, by a module name in the parameter's path: the patch embedding and the layers that
# write the output (input and output layers are not "hidden" matrices: their rows or columns are pixels, so an
# orthogonalised step spreads one pixel's gradient over all), and the MoE routers (a few rows, one per expert).
ADAMW_MATRICES = ("x_embedder", "conv_in", "conv_out", "gate")
ADAMW_PREFIXES = ("final_layer.linear.",)


def takes_muon(name: str, p: torch.Tensor) -> bool:
    """Whether Muon steps this parameter (optim.optimizer=muon): matrices, expert banks and conv kernels inside the
    network."""
    parts = name.split(".")
    return p.dim() >= 2 and not any(m in parts for m in ADAMW_MATRICES) and not name.startswith(ADAMW_PREFIXES)


def _decayed(cfg: OptimConfig):
    """Which parameters take weight decay: matrices only, or every one with cfg.decay_norms_and_biases."""
    return lambda p: cfg.decay_norms_and_biases or p.dim() >= 2


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Fused AdamW with weight decay on matrices only (not on norms, biases or 1-D parameters), or on every parameter
    with cfg.decay_norms_and_biases (the official code); build_muon with optim.optimizer=muon. Both let a non-finite
    step be skipped on the device (optimizer.found_inf) without a host sync."""
    if cfg.optimizer == "muon":
        return build_muon(model, cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    decayed = _decayed(cfg)
    groups = [{"params": [p for p in trained if decayed(p)], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trained if not decayed(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def build_muon(model: nn.Module, cfg: OptimConfig) -> MuonAdamW:
    """Muon (RMS-matched to AdamW, so at the same lr and weight decay) for the hidden matrices, with expert banks
    (3-D) in a batched group; AdamW for the rest, weight decay as in build_optimizer."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [(n, p) for n, p in named if takes_muon(n, p)]
    rest = [p for n, p in named if not takes_muon(n, p)]
    decayed = _decayed(cfg)
    groups = [{"params": [p for _, p in muon if p.dim() != 3], "muon": True, "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in muon if p.dim() == 3], "muon": True, "batched": True,
               "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if decayed(p)], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if not decayed(p)], "weight_decay": 0.0}]
    return MuonAdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                     momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps, ns_dtype=cfg.muon_ns_dtype)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup from 0 at step 0 to 1 at step
    warmup_steps, then cosine (to min_lr_ratio at step total_steps), constant, or warmup-stable-decay. Cosine and
    constant are the official trainer's schedules (Composer's CosineAnnealingWithWarmup and ConstantWithWarmup,
    evaluated at the batch count); wsd holds the peak until the last decay_fraction of the steps and then decays as
    transformers' get_wsd_schedule does (tests compare the two). Our warmup starts at 0 as the official trainer's
    does, where transformers' starts at min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    # The cosine is a decay that starts where warmup ends; wsd's starts decay_fraction of the steps before the end.
    decay_start, shape = cfg.warmup_steps, "cosine"
    if cfg.schedule == "wsd":
        decay_start = max(total_steps - max(round(cfg.decay_fraction * total_steps), 1), cfg.warmup_steps)
        shape = cfg.decay_shape
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
    decayed = {"linear": 1 - progress, "1-sqrt": 1 - math.sqrt(progress),
               "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[shape]
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decayed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
