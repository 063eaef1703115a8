"""DPM-Solver++ and UniPC against diffusers' schedulers on the same denoiser and noise levels: every state the
solvers evaluate the model at, and the final state, must agree to 1e-10 of the state's scale (float64 throughout).

How the conventions are matched:
* noise levels: our N + 1 sigmas from sigma_max to sigma_min are written into the scheduler (`sigmas`), with
  final_sigmas_type='sigma_min' (diffusers' default appends sigma = 0 and spends an extra evaluation on it);
* EDMDPMSolverMultistepScheduler takes the raw network output F and forms D = c_skip x + c_out F itself: we hand it
  F = (D - c_skip x) / c_out;
* UniPCMultistepScheduler is variance-preserving: its state is x / sqrt(1 + sigma^2) (same lambda, same data
  prediction), so states are scaled on the way in and out; prediction_type='sample' takes D as is;
* lower-order-final: diffusers' DPM-Solver lowers the last two orders when there are fewer than 15 steps (our
  'below:15'), its UniPC always ('always'); lower_order_final=False is our 'never'.
"""
import pytest
import torch

from engine.sampling.schedules import base_schedule
from engine.sampling.solvers import dpmpp, step_orders, unipc

diffusers = pytest.importorskip("diffusers")

SIGMA_DATA = 0.5
TOL = 1e-10


def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A nonlinear closed-form denoiser (a two-component mixture per dimension), so every order term matters."""
    means = torch.tensor([-0.6, 0.5], dtype=torch.float64)
    var = 0.04 + sigma**2
    logits = -((x[..., None] - means) ** 2) / (2 * var)  # (..., 2)
    w = torch.softmax(logits, -1)
    return (w * (means + 0.04 / var * (x[..., None] - means))).sum(-1)


def recording(fn, states: list):
    def wrapped(x, sigma):
        states.append(x.clone())
        return fn(x, sigma)
    return wrapped


def sigmas_for(n: int) -> list[float]:
    return base_schedule("karras", n + 1, 0.002, 80.0).tolist()


def our_trajectory(solver, n: int, order: int, rule: str, variant: str) -> list[torch.Tensor]:
    """The states our solver evaluates the model at, then its result."""
    states = []
    states.append(solver(recording(denoiser, states), start(), sigmas_for(n), step_orders(order, n, rule), variant))
    return states


def on_our_sigmas(sched, n: int, timesteps=None):
    """The scheduler set up for n steps on our noise levels (float64); `timesteps` default: its c_noise values."""
    sched.set_timesteps(n)
    sched.sigmas = torch.tensor(sigmas_for(n), dtype=torch.float64)
    sched.timesteps = sched.precondition_noise(sched.sigmas[:-1]) if timesteps is None else timesteps
    sched.set_begin_index(0)
    return sched


def start() -> torch.Tensor:
    return torch.randn(4, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80.0


def assert_same(ours: list, theirs: list):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= TOL * b.abs().max()


@pytest.mark.parametrize("order,variant", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("n", [3, 6, 9])
def test_dpmpp_matches_diffusers_edm_dpmsolver(order, variant, lower_order_final, n):
    from diffusers import EDMDPMSolverMultistepScheduler

    ours = our_trajectory(dpmpp, n, order, "below:15" if lower_order_final else "never", variant)
    sched = on_our_sigmas(EDMDPMSolverMultistepScheduler(
        sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA, solver_order=order, solver_type=variant,
        lower_order_final=lower_order_final, final_sigmas_type="sigma_min", prediction_type="epsilon"), n)
    theirs, x = [], start()
    for i in range(n):
        s = sched.sigmas[i]
        theirs.append(x.clone())
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / (s**2 + SIGMA_DATA**2) ** 0.5
        raw = (denoiser(x, float(s)) - c_skip * x) / c_out  # the network output that gives our D
        x = sched.step(raw, sched.timesteps[i], x).prev_sample
    theirs.append(x)
    assert_same(ours, theirs)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("n", [3, 7])
def test_unipc_matches_diffusers_unipc(order, variant, lower_order_final, n):
    from diffusers import UniPCMultistepScheduler

    ours = our_trajectory(unipc, n, order, "always" if lower_order_final else "never", variant)
    sched = UniPCMultistepScheduler(solver_order=order, solver_type=variant, prediction_type="sample",
                                    predict_x0=True, lower_order_final=lower_order_final,
                                    final_sigmas_type="sigma_min")
    sched = on_our_sigmas(sched, n, torch.arange(n, 0, -1))  # timesteps are only counted: the sigmas carry it
    sigmas = sigmas_for(n)
    vp = lambda s: (1 + s**2) ** -0.5  # x_vp = x_ve · vp(sigma)
    theirs, x = [], start()  # variance-exploding state
    for i in range(n):
        s = sigmas[i]
        theirs.append(x.clone())
        x_vp = sched.step(denoiser(x, s), sched.timesteps[i], x * vp(s)).prev_sample
        x = x_vp / vp(sigmas[i + 1])
    theirs.append(x)
    assert_same(ours, theirs)
