"""Noise-level schedules: `points` sigmas from sigma_max down to sigma_min, float64, strictly decreasing.

karras   Karras et al. 2022: uniform in sigma^(1/rho) (rho = 7 in EDM)
logsnr   uniform in lambda = -log sigma (half log-SNR); the limit of karras as rho -> infinity
uniform  uniform in sigma (EDM's "time" is sigma itself): a deliberately poor baseline
optimized  engine/sampling/stepopt.py (made for one multistep solver's order pattern)
"""
from __future__ import annotations

import math

import torch

BASE_SCHEDULES = ("karras", "logsnr", "uniform")


def karras(points: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(points,) Karras sigmas; one point is [sigma_max]."""
    i = torch.arange(points, dtype=torch.float64)
    inv_rho = 1 / rho
    frac = i / max(points - 1, 1)
    return (sigma_max**inv_rho + frac * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


def logsnr(points: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(points,) sigmas uniform in log sigma (rho is ignored)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), points, dtype=torch.float64).exp()


def uniform(points: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(points,) sigmas uniform in sigma (rho is ignored)."""
    return torch.linspace(sigma_max, sigma_min, points, dtype=torch.float64)


def base_schedule(name: str, points: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """One of BASE_SCHEDULES. The first point is sigma_max exactly (the start state is sigma_max · n); the last is the
    formula's, within an ulp of sigma_min, so Karras stays as the engine has always computed it and default samples do
    not move (at sigma_max = 80 the formula's first point is exactly 80 too)."""
    fns = {"karras": karras, "logsnr": logsnr, "uniform": uniform}
    if name not in fns:
        raise ValueError(f"schedule must be one of {', '.join(BASE_SCHEDULES)}, got {name!r}")
    if points < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"need points >= 1 and 0 < sigma_min < sigma_max, got {points}, {sigma_min}, {sigma_max}")
    s = fns[name](points, sigma_min, sigma_max, rho)
    s[0] = sigma_max
    return s
