"""Prediction targets and loss weightings (Luhman & Luhman 2022, "Improving Diffusion Model Efficiency Through
Patching"): what the network output F means, written as D(x; sigma) = c_skip · x + c_out · F, and how the squared
error of D against x0 is weighted. The loss is always taken on D in x space, so targets differ only in how the network
is asked to express D, never in what is minimised (with the same weighting).

With x = x0 + sigma · n (n unit noise), sigma_data = sd, the targets F* a perfect network outputs are:

    edm   (s · x0/sd - n) / sqrt(1 + s²) with s = sigma / sd: EDM's F (c_skip = sd² / (sigma² + sd²), c_out =
          sigma sd / sqrt(sigma² + sd²)), which is -v of the data scaled to sd = 1; unit variance at every sigma
    x0    x0 / sd                          c_skip = 0,                 c_out = sd
    eps   n                                c_skip = 1,                 c_out = -sigma
    v     (n - sigma x0) / sqrt(1 + sigma²): Salimans & Ho's v of the data as given (alpha = 1 / sqrt(1 + sigma²),
          SNR = 1 / sigma²), so c_skip = 1 / (1 + sigma²), c_out = -sigma / sqrt(1 + sigma²)

Weightings, as f(SNR) / sd² with SNR = sd² / sigma² (the data's signal-to-noise ratio):

    edm       SNR + 1   = EDM's lambda (sigma² + sd²) / (sigma sd)²: unit weight on the edm target's error
    snr       SNR       = 1 / sigma²: the eps-MSE
    sqrt_snr  sqrt(SNR) = 1 / (sigma sd): Luhman & Luhman's default
    uniform   1         = 1 / sd²: the x0-MSE
"""
from __future__ import annotations

import torch


def skip_and_out(target: str, sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of `target` for sigma (B,)."""
    if target == "edm":
        sd2, s2 = sigma_data**2, sigma**2
        return sd2 / (s2 + sd2), sigma * sigma_data / (s2 + sd2).sqrt()
    if target == "x0":
        return torch.zeros_like(sigma), torch.full_like(sigma, sigma_data)
    if target == "eps":
        return torch.ones_like(sigma), -sigma
    if target == "v":
        return 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1).sqrt()
    raise ValueError(f"diffusion.target={target!r}: not a prediction target")


def loss_weight(weighting: str, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Weight of the squared error of D at sigma (B,)."""
    if weighting == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if weighting == "snr":
        return 1 / sigma**2
    if weighting == "sqrt_snr":
        return 1 / (sigma * sigma_data)
    if weighting == "uniform":
        return torch.full_like(sigma, 1 / sigma_data**2)
    raise ValueError(f"diffusion.weighting={weighting!r}: not a loss weighting")
