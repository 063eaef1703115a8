"""Optimized time steps (Xue et al., "Accelerating Diffusion Sampling with Optimized Time Steps", CVPR 2024), in EDM
form: alpha = 1, lambda = -log sigma, so e^lambda = 1 / sigma.

A k-th order multistep step lambda_s -> lambda_{s+1} integrates the Lagrange polynomial through the data predictions
D at its k nodes lambda_s, lambda_{s-1}, ...:
    x_{s+1} / sigma_{s+1} = x_s / sigma_s + sum_j J_{s,j} D_{s-j},  J_{s,j} = integral e^lambda l_{s,j}(lambda) dlambda,
closed forms in the step h = lambda_{s+1} - lambda_s and the earlier gaps (`step_coefficients`). If D_n carries an
error e_n, the final state moves by sigma_N sum_n C_n e_n; with |e_n| modelled as w(sigma_n) the objective bounds it as
the paper's code does: a first-order step adds |J w| on its own, the first `trunc` steps add the 2-norm of their
(J_{s,j} w_{s-j})_j, and all later steps are summed per node first, |sum_s J_{s,n} w_n|. The order of each step is the
solver's own (warm-up and lower-order-final included), so a schedule is made for one solver's order pattern.

The variables are the interior lambdas; the ends are fixed and every gap is at least `min_gap` (a zero step divides
by zero). Instead of scipy's trust-constr with finite differences (the official choice, an optional dependency here)
the gaps are a softmax of free parameters, so the constraints hold by construction, and L-BFGS runs on exact
autograd gradients in float64. The objective is not smooth and has local minima at NFE >= 8: the initial schedule is
part of the result and is recorded with it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.sampling.schedules import base_schedule

MIN_GAP = 1e-2  # smallest step in lambda (1% in sigma)
SMOOTHING = (1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 0.0)  # continuation: eps of each stage / (initial objective / N)


def _h_functions(h: torch.Tensor):
    """H0 = int_0^h e^u du, H1 = int_0^h u e^u du, H2 = int_0^h u^2 e^u du."""
    eh = torch.exp(h)
    h0 = torch.expm1(h)
    h1 = h * eh - h0
    h2 = h * h * eh - 2 * h1
    return h0, h1, h2


def step_coefficients(lams: torch.Tensor, s: int, order: int) -> torch.Tensor:
    """(order,) J_{s,j}, j = 0..order-1, the weights of D at lambda_s, lambda_{s-1}, lambda_{s-2} in step s."""
    h = lams[s + 1] - lams[s]
    e = torch.exp(lams[s])
    h0, h1, h2 = _h_functions(h)
    if order == 1:
        return (e * h0).reshape(1)
    a = lams[s] - lams[s - 1]  # gap before the current node
    if order == 2:  # l_0 = 1 + u / a, l_1 = -u / a with u = lambda - lambda_s
        return torch.stack([e * (h0 + h1 / a), -e * h1 / a])
    b = lams[s - 1] - lams[s - 2]  # the gap before that
    return torch.stack([
        e * (h2 + (2 * a + b) * h1 + a * (a + b) * h0) / (a * (a + b)),
        -e * (h2 + (a + b) * h1) / (a * b),
        e * (h2 + a * h1) / (b * (a + b)),
    ])


def error_weight(sigma: torch.Tensor, p: int) -> torch.Tensor:
    """Modelled |D - x0| at sigma: the official sigma_vp^p / alpha_vp written in EDM sigma,
    sigma^p (1 + sigma^2)^((1-p)/2): sigma for p = 1 (the code's pixel-space advice), sigma^2 / sqrt(1 + sigma^2) for
    p = 2 (its default)."""
    return sigma**p * (1 + sigma**2) ** ((1 - p) / 2)


TRUNC = 3  # the first steps whose error vectors count apart (2-norm) instead of summed per node


def objective(lams: torch.Tensor, orders: list[int], p: int, eps: float = 0.0) -> torch.Tensor:
    """The bound on the final error for lambdas (N + 1,) from lambda(sigma_max) to lambda(sigma_min). eps > 0 smooths
    every |t| (and 2-norm) to sqrt(t^2 + eps^2) for the optimizer's continuation; eps = 0 is the objective itself.

    TRUNC = 3 at every NFE, as the official file does. Its comment suggests 0 above NFE 7, but then the per-node sums
    of all steps can cancel: the bound drops to ~1/10 for absurd schedules (80 -> 67 -> 0.14 -> ... at NFE 8), so 3
    it is."""
    w = error_weight(torch.exp(-lams), p)
    res = lams.new_zeros(())
    per_node = [lams.new_zeros(()) for _ in range(len(lams))]
    for s, k in enumerate(orders):
        terms = step_coefficients(lams, s, k) * w[s - k + 1:s + 1].flip(0)  # (k,) for nodes s, s-1, ...
        if k == 1:
            res = res + (terms.square() + eps**2).sqrt().sum()
        elif s < TRUNC:
            res = res + (terms.square().sum() + eps**2).sqrt()
        else:
            for j in range(k):
                per_node[s - j] = per_node[s - j] + terms[j]
    return res + (torch.stack(per_node).square() + eps**2).sqrt().sum()


def _lams_from_params(theta: torch.Tensor, lam_start: float, lam_end: float, min_gap: float) -> torch.Tensor:
    n = theta.numel()
    gaps = min_gap + (lam_end - lam_start - n * min_gap) * torch.softmax(theta, 0)
    inner = lam_start + torch.cumsum(gaps, 0)[:-1]
    return torch.cat([theta.new_tensor([lam_start]), inner, theta.new_tensor([lam_end])])


@dataclass
class OptimizedSchedule:
    sigmas: list[float]  # N + 1 points, sigma_max -> sigma_min
    init_sigmas: list[float]  # the schedule the optimizer started from
    objective: float
    init_objective: float
    seconds: float
    orders: list[int]
    key: dict


def optimize(orders: list[int], sigma_min: float, sigma_max: float, p: int, init: str, rho: float = 7.0,
             min_gap: float = MIN_GAP, key: dict | None = None) -> OptimizedSchedule:
    """Minimise `objective` over the interior lambdas, starting from the base schedule `init`."""
    t0 = time.perf_counter()
    n = len(orders)
    lam_start, lam_end = -math.log(sigma_max), -math.log(sigma_min)
    if lam_end - lam_start <= n * min_gap:
        raise ValueError(f"sigma_max / sigma_min too close for {n} steps of at least {min_gap} in lambda")
    init_sigmas = base_schedule(init, n + 1, sigma_min, sigma_max, rho)
    init_gaps = (-init_sigmas.log()).diff().clamp_min(min_gap * 1.001) - min_gap  # (n,) > 0
    init_theta = init_gaps.log()
    theta = init_theta.clone().requires_grad_(True)
    with torch.no_grad():
        init_obj = float(objective(_lams_from_params(theta, lam_start, lam_end, min_gap), orders, p))
    # Continuation: L-BFGS on ever less smoothed objectives, the last one exact. Plain L-BFGS stalls at the kinks of
    # |.|; smoothing first makes the result independent of the init at NFE 5-10 (checked from logsnr and karras).
    for rel in SMOOTHING:
        eps = rel * init_obj / n
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure():
            opt.zero_grad()
            f = objective(_lams_from_params(theta, lam_start, lam_end, min_gap), orders, p, eps)
            f.backward()
            return f

        opt.step(closure)
    with torch.no_grad():
        final = float(objective(_lams_from_params(theta, lam_start, lam_end, min_gap), orders, p))
    best = (final, theta.detach()) if final < init_obj else (init_obj, init_theta)
    with torch.no_grad():
        sigmas = torch.exp(-_lams_from_params(best[1], lam_start, lam_end, min_gap))
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact ends
    return OptimizedSchedule(sigmas.tolist(), init_sigmas.tolist(), best[0], init_obj, time.perf_counter() - t0,
                             list(orders), key or {})


# ---------------------------------------------------------------- cache

_MEMO: dict[str, OptimizedSchedule] = {}


def cache_key(solver: str, order: int, lower_order_final: str, nfe: int, sigma_min: float, sigma_max: float,
              p: int, init: str, rho: float) -> dict:
    """What an optimized schedule depends on (rho only shapes a karras init)."""
    return {"solver": solver, "order": order, "lower_order_final": lower_order_final, "nfe": nfe,
            "sigma_min": sigma_min, "sigma_max": sigma_max, "p": p, "init": init,
            "rho": rho if init == "karras" else None, "min_gap": MIN_GAP, "version": 1}


def cached_optimize(key: dict, orders: list[int], cache_dir: str | os.PathLike | None = None) -> OptimizedSchedule:
    """The optimized schedule of `key`: from this process's memo, else from `cache_dir`/stepopt/, else solved (and
    written there atomically, so concurrent processes never read half a file)."""
    text = json.dumps(key, sort_keys=True)
    if text in _MEMO:
        return _MEMO[text]
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "stepopt" / f"{hashlib.sha1(text.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            if rec.get("key") == key:
                _MEMO[text] = OptimizedSchedule(**rec)
                return _MEMO[text]
    res = optimize(orders, key["sigma_min"], key["sigma_max"], key["p"], key["init"], key["rho"] or 7.0, key=key)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(res), indent=1) + "\n")
        tmp.replace(path)
    _MEMO[text] = res
    return res
