"""A denoiser conditioned on a low-resolution image: the super-resolution stage of a cascade (Ho et al. 2021,
"Cascaded Diffusion Models for High Fidelity Image Generation").

With diffusion.lowres_condition = r, the network gets, next to its noisy input, the clean image average-pooled to r x r
and upsampled back by pixel replication (model.cond_channels more input channels). In training that image is the
training image's own pooled copy, with Gaussian noise of a level drawn uniformly in [0, diffusion.lowres_aug] added at
the low resolution (their "conditioning augmentation": the stage learns not to copy every flaw of its condition). In
sampling it is a first stage's sample at r x r (sample.init=cascade: engine/sampling/cascade.py).

Why a conditioned stage and not only the unconditioned cascade's restart: a 32-px model that takes over a 16-px
layout from a noise level has to redraw what the 16-px image cannot show (objects a pixel apart merge there), and
from any level high enough to separate them it also redraws counts and places (docs/results/cascade.md).
A conditioned stage is trained on exactly that mapping: pooled image in, full-resolution image out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lowres_image(x0: torch.Tensor, side: int, noise: torch.Tensor | None = None,
                 level: torch.Tensor | None = None) -> torch.Tensor:
    """x0 (B, C, H, W) average-pooled to side x side, plus level (B,) x noise (B, C, side, side) if given, and
    upsampled back to H x W by pixel replication: the condition the stage is trained on."""
    factor = x0.shape[-1] // side
    low = F.avg_pool2d(x0, factor)
    if noise is not None:
        low = low + level.view(-1, 1, 1, 1).to(low.dtype) * noise.to(low.dtype)
    return upsample(low, factor)


def upsample(low: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel replication: how a condition at the low resolution reaches the network's input size."""
    return F.interpolate(low, scale_factor=factor, mode="nearest")


class Conditioned:
    """`model` with the condition image (B, C, H, W) concatenated to every input it is called with; every other
    attribute (patchify, unpatchify, gather_fn, cfg ...) is the model's. A batch that is k times the condition's (the
    two halves of classifier-free guidance) gets the condition k times."""

    def __init__(self, model, cond: torch.Tensor):
        self.model, self.cond = model, cond

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        reps = x.shape[0] // self.cond.shape[0]
        cond = self.cond.to(device=x.device, dtype=x.dtype).repeat(reps, 1, 1, 1)
        return self.model(torch.cat([x, cond], dim=1), *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)
