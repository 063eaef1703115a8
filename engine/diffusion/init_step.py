"""SingDiffusion's initial-step model (Zhang et al., CVPR 2024) in EDM form.

At sigma -> infinity the noisy input carries no information about x0, so the best data prediction there is the
prompt-conditional mean image E[x0 | c], which sampling from pure noise ignores. EDM's preconditioning at that limit
gives the model's form: c_skip -> 0, c_out -> sigma_data, c_in · x -> the unit noise n, so
    f(n, c) = sigma_data · F(n, c)
with F a time-free network (models/ ModelConfig.time_free), trained on fresh noise with the loss weight EDM's
lambda(sigma) tends to, 1 / sigma_data^2. Caption dropout gives the unconditional branch for guidance. Sampling
starts from x = f(n, c) + sigma_max · n (engine/sampling/start.py), and any solver runs unchanged from there.
"""
from __future__ import annotations

import torch

from engine.diffusion.noise import StepNoise


def predict_tokens(edm, model, n: torch.Tensor, y, y_mask, keep_idx=None) -> torch.Tensor:
    """(B, K or N, p²·C) x0 predicted from unit noise n (B, C, H, W) and the caption."""
    c_noise = n.new_zeros(n.shape[0])  # unused by a time-free model
    return edm.sigma_data * model(n, c_noise, y, y_mask, keep_idx).float()


def predict(edm, model, n: torch.Tensor, y, y_mask) -> torch.Tensor:
    """x0 predicted as an image (B, C, H, W)."""
    return model.unpatchify(predict_tokens(edm, model, n, y, y_mask))


def init_step_loss(edm, model, x0, y, y_mask, noise: StepNoise) -> torch.Tensor:
    """Mean over kept patches of ((f(n, c) - x0) / sigma_data)^2; the step's sigmas are not used."""
    pred = predict_tokens(edm, model, noise.noise, y, y_mask, noise.keep_idx)  # (B, K, P)
    target = model.patchify(x0)
    if noise.keep_idx is not None:
        target = model.gather_fn(target, noise.keep_idx)
    return (((pred - target.float()) / edm.sigma_data) ** 2).mean()
