"""A run folder as the tools that come after training read it (sample, evaluate, and the methods built on a trained
model): its resolved config and a model holding the weights of one of its checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.config import load_config
from engine.training.checkpoint import Checkpointer, load_model_weights
from models.sizes import build_model, model_config


def load_run_model(run: Path, checkpoint: str | None, use_ema: bool = True):
    """(config, model in eval mode on the best device, checkpoint folder) from a run folder."""
    cfg = load_config(run / "config.yaml")
    ckpt = Path(checkpoint) if checkpoint else Checkpointer(run / "checkpoints").latest()
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint in {run / 'checkpoints'}")
    mcfg = model_config(cfg.model.name, input_size=cfg.data.image_size, in_channels=cfg.data.channels,
                        caption_channels=cfg.data.caption_channels, pos_interp_scale=cfg.model.pos_interp_scale,
                        time_free=cfg.diffusion.objective == "init_step")
    model = build_model(mcfg, {"attention": "auto", "gather": "auto", "moe": "auto", "norm": "auto"})
    load_model_weights(ckpt, model, from_ema=use_ema)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return cfg, model.to(device).eval(), ckpt
