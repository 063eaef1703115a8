"""A sampling plan: which solver runs on which noise levels with which step orders, from SamplerSettings. Optimized
schedules are solved here (once per key: engine/sampling/stepopt.py caches them)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling.schedules import base_schedule
from engine.sampling.settings import SamplerSettings
from engine.sampling.solvers import SOLVERS, step_orders
from engine.sampling.stepopt import cache_key, cached_optimize


@dataclass
class Plan:
    solver: str
    sigmas: list[float]  # from sigma_max down; ends at sigma_min (Heun with odd NFE: then 0)
    orders: list[int] | None  # per step, multistep solvers only
    variant: str | None
    nfe: int  # model evaluations the solver will make
    stepopt: dict = field(default_factory=dict)  # optimized schedules: init, objective values, seconds

    def record(self) -> dict:
        rec = {"nfe": self.nfe, "sigmas": self.sigmas}
        if self.orders is not None:
            rec["orders"] = self.orders
        if self.stepopt:
            rec["stepopt"] = self.stepopt
        return rec


def heun_points(nfe: int) -> tuple[int, bool]:
    """(schedule points, final step into 0) of Heun with `nfe` evaluations: an odd count ends with the Euler step into
    0 (the engine's original convention: S points + 0 cost 2S - 1), an even count ends at sigma_min (S + 1 points,
    S Heun steps, 2S)."""
    return ((nfe + 1) // 2, True) if nfe % 2 else (nfe // 2 + 1, False)


def make_plan(settings: SamplerSettings) -> Plan:
    s = settings.sample
    solver = SOLVERS[s.solver]
    smin, smax = settings.sigma_min, settings.sigma_max
    if not solver.multistep:  # Heun
        points, to_zero = (s.steps, True) if s.nfe is None else heun_points(s.nfe)
        sigmas = base_schedule(s.schedule, points, smin, smax, s.rho).tolist() + ([0.0] if to_zero else [])
        nfe = 2 * (len(sigmas) - 1) - (1 if to_zero else 0)
        return Plan(s.solver, sigmas, None, None, nfe)
    nfe = s.steps if s.nfe is None else s.nfe
    order = min(s.order, solver.max_order)
    orders = step_orders(order, nfe, s.lower_order_final)
    variant = {"dpmpp": s.dpmpp_variant, "unipc": s.unipc_variant}.get(s.solver)
    if s.schedule != "optimized":
        return Plan(s.solver, base_schedule(s.schedule, nfe + 1, smin, smax, s.rho).tolist(), orders, variant, nfe)
    key = cache_key(s.solver, order, s.lower_order_final, nfe, smin, smax, s.stepopt_power, s.stepopt_init, s.rho)
    res = cached_optimize(key, orders, settings.cache_dir)
    info = {"init": s.stepopt_init, "power": s.stepopt_power, "init_sigmas": res.init_sigmas,
            "objective": res.objective, "init_objective": res.init_objective, "seconds": round(res.seconds, 3)}
    return Plan(s.solver, list(res.sigmas), orders, variant, nfe, info)
