"""ODE solvers of the EDM probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, in sigma form.

Multistep solvers work in lambda = -log(sigma) (the half log-SNR when alpha = 1), where the exact solution reads
    x(sigma_t) / sigma_t = x(sigma_s) / sigma_s + integral_{lambda_s}^{lambda_t} e^lambda D(x_lambda; e^-lambda) dlambda
and each method replaces D along the step by a polynomial through the data predictions it has already made.

Every solver takes the same arguments: a `denoise(x, sigma)` closure (classifier-free guidance lives in the closure),
the state x at sigmas[0], the noise levels from sigma_max down (multistep solvers end at sigma_min and return the state
there; Heun may end with 0, its step into 0 being Euler), and the order of each step (multistep solvers only; see
`step_orders`). One model evaluation is one call of `denoise`: wrap the closure in `Counted` to read the NFE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


class Counted:
    """A denoise closure that counts its calls (= model evaluations, NFE)."""

    def __init__(self, fn: Denoise):
        self.fn, self.nfe = fn, 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.nfe += 1
        return self.fn(x, sigma)


def step_orders(order: int, steps: int, lower_order_final: str) -> list[int]:
    """Order of each of `steps` multistep steps: warm-up min(order, i + 1) (only i earlier outputs exist), and where
    the rule lowers the final orders, min(order, steps - i) as well, so the last step is first order.

    lower_order_final: 'always', 'never' or 'below:N' (lower only when steps < N: DPM-Solver's official code uses
    below:10, diffusers' DPM-Solver below:15, UniPC always)."""
    if lower_order_final == "always":
        lower = True
    elif lower_order_final == "never":
        lower = False
    elif lower_order_final.startswith("below:") and lower_order_final[6:].isdigit():
        lower = steps < int(lower_order_final[6:])
    else:
        raise ValueError(f"lower_order_final must be 'always', 'never' or 'below:N', got {lower_order_final!r}")
    return [min(order, i + 1, steps - i) if lower else min(order, i + 1) for i in range(steps)]


# ---------------------------------------------------------------- one-step methods


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic sampling (Karras et al. 2022, Algorithm 2) for the one-step solvers: before a step from a
    level s_tmin <= sigma <= s_tmax, x gets fresh noise that raises its level to sigma (1 + gamma), and the step
    starts there. `noise(x)`: unit Gaussian like x (engine/sampling/image_noise.py: fixed per image)."""

    gamma: float  # min(s_churn / steps, sqrt 2 - 1)
    s_tmin: float
    s_tmax: float
    s_noise: float
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None

    def raise_level(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, float]:
        if self.gamma == 0 or not self.s_tmin <= sigma <= self.s_tmax:
            return x, sigma
        sigma_hat = sigma * (1 + self.gamma)
        return x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * self.s_noise * self.noise(x), sigma_hat


def euler(denoise: Denoise, x: torch.Tensor, sigmas: list[float], orders=None, variant=None,
          churn: Churn | None = None) -> torch.Tensor:
    """First-order steps along dx/dsigma = (x - D) / sigma (with `churn`: EDM's stochastic steps)."""
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        if churn is not None:
            x, s_cur = churn.raise_level(x, s_cur)
        x = x + (s_next - s_cur) * ((x - denoise(x, s_cur)) / s_cur)
    return x


def heun(denoise: Denoise, x: torch.Tensor, sigmas: list[float], orders=None, variant=None,
         churn: Churn | None = None) -> torch.Tensor:
    """EDM's 2nd-order Heun (Karras et al. 2022, Alg. 1; with `churn`, Alg. 2): an Euler step and its trapezoidal
    correction, except on a step into sigma = 0, which stays Euler. Without churn the arithmetic is the engine's
    original sampler's, operation for operation, so its images are bit-identical."""
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        if churn is not None:
            x, s_cur = churn.raise_level(x, s_cur)
        d_cur = (x - denoise(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur  # Euler step
        if s_next > 0:  # Heun correction, except into sigma = 0
            d_next = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


# ---------------------------------------------------------------- DPM-Solver++ (multistep, data prediction)


def _lambdas(sigmas: list[float]) -> list[float]:
    if min(sigmas) <= 0:
        raise ValueError("multistep solvers end at sigma_min > 0 (lambda = -log sigma is infinite at 0)")
    return [-math.log(s) for s in sigmas]


def dpmpp_step(x, ms: list, lams: list[float], sigmas: list[float], i: int, order: int, variant: str):
    """x at sigmas[i] -> x at sigmas[i + 1] with the last `order` data predictions ms[-1] (at i), ms[-2], ms[-3].
    Lu et al. 2022 (DPM-Solver++), multistep form: with p the polynomial through the outputs in u = lambda - lambda_i,
    d1 = h p'(0) and d2 = h^2 p''(0) / 2, and the step integrates e^u p(u) over [0, h].

    variant 'midpoint' / 'heun' are the 2M steps as diffusers names them ('heun' integrates p exactly, 'midpoint'
    approximates the d1 weight); their 3M step is the official one (DPM-Solver's code, diffusers, k-diffusion), whose
    d2 weight 1/2 - (h + phi) / h^2 is half the exact 1 - 2 (h + phi) / h^2 (from e^-h int_0^h e^u u^2 du = h^2 -
    2 (h + phi)): that step converges at 2nd order only (tests/test_solvers.py measures it). 'lagrange' integrates p
    exactly at every order: 2M as 'heun', 3M truly 3rd order, the step the optimized-steps objective assumes."""
    h = lams[i + 1] - lams[i]
    phi = math.expm1(-h)  # e^-h - 1
    x = (sigmas[i + 1] / sigmas[i]) * x - phi * ms[-1]
    if order == 1:  # = DDIM = Euler in sigma
        return x
    r0 = (lams[i] - lams[i - 1]) / h
    d1_0 = (ms[-1] - ms[-2]) / r0
    if order == 2:
        if variant == "midpoint":
            return x - 0.5 * phi * d1_0
        return x + (phi / h + 1) * d1_0  # heun / lagrange: the exact integral of the linear interpolant
    r1 = (lams[i - 1] - lams[i - 2]) / h
    d1_1 = (ms[-2] - ms[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    d2_weight = 1 - 2 * (phi + h) / h**2 if variant == "lagrange" else 0.5 - (phi + h) / h**2
    return x + (phi / h + 1) * d1 + d2_weight * d2


def dpmpp(denoise: Denoise, x: torch.Tensor, sigmas: list[float], orders: list[int], variant: str = "midpoint"):
    """DPM-Solver++(1/2M/3M): one model evaluation per step, at every sigma but the last."""
    lams, ms = _lambdas(sigmas), []
    for i, order in enumerate(orders):
        ms = (ms + [denoise(x, sigmas[i])])[-3:]
        x = dpmpp_step(x, ms, lams, sigmas, i, order, variant)
    return x


# ---------------------------------------------------------------- UniPC (B(h) form, data prediction)


@dataclass
class UniPCCoefficients:
    h_phi_1: float  # e^-h - 1
    b_h: float  # B(h)
    rho_p: list[float]  # predictor weights of the divided differences (order - 1 of them)
    rho_c: list[float]  # corrector weights: the same differences, then the new model output's


def unipc_coefficients(rks: list[float], h: float, order: int, variant: str) -> UniPCCoefficients:
    """Zhao et al. 2023, Alg. 2 (UniPC-p with B(h)). rks: (lambda_{i-k} - lambda_i) / h of the k = 1..order-1
    earlier outputs. The weights solve R rho = b with R[a][k] = r_k^a (r = 1 for the new output) and
    b_a = a! g_a / B(h), where hh = -h (data prediction), g_1 = (e^hh - 1) / hh - 1 and
    g_{a+1} = g_a / hh - 1 / (a + 1)!."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    b, g, fact = [], h_phi_1 / hh - 1, 1
    for a in range(1, order + 1):
        b.append(g * fact / b_h)
        fact *= a + 1
        g = g / hh - 1 / fact
    r = torch.tensor(rks + [1.0], dtype=torch.float64)
    R = torch.stack([r**a for a in range(order)])  # (order, order): row a holds r_k^a
    bt = torch.tensor(b, dtype=torch.float64)
    # order 2 predictor and order 1 corrector: the official code's fixed 0.5 (the B(h)-independent leading term)
    rho_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist() if order > 2 else []
    rho_c = [0.5] if order == 1 else torch.linalg.solve(R, bt).tolist()
    return UniPCCoefficients(h_phi_1, b_h, rho_p, rho_c)


def unipc(denoise: Denoise, x: torch.Tensor, sigmas: list[float], orders: list[int], variant: str = "bh2"):
    """UniPC: predictor UniP-p, then UniC-p once the model output at the predicted point exists. The corrected state
    is carried on; the stored output stays the one at the uncorrected point, so the corrector costs no evaluation.
    No corrector after the last step (it would need an evaluation at sigma_min)."""
    lams, ms, n = _lambdas(sigmas), [], len(orders)
    m = denoise(x, sigmas[0])
    for i, order in enumerate(orders):
        ms = (ms + [m])[-3:]
        h = lams[i + 1] - lams[i]
        rks = [(lams[i - k] - lams[i]) / h for k in range(1, order)]
        d1s = [(ms[-1 - k] - ms[-1]) / r for k, r in enumerate(rks, 1)]
        c = unipc_coefficients(rks, h, order, variant)
        base = (sigmas[i + 1] / sigmas[i]) * x - c.h_phi_1 * ms[-1]
        x_pred = base - c.b_h * sum((rho * d for rho, d in zip(c.rho_p, d1s)), torch.zeros_like(x))
        if i == n - 1:
            return x_pred
        m = denoise(x_pred, sigmas[i + 1])
        corr = sum((rho * d for rho, d in zip(c.rho_c, d1s)), torch.zeros_like(x))
        x = base - c.b_h * (corr + c.rho_c[-1] * (m - ms[-1]))
    return x


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Solver:
    fn: Callable
    multistep: bool  # one evaluation per step, lambda-space multistep (an optimized schedule can be made for it)
    max_order: int


SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler, True, 1),
    "heun": Solver(heun, False, 2),
    "dpmpp": Solver(dpmpp, True, 3),
    "unipc": Solver(unipc, True, 3),
}
