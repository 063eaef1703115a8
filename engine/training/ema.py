"""Exponential moving average of the weights, kept as a second (sharded) copy of the model."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from engine.training.parallel import local_tensors


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of the (unsharded) model, to be sharded like the model itself."""
    ema = copy.deepcopy(model).requires_grad_(False)
    return ema.eval()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, apply: torch.Tensor) -> None:
    """ema += (1 - decay) · apply · (param - ema), on each process's shard. `apply` is a 0-dim 0/1 tensor on the
    device: a skipped (non-finite) step leaves the EMA untouched without a host sync."""
    ema_p = local_tensors(ema.parameters())
    model_p = local_tensors(model.parameters())
    if any(e.shape != m.shape for e, m in zip(ema_p, model_p)):
        raise RuntimeError("ema_update: EMA and model shards differ in shape; reshard() the EMA after a no-grad forward")
    weight = (1.0 - decay) * apply.to(ema_p[0].dtype)
    delta = torch._foreach_sub(model_p, ema_p)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(ema_p, delta)


def ema_decay_at(step: int, decay: float, start: int) -> float:
    """The EMA decay of 0-based step `step`: 0 before `start` (the EMA copies the weights, so it begins at the
    weights of step start - 1, as the official trainer's EMA does when it starts), `decay` from then on."""
    return decay if step >= start else 0.0
