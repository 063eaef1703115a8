"""Read and edit a built MicroDiT's intermediate features through forward hooks (models/ knows nothing of them).

The transformer's stand-in for a UNet's h-space is a residual stream: the patch-mixer's output ("mixer", after
patch_mixer_map_xout) or a backbone block's output ("0" ... "depth-1"). A tap also records each call's noise level,
read back from the model's c_noise input (sigma = exp(4 c_noise), EDM's preconditioning), so an edit can depend on
sigma without any change to the sampler.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Edit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]  # (h (B, N, D), sigma (B,)) -> new h or None


def layer_names(model) -> list[str]:
    """The tappable layers of `model`, input side first."""
    mixer = ["mixer"] if model.cfg.mixer_depth > 0 else []
    return mixer + [str(i) for i in range(len(model.blocks))]


def layer_module(model, name: str) -> nn.Module:
    """The module whose output is layer `name`; ValueError names the choices."""
    if name == "mixer" and model.cfg.mixer_depth > 0:
        return model.patch_mixer_map_xout
    if name.isdigit() and int(name) < len(model.blocks):
        return model.blocks[int(name)]
    raise ValueError(f"layer {name!r} is not one of {', '.join(layer_names(model))}")


class FeatureTap:
    """Context manager: while open, `features[name]` holds the last output of each tapped layer and `sigma` the last
    call's noise levels (B,); `edit(h, sigma)` (optional, one layer only) may return a replacement for that output."""

    def __init__(self, model, layers: list[str], edit: Edit | None = None):
        if edit is not None and len(layers) != 1:
            raise ValueError("an edit applies to exactly one layer")
        self.model, self.layers, self.edit = model, list(layers), edit
        self.modules = [layer_module(model, n) for n in self.layers]
        self.features: dict[str, torch.Tensor] = {}
        self.sigma: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> "FeatureTap":
        def read_sigma(_module, args):
            self.sigma = (4 * args[1].detach().float()).exp()  # c_noise = log(sigma) / 4

        self._handles.append(self.model.register_forward_pre_hook(read_sigma))
        for name, module in zip(self.layers, self.modules):
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(_module, _args, out):
            if self.edit is not None:
                new = self.edit(out, self.sigma)
                if new is not None:
                    out = new
            self.features[name] = out
            return out

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
