"""Noise-level schedules and optimized time steps: end points, monotonicity, the closed-form step coefficients against
quadrature, the optimizer against its start (and scipy's trust-constr), the cache, and optimized steps against Karras
on a Gaussian mixture whose denoiser is exact."""
import math

import numpy as np
import pytest
import torch

import engine.sampling.stepopt as stepopt
from engine.sampling.schedules import BASE_SCHEDULES, base_schedule
from engine.sampling.solvers import SOLVERS, step_orders

SMIN, SMAX = 0.002, 80.0


@pytest.mark.parametrize("name", BASE_SCHEDULES)
def test_base_schedules_run_from_sigma_max_to_sigma_min_and_decrease(name):
    for points in range(2, 13):
        s = base_schedule(name, points, SMIN, SMAX)
        assert s.dtype == torch.float64 and s.shape == (points,)
        assert s[0].item() == pytest.approx(SMAX, rel=1e-12) and s[-1].item() == pytest.approx(SMIN, rel=1e-12)
        assert torch.all(s[1:] < s[:-1])
    assert base_schedule(name, 5, SMIN, 20.0)[0].item() == 20.0  # the start state is sigma_max · n, exactly
    with pytest.raises(ValueError, match="schedule must be one of"):
        base_schedule("cosine", 5, SMIN, SMAX)


def test_karras_and_logsnr_equal_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EDMDPMSolverMultistepScheduler(sigma_min=SMIN, sigma_max=SMAX, rho=7.0)
    ramp = torch.linspace(0, 1, 9)
    torch.testing.assert_close(base_schedule("karras", 9, SMIN, SMAX).float(), sched._compute_karras_sigmas(ramp),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(base_schedule("logsnr", 9, SMIN, SMAX).float(),
                               sched._compute_exponential_sigmas(ramp), rtol=1e-5, atol=0)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_step_coefficients_integrate_the_lagrange_interpolant(order):
    rng = np.random.default_rng(order)
    lams = np.cumsum(rng.uniform(0.05, 1.5, size=5)) - 3.0  # increasing lambdas
    s = 3  # step lambdas[3] -> lambdas[4], nodes 3, 2, 1
    nodes = [lams[s - j] for j in range(order)]
    u, w = np.polynomial.legendre.leggauss(40)
    a, b = lams[s], lams[s + 1]
    t = (b - a) / 2 * u + (a + b) / 2  # Gauss-Legendre on [a, b]
    for j in range(order):
        basis = np.prod([(t - nodes[m]) / (nodes[j] - nodes[m]) for m in range(order) if m != j], axis=0)
        expected = (b - a) / 2 * np.sum(w * np.exp(t) * basis)
        got = stepopt.step_coefficients(torch.tensor(lams), s, order)[j].item()
        assert got == pytest.approx(expected, rel=1e-11)


@pytest.mark.parametrize("order,nfe", [(3, 5), (3, 8), (3, 10), (2, 6)])
def test_optimizer_lowers_the_objective_and_keeps_the_constraints(order, nfe):
    orders = step_orders(order, nfe, "always")
    res = stepopt.optimize(orders, SMIN, SMAX, p=2, init="logsnr")
    s = torch.tensor(res.sigmas, dtype=torch.float64)
    assert s.shape == (nfe + 1,) and res.sigmas[0] == SMAX and res.sigmas[-1] == SMIN
    assert torch.all((-s.log()).diff() >= stepopt.MIN_GAP * (1 - 1e-9))  # monotone with the minimum gap
    assert res.init_sigmas == base_schedule("logsnr", nfe + 1, SMIN, SMAX).tolist()  # the start is recorded
    assert res.objective < 0.8 * res.init_objective
    assert res.objective == pytest.approx(stepopt.objective(-s.log(), orders, 2).item(), rel=1e-9)
    assert res.seconds > 0  # recorded; how long a solve takes is the sampling study's to measure, not a test's


@pytest.mark.filterwarnings("ignore:delta_grad == 0.0")  # scipy's finite differences at a kink
def test_optimizer_reaches_scipy_trust_constr_at_nfe_5_and_6():
    optimize = pytest.importorskip("scipy.optimize")
    for nfe in (5, 6):
        orders = step_orders(3, nfe, "always")
        lo, hi = -math.log(SMAX), -math.log(SMIN)
        f = lambda v: float(stepopt.objective(torch.tensor(np.concatenate([[lo], v, [hi]])), orders, 2))
        diff = np.eye(nfe, nfe - 1) - np.eye(nfe, nfe - 1, k=-1)  # lambda_{i+1} - lambda_i >= 0, ends fixed
        lower = np.zeros(nfe)
        lower[0], lower[-1] = lo, -hi
        init = (-base_schedule("logsnr", nfe + 1, SMIN, SMAX).log()).numpy()[1:-1]
        ref = optimize.minimize(f, init, method="trust-constr",
                                constraints=[optimize.LinearConstraint(diff, lower, np.inf)])
        assert stepopt.optimize(orders, SMIN, SMAX, 2, "logsnr").objective <= ref.fun * (1 + 1e-6)


def test_cache_solves_once_per_key(tmp_path, monkeypatch):
    orders = step_orders(2, 5, "always")
    key = stepopt.cache_key("dpmpp", 2, "always", 5, SMIN, SMAX, 1, "karras", 7.0)
    first = stepopt.cached_optimize(key, orders, tmp_path)
    files = list((tmp_path / "stepopt").glob("*.json"))
    assert len(files) == 1
    monkeypatch.setattr(stepopt, "optimize", lambda *a, **k: pytest.fail("solved twice"))
    assert stepopt.cached_optimize(key, orders, tmp_path) is first  # in-process memo
    stepopt._MEMO.clear()
    assert stepopt.cached_optimize(key, orders, tmp_path).sigmas == first.sigmas  # read back from disk
    other = dict(key, sigma_max=40.0)
    with pytest.raises(pytest.fail.Exception, match="solved twice"):
        stepopt.cached_optimize(other, orders, tmp_path)  # another key is another schedule


def gmm_denoiser(means: torch.Tensor, std: float):
    def denoise(x, sigma):
        var = std**2 + sigma**2
        w = torch.softmax(-((x[:, None] - means) ** 2).sum(-1) / (2 * var), -1)  # (B, K)
        return (w[..., None] * (means + std**2 / var * (x[:, None] - means))).sum(1)  # (B, d)
    return denoise


@pytest.mark.parametrize("solver,variant", [("unipc", "bh2"), ("dpmpp", "midpoint")])
def test_optimized_steps_beat_karras_for_the_third_order_solver_on_a_gaussian_mixture(solver, variant):
    g = torch.Generator().manual_seed(0)
    denoise = gmm_denoiser(torch.randn(8, 16, generator=g, dtype=torch.float64) * 0.5, 0.1)
    x_t = torch.randn(256, 16, generator=g, dtype=torch.float64) * SMAX
    ref = SOLVERS["heun"].fn(denoise, x_t.clone(), base_schedule("karras", 1001, SMIN, SMAX).tolist())
    fn = SOLVERS[solver].fn
    for nfe in (5, 6):
        orders = step_orders(3, nfe, "always")
        rmse = lambda sig: (fn(denoise, x_t.clone(), sig, orders, variant) - ref).pow(2).mean().sqrt().item()
        karras = rmse(base_schedule("karras", nfe + 1, SMIN, SMAX).tolist())
        optimized = rmse(stepopt.optimize(orders, SMIN, SMAX, 2, "logsnr").sigmas)
        assert optimized < 0.8 * karras, (nfe, optimized, karras)
