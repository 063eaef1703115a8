"""Networks split by noise level (Luhman & Luhman 2022), trained one after the other: model.experts names the runs,
highest noise first, and sample.expert_sigmas the noise levels between them. Expert i is an ordinary run (a sibling
folder of this one under run.out_dir, resumable on its own) on diffusion.sigma_range = [expert_sigmas[i],
expert_sigmas[i-1]); each after the first starts from the previous one's final EMA (as the paper's low-noise model
starts from the high-noise one's). This run's folder then holds the pair's config and its final check, made with the
experts together (engine/sampling/experts.py)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from engine.config import Config, save_config


def expert_config(cfg: Config, i: int) -> Config:
    """The config of expert i: this run's, on its noise range, from the previous expert's EMA."""
    cuts = cfg.sample.expert_sigmas
    sub = copy.deepcopy(cfg)
    sub.run.name = cfg.model.experts[i]
    sub.model.experts, sub.sample.expert_sigmas = [], []
    sub.diffusion.sigma_range = [cuts[i] if i < len(cuts) else None, cuts[i - 1] if i > 0 else None]
    sub.sample.final_eval_images = 0  # one expert alone cannot sample from pure noise: the pair's check does
    if i > 0:
        prev = expert_config(cfg, i - 1)
        last = f"step_{prev.train.steps:08d}"
        sub.train.init_from = str(Path(prev.run.out_dir) / prev.run.name / "checkpoints" / last)
        sub.train.init_from_ema, sub.train.init_prefix = True, ""
    return sub.validate()


def train_experts(cfg: Config, d, train_one: Callable[[Config, object], Path]) -> Path:
    """Train every expert in turn (a finished one is left as it is), then check the experts together."""
    from engine.data.train_data import load_text_encoder
    from engine.diffusion.edm import EDM
    from engine.eval.final_check import final_check
    from engine.training.run_folder import load_run_model

    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    for i in range(len(cfg.model.experts)):
        train_one(expert_config(cfg, i), d)
        dist.barrier()
    _, switch, _ = load_run_model(run_dir, None)
    final_check(run_dir, switch, EDM.from_config(cfg.diffusion), load_text_encoder(cfg), cfg, cfg.train.steps,
                d.is_main)
    return run_dir
