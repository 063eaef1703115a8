"""One optimizer step: gradient accumulation over micro-batches, clipping, a device-side skip of non-finite steps,
the optimizer (AdamW or Muon) and EMA. No host sync: counters stay on the device until a log step reads them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

from engine.diffusion.edm import EDM
from engine.diffusion.noise import StepNoise
from engine.training.ema import ema_update


@dataclass
class StepCounters:
    """Device-side tallies, read only on log steps."""

    device: torch.device
    loss_sum: torch.Tensor = field(init=False)  # sum of finite step losses since the last log
    finite_steps: torch.Tensor = field(init=False)  # steps counted in loss_sum
    steps: int = 0  # steps since the last log (host-side count, no sync)
    nonfinite_total: torch.Tensor = field(init=False)
    streak: torch.Tensor = field(init=False)  # consecutive non-finite steps, now
    max_streak: torch.Tensor = field(init=False)  # longest streak since the last log
    grad_norm: torch.Tensor = field(init=False)  # of the last step

    def __post_init__(self):
        z = lambda: torch.zeros((), device=self.device)
        self.loss_sum, self.finite_steps, self.grad_norm = z(), z(), z()
        self.nonfinite_total, self.streak, self.max_streak = z(), z(), z()

    def load_window(self, window: dict | None, is_main: bool) -> None:
        """Reopen a checkpointed logging window. Its loss sums are over all processes: the main process takes them
        and the others start from zero, so the log step's all-reduce gives the same totals. None (checkpoints
        written before windows were saved): start a new window."""
        if window is None:
            return
        self.loss_sum.fill_(window["loss_sum"] if is_main else 0.0)
        self.finite_steps.fill_(window["finite_steps"] if is_main else 0.0)
        self.max_streak.fill_(window["max_streak"])
        self.steps = window["steps"]

    def reset_window(self) -> None:
        """Start a new logging window (totals and the current streak carry on)."""
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        self.max_streak.copy_(self.streak)
        self.steps = 0


def train_step(
    model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, edm: EDM, noise: StepNoise, batches,
    grad_clip: float, ema_decay: float, counters: StepCounters, sadm=None, step: int = 0,
) -> None:
    """`batches`: this process's micro-batches of the step, each (Batch, lo, hi) with [lo, hi) its slice of `noise`.
    `sadm` (engine/training/sadm.py, None = off): its structural distance of each micro-batch is added to the loss
    with weight sadm.cfg.weight, and its discriminator steps after the optimizer; `step` gates both."""
    accum = len(batches)
    loss_total = torch.zeros((), device=counters.device)
    for i, (batch, lo, hi) in enumerate(batches):
        n = noise.slice(lo, hi)
        drop = n.drop_caption  # (b,) the null caption: all-zero embedding, every position valid
        y = torch.where(drop[:, None, None], torch.zeros_like(batch.y), batch.y)
        y_mask = None if batch.y_mask is None else batch.y_mask | drop[:, None]  # None: nothing padded, no mask
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(i == accum - 1)  # reduce-scatter once, after the last micro-batch
        if sadm is None:
            loss = edm.loss(model, batch.x, y, y_mask, n) / accum
            loss.backward()
        else:
            edm_loss, denoised, target = edm.loss_terms(model, batch.x, y, y_mask, n)
            loss = edm_loss / accum
            ls = sadm.generator_term(step, denoised, target, n.keep_idx, n.sigma, accum)
            (loss if ls is None else loss + sadm.cfg.weight * ls / accum).backward()
        loss_total += loss.detach()  # the denoising loss alone: comparable with and without SADM

    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    # The global grad norm is identical on every process, so all of them skip together; a NaN/Inf loss on any
    # process makes the reduced gradient non-finite too.
    finite = torch.isfinite(grad_norm)
    optimizer.found_inf = (~finite).float()  # fused AdamW and MuonAdamW skip the update on the device when this is 1
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(ema, model, ema_decay, finite.float())
    if sadm is not None:
        sadm.discriminator_step(step, finite)

    bad = (~finite).float()
    counters.streak = (counters.streak + 1) * bad
    counters.max_streak = torch.maximum(counters.max_streak, counters.streak)
    counters.nonfinite_total += bad
    counters.loss_sum += torch.where(finite, loss_total, torch.zeros_like(loss_total))
    counters.finite_steps += finite.float()
    counters.grad_norm = grad_norm.detach()
    counters.steps += 1
