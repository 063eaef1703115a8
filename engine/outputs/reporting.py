"""Artifacts a run writes besides metrics: sample grids for fixed prompts and the loss curve."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.diffusion.edm import EDM
from engine.sampling.sampler import sample
from engine.training.parallel import reshard


def embed_prompts(encoder, prompts: list[str], per_prompt: int, device) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Each prompt repeated per_prompt times, with its embeddings and mask on `device`."""
    captions = [p for p in prompts for _ in range(per_prompt)]
    emb, mask = encoder.encode(captions)
    return captions, emb.to(device), mask.to(device)


def write_sample_grid(path: Path, model, edm: EDM, captions, y, y_mask, steps: int, cfg_scale: float, seed: int,
                      is_main: bool, decoder=None, sampler=None) -> None:
    """Sample with the (sharded) model on every process, same noise everywhere; the main process writes the PNG.
    `decoder` turns latents into images (engine/encoders/vae.py); without one a latent run shows 3 raw latent channels.
    `sampler` (engine/sampling/sampler.py) replaces Heun with `steps` by the configured solver."""
    from engine.outputs.images import save_grid_with_captions

    gen = torch.Generator(device=y.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    images = sample(model, edm, y, y_mask, steps=steps, cfg_scale=cfg_scale, generator=gen, sampler=sampler)
    reshard(model)
    model.train(was_training)
    if is_main:
        if decoder is not None:
            images = decoder(images)
        per_row = max(1, len(captions) // max(1, len(set(captions))))
        save_grid_with_captions(path, images.cpu(), captions, nrow=per_row)


def read_losses(jsonl: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of every metrics line that has a loss."""
    steps, losses = [], []
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("loss") is not None:
                steps.append(rec["step"])
                losses.append(rec["loss"])
    return steps, losses


def write_loss_curve(jsonl: Path, path: Path, title: str) -> None:
    from engine.outputs.images import plot_loss_curve

    steps, losses = read_losses(jsonl)
    if steps:
        plot_loss_curve(steps, losses, path, title=title)


def truncate_jsonl(jsonl: Path, last_step: int) -> None:
    """On resume, drop lines written after the checkpoint we resume from, so the log reads as one run."""
    if jsonl.is_file():
        keep = [l for l in jsonl.read_text().splitlines() if json.loads(l).get("step", 0) <= last_step]
        tmp = jsonl.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        tmp.replace(jsonl)
