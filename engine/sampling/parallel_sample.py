"""Sampling across the processes of a torchrun launch (`sample.parallel`, engine/sample.py --parallel).

Every process holds the whole model, the prompts and the initial noise, and runs the solver:

  patch / full_sync / naive_patch   on its band of pixel rows only: every solver's update is elementwise, so the
                                    band's state needs only the band's denoiser output (engine/sampling/
                                    patch_parallel.py). The bands are gathered once, at the end.
  cfg_split                         on the whole image; process 0 evaluates the conditional half of guidance,
                                    process 1 the unconditional half, and they swap outputs every evaluation.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import ConfigError
from engine.sampling.exchange import Exchange
from engine.sampling.patch_parallel import BandModel, band_of
from engine.sampling.sampler import Sampler, guide, guided_denoiser, null_caption, run_solver, start_state

BAND_MODES = ("patch", "full_sync", "naive_patch")


def check_parallel(mode: str, model_cfg, world: int, objective: str, cfg_scale: float) -> None:
    """Refuse a launch that cannot work, before anything is loaded (every process decides the same)."""
    flag = f"--parallel {mode} (sample.parallel)"
    if mode == "none":
        if world > 1:
            raise ConfigError(f"launched with {world} processes but --parallel none (sample.parallel): choose "
                              f"patch, full_sync, naive_patch or cfg_split, or launch one process")
        return
    if objective != "edm":
        raise ConfigError(f"{flag}: the run is an initial-step model (diffusion.objective={objective}); it makes "
                          "its image in one evaluation, with nothing to split")
    if mode == "cfg_split":
        if world != 2:
            raise ConfigError(f"{flag} puts the conditional and unconditional halves on 2 processes; launched with "
                              f"{world} (torchrun --nproc_per_node=2)")
        if cfg_scale == 1.0:
            raise ConfigError(f"{flag} needs guidance; --cfg 1 (sample.cfg_scale) has no unconditional half")
        return
    band_of(model_cfg, 0, world)


@contextmanager
def process_group(settings, cfg):
    """Around a sampling entry point: check the launch against the run's config (before anything is loaded), join
    torchrun's process group and yield it (engine/training/parallel.py Dist; None for one process without
    sample.parallel), and leave it together."""
    from models.sizes import model_config

    mode, world = settings.sample.parallel, int(os.environ.get("WORLD_SIZE", 1))
    mcfg = model_config(cfg.model.name, input_size=cfg.data.image_size, in_channels=cfg.data.channels)
    check_parallel(mode, mcfg, world, cfg.diffusion.objective, settings.cfg_scale)
    if mode == "none":
        yield None
        return
    from engine.training.parallel import init_distributed

    group = init_distributed()
    try:
        yield group
        dist.barrier()  # leave together: tearing gloo down while another process still talks can abort it
    finally:
        dist.destroy_process_group()


@dataclass
class ParallelStats:
    """Where the time of one parallel sampling call went (this process's view; host-side seconds)."""

    mode: str
    world: int
    evals: int
    seconds: float
    comm_wait_s: float  # blocked in all-gathers or waiting for an asynchronous one
    sent_bytes: int
    cpu_s: float = 0.0  # CPU time of this process (all its threads): its work, however busy the machine was

    @property
    def compute_s(self) -> float:
        return self.seconds - self.comm_wait_s

    def record(self) -> dict:
        return {"mode": self.mode, "world": self.world, "evals": self.evals, "seconds": self.seconds,
                "compute_s": self.compute_s, "comm_wait_s": self.comm_wait_s, "sent_bytes": self.sent_bytes,
                "cpu_s": self.cpu_s}


@torch.no_grad()
def parallel_sample(model, edm, y: torch.Tensor, y_mask: torch.Tensor | None, sampler: Sampler,
                    noise: torch.Tensor) -> tuple[torch.Tensor, ParallelStats]:
    """Images (B, C, H, W), the same on every process, and this process's timing. Every process passes the same
    captions and noise (B, C, H, W); the process group is torch.distributed's default one."""
    s = sampler.settings.sample
    rank, world = dist.get_rank(), dist.get_world_size()
    check_parallel(s.parallel, model.cfg, world, edm.objective, sampler.settings.cfg_scale)
    start, start_cpu = time.perf_counter(), time.process_time()
    x_start = start_state(sampler, noise.to(y.device), y, y_mask)  # (B, C, H, W) float64, the same everywhere
    if s.parallel == "cfg_split":
        exchange = Exchange(displaced=False)
        out = run_solver(sampler, cfg_split_denoiser(model, edm, y, y_mask, sampler.settings.cfg_scale, exchange),
                         x_start)
    else:
        exchange = Exchange(displaced=s.parallel == "patch", warmup_evals=s.warmup_evals,
                            total_evals=sampler.plan.nfe)
        band = band_of(model.cfg, rank, world)
        with BandModel(model, band, exchange, s.parallel, s.moe_routing) as band_model:
            denoise = guided_denoiser(band_model, edm, y, y_mask, sampler.settings.cfg_scale)
            out = run_solver(sampler, denoise, x_start[:, :, band.pixels])  # (B, C, band rows·p, W)
        out = exchange.gather_now(out.float().contiguous(), dim=2)  # (B, C, H, W)
    stats = ParallelStats(s.parallel, world, sampler.last_nfe, time.perf_counter() - start, exchange.wait_s,
                          exchange.sent_bytes, time.process_time() - start_cpu)
    return out.float(), stats


def cfg_split_denoiser(model, edm, y, y_mask, cfg_scale: float, exchange: Exchange):
    """denoise(x, sigma) with guidance: this process evaluates one half (rank 0 conditional, rank 1 the null
    caption), the halves are swapped by a blocking all-gather and both processes combine them alike."""
    y_half, mask_half = (y, y_mask) if exchange.rank == 0 else null_caption(y, y_mask)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = torch.full((x.shape[0],), sigma, device=x.device)
        d = edm.denoise(model, x.float(), s, y_half, mask_half)  # (B, C, H, W)
        cond, uncond = exchange.gather_now(d.unsqueeze(0), dim=0).double()  # (2, B, C, H, W) -> halves
        return guide(cond, uncond, cfg_scale)

    return denoise
