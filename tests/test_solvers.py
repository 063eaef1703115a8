"""Solvers on Gaussian data, whose probability-flow ODE has a closed-form solution: convergence orders, NFE counting,
the step-order rule, and the default sampler's output bit for bit as the engine's original Heun."""
import math

import pytest
import torch

from engine.diffusion.edm import EDM
from engine.sampling.plan import make_plan
from engine.sampling.sampler import Sampler, karras_sigmas, sample
from engine.sampling.schedules import base_schedule
from engine.sampling.settings import SamplerSettings
from engine.sampling.solvers import SOLVERS, Counted, step_orders
from engine.config import Config, SOLVERS as CONFIG_SOLVERS

SMIN, SMAX = 0.002, 80.0
MU = torch.tensor([-0.7, 0.3, 0.1], dtype=torch.float64)
STD = torch.tensor([0.3, 0.5, 0.05], dtype=torch.float64)


def gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x0 | x] for x0 ~ N(MU, STD^2) per dimension."""
    return MU + STD**2 / (STD**2 + sigma**2) * (x - MU)


def exact_solution(x_start: torch.Tensor, s_from: float, s_to: float) -> torch.Tensor:
    """The ODE maps x - MU linearly: (x - MU) scales with sqrt(STD^2 + sigma^2)."""
    return MU + (x_start - MU) * torch.sqrt((STD**2 + s_to**2) / (STD**2 + s_from**2))


X_T = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * SMAX


def solve(solver: str, order: int, variant, nfe: int, rule: str = "never", schedule: str = "logsnr"):
    """(max error at sigma_min vs the exact solution, model evaluations) with `nfe` evaluations."""
    spec, d = SOLVERS[solver], Counted(gaussian_denoiser)
    points = nfe + 1 if spec.multistep else nfe // 2 + 1  # Heun: nfe/2 steps of 2 evaluations
    sigmas = base_schedule(schedule, points, SMIN, SMAX).tolist()
    orders = step_orders(order, nfe, rule) if spec.multistep else None
    x = spec.fn(d, X_T.clone(), sigmas, orders, variant)
    return (x - exact_solution(X_T, SMAX, SMIN)).abs().max().item(), d.nfe


# (solver, order, variant, expected order, NFE pair). UniPC-p's corrector makes it order p + 1. The official 3M step
# (DPM-Solver's code, diffusers) halves the weight of its second difference and converges at order 2 only; 'lagrange'
# integrates the interpolant exactly and reaches (at least) 3 (4 on this data).
CASES = [
    ("euler", 1, None, 1, 128), ("heun", 2, None, 2, 128),
    ("dpmpp", 1, "midpoint", 1, 128), ("dpmpp", 2, "midpoint", 2, 128), ("dpmpp", 2, "heun", 2, 128),
    ("dpmpp", 3, "midpoint", 2, 128), ("dpmpp", 3, "lagrange", 3, 128),
    ("unipc", 1, "bh1", 2, 128), ("unipc", 1, "bh2", 2, 128), ("unipc", 2, "bh1", 3, 128), ("unipc", 2, "bh2", 3, 128),
    ("unipc", 3, "bh1", 4, 256), ("unipc", 3, "bh2", 4, 256),
]


@pytest.mark.parametrize("solver,order,variant,expected,nfe", CASES, ids=lambda v: str(v))
def test_convergence_order_on_gaussian_data(solver, order, variant, expected, nfe):
    (e1, n1), (e2, n2) = solve(solver, order, variant, nfe), solve(solver, order, variant, 2 * nfe)
    assert (n1, n2) == (nfe, 2 * nfe)
    rate = math.log2(e1 / e2)
    if solver == "dpmpp" and variant == "lagrange":
        assert rate > expected - 0.2, rate
    else:
        assert abs(rate - expected) < 0.2, rate


def test_dpmpp_first_order_is_euler():
    a, _ = solve("dpmpp", 1, "midpoint", 7, schedule="karras")
    b, _ = solve("euler", 1, None, 7, schedule="karras")
    assert a == pytest.approx(b, rel=1e-9)


@pytest.mark.parametrize("rule", ["always", "never", "below:6"])
def test_step_order_rule(rule):
    for order in (1, 2, 3):
        for steps in (1, 2, 3, 5, 8):
            o = step_orders(order, steps, rule)
            assert len(o) == steps and all(1 <= k <= min(order, i + 1) for i, k in enumerate(o))  # warm-up
            lowered = rule == "always" or (rule == "below:6" and steps < 6)
            if lowered:
                assert all(k <= steps - i for i, k in enumerate(o)) and o[-1] == 1
            else:
                assert o[-1] == min(order, steps)
    with pytest.raises(ValueError, match="lower_order_final"):
        step_orders(2, 4, "sometimes")


def settings(**sample_keys) -> SamplerSettings:
    cfg = Config()
    for k, v in sample_keys.items():
        setattr(cfg.sample, k, v)
    return SamplerSettings.from_config(cfg.validate())


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_makes_exactly_the_planned_evaluations(solver):
    assert set(SOLVERS) == set(CONFIG_SOLVERS)  # the config's choices are the solvers that exist
    for nfe in range(1, 11):
        plan = make_plan(settings(solver=solver, nfe=nfe, order=3))
        d = Counted(gaussian_denoiser)
        x = SOLVERS[solver].fn(d, X_T.clone(), plan.sigmas, plan.orders, plan.variant)
        assert d.nfe == plan.nfe == nfe and torch.isfinite(x).all()
        if solver == "heun":  # odd NFE: points + the Euler step into 0; even: ends at sigma_min
            assert (plan.sigmas[-1] == 0) == (nfe % 2 == 1)
    steps_plan = make_plan(settings(solver=solver, steps=6))  # nfe null: sample.steps
    assert steps_plan.nfe == (11 if solver == "heun" else 6)


def original_heun_sample(model, edm, y, y_mask, steps, cfg_scale, generator):
    """The engine's sampler before solvers existed, verbatim."""
    cfg = model.cfg
    B = y.shape[0]
    x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=generator, device=y.device)
    guided = cfg_scale != 1.0
    if guided:
        y = torch.cat([y, torch.zeros_like(y)])
        y_mask = torch.cat([y_mask, torch.ones_like(y_mask)])

    def denoise(x_cur, sigma):
        xin = torch.cat([x_cur, x_cur]) if guided else x_cur
        s = torch.full((xin.shape[0],), sigma, device=x_cur.device)
        d = edm.denoise(model, xin.float(), s, y, y_mask).double()
        if guided:
            cond, uncond = d.chunk(2)
            d = uncond + cfg_scale * (cond - uncond)
        return d

    sigmas = karras_sigmas(edm, steps).tolist()
    x = x.double() * sigmas[0]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - denoise(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            d_next = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.float()


def test_default_sampler_is_bit_identical_to_the_original_heun():
    from models.sizes import build_model, model_config

    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    y, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    edm = EDM()
    gen = lambda: torch.Generator().manual_seed(3)
    ref = original_heun_sample(model, edm, y, mask, 4, 2.5, gen())
    assert torch.equal(sample(model, edm, y, mask, steps=4, cfg_scale=2.5, generator=gen()), ref)
    s = settings(steps=4, cfg_scale=2.5)  # the config's defaults: heun, karras, nfe null, init noise
    sampler = Sampler(s, make_plan(s))
    assert torch.equal(sample(model, edm, y, mask, generator=gen(), sampler=sampler), ref)
    assert sampler.last_nfe == 7
    other = Sampler(settings(steps=4, cfg_scale=2.5, solver="dpmpp"), make_plan(settings(steps=4, solver="dpmpp")))
    assert not torch.equal(sample(model, edm, y, mask, generator=gen(), sampler=other), ref)  # the check can fail
