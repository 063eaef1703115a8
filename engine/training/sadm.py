"""SADM's training side: the structure discriminator and its own optimizer, the structural distance added to the
denoiser's loss, and the discriminator's step after the optimizer step. Counters stay on the device until a log step.

Distributed: the structure is per micro-batch (the pairs of each process's micro-batch, as with one process and
gradient accumulation), so the trajectory does not depend on the world size and no embeddings cross processes. The
discriminator is replicated; its gradients are averaged over processes before its step, so every copy stays equal.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.config import SadmConfig
from engine.diffusion.structure import structure_loss
from engine.training.seeding import derive_seed
from models.structure_disc import StructureDiscriminator

BETAS = (0.5, 0.999)  # GAN practice: a short first-moment memory for an adversary whose target keeps moving


class Sadm:
    def __init__(self, cfg: SadmConfig, patch_channels: int, num_patches: int, device: torch.device, seed: int):
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):  # its own seed: the run's global random stream is not moved
            torch.manual_seed(derive_seed(seed, "sadm"))
            self.disc = StructureDiscriminator(patch_channels, num_patches, cfg.disc_width).to(device)
        self.optimizer = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr, betas=BETAS, weight_decay=0.0,
                                           fused=True)
        z = lambda: torch.zeros((), device=device)
        self.loss_sum = z()  # structural distance seen by the denoiser, summed over the window's steps
        self.disc_grad_norm = z()  # of the last discriminator step
        self.active_steps = 0  # steps of the window whose loss had the term (host-side count, no sync)
        self.pending: list[tuple] = []  # (real, fake, keep_idx, sigma) of this step's micro-batches

    def _loss(self, real, fake, keep_idx, sigma) -> torch.Tensor:
        c = self.cfg
        return structure_loss(self.disc, real, fake, keep_idx, sigma, c.kernel, c.distance, c.sigma_max)

    def generator_term(self, step: int, denoised, target, keep_idx, sigma, accum: int) -> torch.Tensor | None:
        """L_S of one micro-batch with the discriminator frozen (None before sadm.start_step). Keeps the detached
        predictions for the discriminator's step."""
        if step % self.cfg.disc_every == 0:
            self.pending.append((target.detach(), denoised.detach(), keep_idx, sigma))
        if step < self.cfg.start_step:
            return None
        self.disc.requires_grad_(False)  # the gradient reaches the denoiser only
        try:
            ls = self._loss(target, denoised, keep_idx, sigma)
        finally:
            self.disc.requires_grad_(True)
        self.loss_sum += ls.detach() / accum
        return ls

    def discriminator_step(self, step: int, finite: torch.Tensor) -> None:
        """Ascend L_S on this step's kept predictions; skipped on the device (no sync) when the denoiser's step or
        this gradient is not finite."""
        if step >= self.cfg.start_step:
            self.active_steps += 1
        if not self.pending:
            return
        for real, fake, keep_idx, sigma in self.pending:
            (-self._loss(real, fake, keep_idx, sigma) / len(self.pending)).backward()
        self.pending.clear()
        grads = [p.grad for p in self.disc.parameters()]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for g, f in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(f.view_as(g))
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        ok = torch.isfinite(norm) & finite
        self.optimizer.found_inf = (~ok).float()  # fused AdamW skips the update on the device
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.disc_grad_norm = norm.detach()

    # ---- metrics and checkpoints ----------------------------------------------------------------------------------
    def summed(self) -> torch.Tensor:
        """Window values to sum over processes (each process's structure is its own micro-batches')."""
        return self.loss_sum.reshape(1)

    def same(self) -> torch.Tensor:
        """Window values identical on every process."""
        return self.disc_grad_norm.reshape(1)

    def record(self, summed: list[float], same: list[float], world_size: int) -> dict:
        n = self.active_steps * world_size
        return {"sadm_loss": summed[0] / n if n else None, "sadm_disc_grad_norm": same[0]}

    def window_state(self, summed: list[float], same: list[float]) -> dict:
        return {"loss_sum": summed[0], "active_steps": self.active_steps, "disc_grad_norm": same[0]}

    def load_window(self, window: dict | None, is_main: bool) -> None:
        """As StepCounters.load_window: the main process takes the sums over processes, the others start at 0."""
        if window is None:
            return
        self.loss_sum.fill_(window["loss_sum"] if is_main else 0.0)
        self.disc_grad_norm.fill_(window["disc_grad_norm"])
        self.active_steps = window["active_steps"]

    def reset_window(self) -> None:
        self.loss_sum.zero_()
        self.active_steps = 0

    def checkpoint_entries(self) -> dict:
        return {"sadm_disc": (self.disc, self.optimizer)}
