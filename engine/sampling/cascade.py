"""A two-resolution cascade: a model trained on pooled images lays out the picture, the run's own model finishes it.

sample.init=cascade splits the sampler's one schedule at two noise levels:
  1. the low model (sample.cascade_run, e.g. the reference's 16-px phase 1) solves from sigma_max down to
     sample.cascade_until, starting from the run's paired noise average-pooled to its size (rescaled to unit variance);
  2. its estimate of the clean image at that level is upsampled (pixel replication) to the run's size and noised to
     sample.cascade_restart with fresh noise, drawn per image from a seed hashed from that image's own start noise (so
     an image's result does not depend on its batch, and two runs given the same noise stay paired);
  3. the run's model solves from there to the end of the schedule. A run conditioned on a low-resolution image
     (diffusion.lowres_condition: a super-resolution stage, engine/diffusion/lowres.py) also gets the upsampled
     estimate as its condition at every evaluation; it may restart above cascade_until (from sigma_max: pure noise).
Both parts use the schedule's noise levels, so the cascade costs about as many evaluations as the plain sampler, those
above the handover at the low model's token count. Why: the 16-px model reads layout and counts better than the
32-px model it was continued into (docs/results/cpu_models.md: what phase 2 does), while only the 32-px model draws
the detail.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engine.diffusion.lowres import lowres_image, upsample
from engine.sampling.image_noise import image_seed, with_image_noise
from engine.sampling.plan import Plan
from engine.sampling.settings import SamplerSettings, SamplerSettingsError, check_companion
from engine.sampling.solvers import SOLVERS, Counted, step_orders


def part_plan(settings: SamplerSettings, plan: Plan, sigmas: list[float]) -> Plan:
    """The plan's solver on `sigmas` (part of its schedule), with the step orders recomputed for that many steps."""
    steps = len(sigmas) - 1
    solver = SOLVERS[plan.solver]
    if not solver.multistep:
        to_zero = sigmas[-1] == 0
        return Plan(plan.solver, sigmas, None, None, 2 * steps - (1 if to_zero else 0))
    order = min(settings.sample.order, solver.max_order)
    return Plan(plan.solver, sigmas, step_orders(order, steps, settings.sample.lower_order_final), plan.variant, steps)


def split_plan(settings: SamplerSettings, plan: Plan) -> tuple[Plan, Plan]:
    """(low part: sigma_max .. cascade_until, high part: cascade_restart .. the schedule's end)."""
    until, restart = settings.sample.cascade_until, settings.sample.cascade_restart
    low = [s for s in plan.sigmas if s > until] + [until]
    high = [restart] + [s for s in plan.sigmas if s < restart]
    return part_plan(settings, plan, low), part_plan(settings, plan, high)


def restart_noise(noise: torch.Tensor) -> torch.Tensor:
    """Unit Gaussian noise like `noise` (B, ...), image b's drawn from a seed hashed from noise[b]'s bytes: fresh
    (independent of noise[b] in distribution) yet fixed by it."""
    out = torch.empty(noise.shape, dtype=torch.float32)
    for b, n in enumerate(noise):
        out[b] = torch.randn(n.shape, generator=torch.Generator().manual_seed(image_seed(n)))
    return out.to(noise.device)


class CascadeStart:
    """The low model's part of the cascade: __call__ gives the upsampled clean-image estimate at cascade_until, and
    restart_noise the noise it is brought back to cascade_restart with (engine/sampling/sampler.py start_state)."""

    def __init__(self, model, edm, plan: Plan, run: str, checkpoint: str, guided_denoiser, churn=None):
        self.model, self.edm, self.plan, self.run, self.checkpoint = model, edm, plan, run, checkpoint
        self.guided_denoiser = guided_denoiser  # engine/sampling/sampler.py's, handed in: it imports this module
        self.churn = churn  # stochastic sampling's parameters (None: deterministic), shared with the high part
        self.last_nfe = 0

    def __call__(self, noise: torch.Tensor, y, y_mask, cfg_scale: float) -> torch.Tensor:
        low, high = self.model.cfg.input_size, noise.shape[-1]
        factor = high // low
        # the mean of factor^2 unit Gaussians has variance 1/factor^2
        n_low = F.avg_pool2d(noise.double(), factor) * factor
        denoise = Counted(self.guided_denoiser(self.model, self.edm, y, y_mask, cfg_scale))
        p = self.plan
        extra = {} if self.churn is None else {"churn": with_image_noise(self.churn, n_low, b"churn-low")}
        x = SOLVERS[p.solver].fn(denoise, n_low * p.sigmas[0], p.sigmas, p.orders, p.variant, **extra)
        x0 = denoise(x, p.sigmas[-1])
        self.last_nfe = denoise.nfe
        return upsample(x0, factor)

    restart_noise = staticmethod(restart_noise)

    def record(self) -> dict:
        return {"cascade_run": self.run, "cascade_checkpoint": self.checkpoint, "cascade_sigmas": self.plan.sigmas,
                "cascade_nfe": self.last_nfe, "cascade_size": self.model.cfg.input_size}


def load_cascade(settings: SamplerSettings, plan: Plan, cfg, device, guided_denoiser, churn=None) -> CascadeStart:
    """The low model of sample.cascade_run (its latest checkpoint, EMA weights), checked against the sampled run:
    the same captions, and an image size that divides the run's. `guided_denoiser`: the sampler's (guidance lives
    in one place); `churn`: stochastic sampling's parameters, or None."""
    from engine.diffusion.edm import EDM
    from engine.training.network import network_config
    from engine.training.run_folder import load_run_model

    run = Path(settings.sample.cascade_run)
    where = f"sample.cascade_run / --cascade-run {run}"
    if not (run / "config.yaml").is_file():
        raise SamplerSettingsError(f"{where}: not a run folder (no config.yaml)")
    try:
        lcfg, model, ckpt = load_run_model(run, None, use_ema=True)
    except (FileNotFoundError, ValueError) as e:
        raise SamplerSettingsError(f"{where}: {e}") from None
    edm = EDM.from_config(lcfg.diffusion)
    check_companion(where, lcfg, edm, cfg)
    low, high = model.cfg.input_size, network_config(cfg).input_size
    if high % low or high == low:
        raise SamplerSettingsError(f"{where}: makes {low}x{low} images; the run makes {high}x{high}, which must be a "
                                   f"whole multiple (2x, 4x ...) of it")
    if cfg.diffusion.lowres_condition and low != cfg.diffusion.lowres_condition:
        raise SamplerSettingsError(f"{where}: makes {low}x{low} images; this run is conditioned on "
                                   f"{cfg.diffusion.lowres_condition}x{cfg.diffusion.lowres_condition} ones "
                                   "(diffusion.lowres_condition)")
    low_plan, _ = split_plan(settings, plan)
    return CascadeStart(model.to(device), edm, low_plan, str(run), str(ckpt), guided_denoiser, churn)


class HeldOutStart:
    """An ideal first stage, for measuring what the second stage alone keeps (evaluate.py --cascade-from-data): each
    prompt's own held-out image, average-pooled to `size` and upsampled back (pixel replication), in place of a low
    model's estimate. The evaluation names the prompts of each batch (select) before sampling it."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, size
        self.first = self.count = 0

    def select(self, first: int, count: int) -> None:
        self.first, self.count = first, count

    def __call__(self, noise: torch.Tensor, y, y_mask, cfg_scale: float) -> torch.Tensor:
        if noise.shape[0] != self.count:
            raise ValueError(f"held-out start: {noise.shape[0]} images to start, {self.count} selected")
        x = self.dataset.images(range(self.first, self.first + self.count)).to(noise.device, torch.float64)
        return lowres_image(x, self.size)  # the condition a super-resolution stage is trained on, noise-free

    restart_noise = staticmethod(restart_noise)

    def record(self) -> dict:
        return {"cascade_from_data": self.size, "cascade_data_seed": self.dataset.seed}


def held_out_cascade(settings: SamplerSettings, plan: Plan, dataset, size: int) -> tuple[Plan, HeldOutStart]:
    """The cascade's second part with HeldOutStart as its first: (this run's plan from cascade_restart, the start)."""
    out_size = dataset.image_size
    if size < 1 or out_size % size or size == out_size:
        raise SamplerSettingsError(f"--cascade-from-data {size}: must be a side that divides the run's image size "
                                   f"{out_size} and is smaller")
    return split_plan(settings, plan)[1], HeldOutStart(dataset, size)
