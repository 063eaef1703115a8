"""Debiased sampling of a trained run (engine/debias.py sample, bench/study_debias.py).

Methods, all on the run's sampler (EDM Heun, its sample.steps and CFG scale), the same prompts and paired noise, so
they cost the same number of model evaluations:
  none          unguided;
  prompt        a colour drawn from the target (exact quota) written into each prompt ("a circle" -> "a blue circle");
  sample        the paper's per-sample guidance toward a colour drawn the same way;
  distribution  distribution guidance toward the target over each batch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from engine.data.synthetic import COLOURS
from engine.diffusion.edm import EDM
from engine.eval.attributes import parse_single_group
from engine.eval.protocol import paired_noise
from engine.sampling.distribution_guidance import DistributionGuidance, SampleGuidance, draw_labels
from engine.sampling.feature_tap import FeatureTap
from engine.sampling.sampler import sample

METHODS = ("none", "prompt", "sample", "distribution")


@dataclass
class GuidanceSettings:
    method: str = "distribution"
    scale: float = 1.0
    window: tuple[float, float] = (0.0, float("inf"))
    divergence: str = "chi2"
    temperature: float = 1.0
    max_ratio: float = 0.2

    def record(self) -> dict:
        return {"method": self.method, "scale": self.scale, "window": list(self.window), "divergence": self.divergence,
                "temperature": self.temperature, "max_ratio": self.max_ratio}


def with_colour(prompt: str, colour: str) -> str:
    """'a circle' -> 'a blue circle' (prompts that already name a colour keep theirs)."""
    spec = parse_single_group(prompt)
    if spec is None or spec[1] is not None:
        return prompt
    return re.sub(rf"\b({spec[2]})", rf"{colour} \1", prompt, count=1)


def generate(model, cfg, embed, adp, layer: str, prompts: list[str], target: torch.Tensor, g: GuidanceSettings,
             seed: int, batch: int) -> tuple[torch.Tensor, list[str], dict]:
    """Images (n, 3, H, W) in [-1, 1] for `prompts` (one image each) in batches of `batch`, the prompts as sampled
    (the prompt method adds colours) and a record with the measured NFE and the guidance log of the last batch."""
    edm = EDM.from_config(cfg.diffusion)
    device = next(model.parameters()).device
    labels = draw_labels(target, len(prompts), seed) if g.method in ("prompt", "sample") else None
    names = list(COLOURS)
    used = [with_colour(p, names[int(labels[i])]) for i, p in enumerate(prompts)] if g.method == "prompt" else prompts
    shape = (model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
    out, nfe, log = [], 0, []
    for lo in range(0, len(prompts), batch):
        caps = used[lo:lo + batch]
        n = len(caps)
        y, y_mask = embed(caps)
        noise = paired_noise(seed, lo, n, shape, device)
        edit = None
        common = dict(adp=adp, scale=g.scale, cond_rows=n, window=g.window, temperature=g.temperature,
                      max_ratio=g.max_ratio)
        if g.method == "distribution":
            edit = DistributionGuidance(**common, target=target, kind=g.divergence)
        elif g.method == "sample":
            edit = SampleGuidance(**common, labels=labels[lo:lo + n])
        with FeatureTap(model, [layer], edit), CallCounter(model) as calls:
            images = sample(model, edm, y, y_mask, steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale,
                            noise=noise)
        nfe = calls.count
        log = edit.log if edit is not None else []
        out.append(images.cpu())
    return torch.cat(out), used, {"nfe": nfe, "guided_calls": len(log),
                                  "predicted_p_last_call": log[-1][2] if log else None}


class CallCounter:
    """Counts the model's forward calls while open (one call = one NFE: CFG's two halves run as one batch)."""

    def __init__(self, model):
        self.model, self.count, self._h = model, 0, None

    def __enter__(self):
        def hook(*_):
            self.count += 1
        self._h = self.model.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self._h.remove()
