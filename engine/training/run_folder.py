"""A run folder as the tools that come after training read it (sample, evaluate, and the methods built on a trained
model): its resolved config and a model holding the weights of one of its checkpoints."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from engine.config import Config, ConfigError, load_config
from engine.training.checkpoint import Checkpointer, load_model_weights
from engine.training.network import build_run_network


def resolve_checkpoint(run: Path, checkpoint: str | None, step: int | None) -> Path:
    """The checkpoint folder to evaluate: --checkpoint, else --step, else the newest complete one."""
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run-dir {run}: not a run folder (no config.yaml)")
    ckpts = Checkpointer(run / "checkpoints")
    if checkpoint:
        if not (Path(checkpoint) / ".metadata").is_file():
            raise ConfigError(f"--checkpoint {checkpoint}: not a complete checkpoint folder")
        return Path(checkpoint)
    done = ckpts.checkpoints()
    if not done:
        raise ConfigError(f"--run-dir {run}: no complete checkpoint in {run / 'checkpoints'}")
    if step is None:
        return done[-1]
    found = [c for c in done if step_of(c) == step]
    if not found:
        raise ConfigError(f"--step {step}: {run} has no checkpoint of that step; it has "
                          f"{', '.join(str(step_of(c)) for c in done)}")
    return found[0]


def step_of(ckpt: Path) -> int | None:
    """The training step a checkpoint folder is named by (step_00000500 -> 500), or None."""
    m = re.search(r"(\d+)$", Path(ckpt).name)
    return int(m.group(1)) if m else None


def load_run_model(run: Path, checkpoint: str | None, use_ema: bool = True, text_encoder: str | None = None):
    """(config, model in eval mode on the best device, checkpoint folder) from a run folder. `text_encoder` (the
    tools' --text-encoder) replaces the run's data.text_encoder, e.g. a local copy of a hub encoder or a stand-in of
    the same width; the width is checked when it is loaded."""
    cfg = load_config(run / "config.yaml")
    if text_encoder:
        cfg.data.text_encoder = text_encoder
    if cfg.model.experts:
        return cfg, load_experts(run, cfg, checkpoint, use_ema), run / "experts"
    ckpt = Path(checkpoint) if checkpoint else Checkpointer(run / "checkpoints").latest()
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint in {run / 'checkpoints'}")
    model = build_run_network(cfg, {"attention": "auto", "gather": "auto", "moe": "auto", "norm": "auto"})
    load_model_weights(ckpt, model, from_ema=use_ema)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return cfg, model.to(device).eval(), ckpt


def embed_captions(cfg: Config, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Captions through the run's text encoder: embeddings (B, L, D) and the key mask attention gets, on `device`. It
    loads the encoder for this one call; a caller that embeds batch after batch keeps a make_embedder."""
    return make_embedder(cfg, device)(captions)


def make_embedder(cfg: Config, device):
    """captions -> (y, y_mask) on `device`, as embed_captions, through the run's text encoder loaded once; each
    distinct caption of a call is embedded once."""
    from engine.data.caption_cache import embed_unique
    from engine.data.train_data import key_padding_mask, load_text_encoder

    encoder = load_text_encoder(cfg)

    checked = set()  # each distinct prompt is tokenized and, if too long, named once

    def embed(captions: list[str]):
        new = set(captions) - checked
        for n, caption in encoder.cut(new):  # a prompt: sample anyway, say what the run reads
            print(f"warning: prompt {caption!r} has {n} tokens; the run reads only its first "
                  f"data.caption_len={cfg.data.caption_len}", flush=True)
        checked.update(new)
        ids, emb, mask = embed_unique(captions, encoder)
        m = key_padding_mask(cfg, mask[ids])
        return emb[ids].to(device), None if m is None else m.to(device)

    return embed


def load_experts(run: Path, cfg: Config, checkpoint: str | None, use_ema: bool):
    """The experts of a split run (model.experts: sibling run folders), each with its newest checkpoint's weights."""
    from engine.sampling.experts import ExpertSwitch

    if checkpoint:
        raise ConfigError(f"{run} samples with its experts' newest checkpoints ({', '.join(cfg.model.experts)}); a "
                         "checkpoint of one expert is evaluated from that expert's own run folder")
    nets = [load_run_model(run.parent / name, None, use_ema)[1] for name in cfg.model.experts]
    return ExpertSwitch(nets, cfg.sample.expert_sigmas)
