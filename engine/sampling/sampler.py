"""Sampling: the classifier-free-guidance denoiser (the one place guidance lives), the start state, and a solver from
engine/sampling/solvers.py on the plan's noise levels. Without a Sampler, `sample` is the engine's original EDM Heun
on Karras steps (bit-identical output)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from engine.diffusion.edm import EDM
from engine.diffusion.lowres import Conditioned
from engine.diffusion.nested import highest, initial_state
from engine.sampling.experts import ExpertSwitch
from engine.sampling.image_noise import with_image_noise
from engine.sampling.plan import Plan, make_plan
from engine.sampling.schedules import karras
from engine.sampling.settings import SamplerSettings, SamplerSettingsError
from engine.sampling.solvers import SOLVERS, Churn, Counted, heun


def karras_sigmas(edm: EDM, steps: int, rho: float = 7.0, device=None) -> torch.Tensor:
    """steps noise levels from sigma_max to sigma_min (rho schedule), then a final 0: (steps + 1,)."""
    sig = karras(steps, edm.sigma_min, edm.sigma_max, rho).to(device)
    return torch.cat([sig, sig.new_zeros(1)])


@dataclass
class Sampler:
    """What `sample` needs beyond the model: the settings, their plan, the start (None: pure noise) and stochastic
    sampling's parameters (None: the deterministic solver)."""

    settings: SamplerSettings
    plan: Plan
    start: object = None
    churn: Churn | None = None
    guide: object = None  # autoguidance's weaker model (engine/sampling/autoguide.py), or None: classifier-free
    last_nfe: int = 0  # model evaluations of the last call, as counted

    def record(self) -> dict:
        rec = {**self.settings.record(), **self.plan.record(), "measured_nfe": self.last_nfe}
        if hasattr(self.start, "record"):  # a cascade's low model: its checkpoint, noise levels and evaluations
            rec |= self.start.record()
        if self.guide is not None:  # the guiding model's checkpoint
            rec |= self.guide.record()
        return rec


def build_sampler(settings: SamplerSettings, cfg=None, device=None) -> Sampler:
    """Plan (optimized schedules solved or read from the cache) and start (the initial-step model loaded; `cfg` is
    the config of the run being sampled, needed for init=sing, data_mean, cascade and a guiding model; a cascade gets
    the high part of the plan, its low model the rest: engine/sampling/cascade.py)."""
    from engine.sampling.autoguide import guide_of
    from engine.sampling.start import build_start

    plan = make_plan(settings)
    churn = churn_of(settings.sample, plan)
    guide_model = guide_of(settings, cfg, device)
    if settings.sample.init == "cascade":  # the low model takes the schedule's top, this run's model the rest
        from engine.sampling.cascade import load_cascade, split_plan

        interval = guidance_interval(settings.sample)
        low = load_cascade(settings, plan, cfg, device, functools.partial(guided_denoiser, interval=interval), churn)
        return Sampler(settings, split_plan(settings, plan)[1], low, churn, guide_model)
    start = build_start(settings, cfg, device) if settings.sample.init != "noise" else None
    return Sampler(settings, plan, start, churn, guide_model)


def churn_of(sample_cfg, plan: Plan) -> Churn | None:
    """Stochastic sampling's parameters for sample_cfg (a SampleConfig) on the whole plan (a cascade's two parts share
    them), or None where s_churn is 0. gamma = min(s_churn / steps, sqrt 2 - 1), as in EDM's Algorithm 2."""
    if sample_cfg.s_churn == 0:
        return None
    gamma = min(sample_cfg.s_churn / (len(plan.sigmas) - 1), math.sqrt(2) - 1)
    high = math.inf if sample_cfg.s_tmax is None else sample_cfg.s_tmax
    return Churn(gamma, sample_cfg.s_tmin, high, sample_cfg.s_noise)


def null_caption(y: torch.Tensor, y_mask: torch.Tensor | None):
    """The unconditional branch's caption: the null caption the model was trained with (all-zero embedding, every
    position valid)."""
    return torch.zeros_like(y), None if y_mask is None else torch.ones_like(y_mask)


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    return uncond + cfg_scale * (cond - uncond)


def guidance_interval(sample_cfg) -> tuple[float, float]:
    """(low, high): the noise levels low < sigma <= high that sample_cfg (a SampleConfig) guides."""
    high = sample_cfg.cfg_sigma_max
    return sample_cfg.cfg_sigma_min, math.inf if high is None else high


def guided_denoiser(model, edm: EDM, y: torch.Tensor, y_mask: torch.Tensor | None, cfg_scale: float,
                    interval: tuple[float, float] = (0.0, math.inf), guide_model=None):
    """denoise(x, sigma) -> D (float64) with classifier-free guidance, both halves in one batch, at the noise levels
    inside `interval` (low < sigma <= high); outside it the conditional half alone. `model` is anything edm.denoise
    can call (a MicroDiT, or a band of one: engine/sampling/patch_parallel.py). With `guide_model` (an autoguide.Guide)
    its output takes the unconditional half's place (autoguidance)."""
    guided = cfg_scale != 1.0
    y_both, mask_both = y, y_mask
    y_null, mask_null = null_caption(y, y_mask)
    if guided and guide_model is None:
        y_both = torch.cat([y, y_null])
        mask_both = None if y_mask is None else torch.cat([y_mask, mask_null])  # None: nothing padded
    low, high = interval

    def denoise(x_cur: torch.Tensor, sigma: float) -> torch.Tensor:
        both = guided and low < sigma <= high
        net = model.at(sigma) if isinstance(model, ExpertSwitch) else model  # each expert on its own noise levels
        if both and guide_model is not None:  # two networks: two calls
            s = torch.full((x_cur.shape[0],), sigma, device=x_cur.device)
            d = edm.denoise(net, x_cur.float(), s, y, y_mask).double()
            g_caption = (y, y_mask) if guide_model.caption == "cond" else (y_null, mask_null)
            g = guide_model.edm.denoise(guide_model.model, x_cur.float(), s, *g_caption).double()
            return guide(d, g, cfg_scale)
        xin = torch.cat([x_cur, x_cur]) if both else x_cur
        s = torch.full((xin.shape[0],), sigma, device=x_cur.device)
        d = edm.denoise(net, xin.float(), s, *((y_both, mask_both) if both else (y, y_mask))).double()
        return guide(*d.chunk(2), cfg_scale) if both else d

    return denoise


def initial_noise(cfg, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(batch, C, H, W) unit Gaussian for a model config, drawn from `generator`."""
    return torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=generator, device=device)


def start_state(sampler: Sampler, noise: torch.Tensor, y, y_mask) -> torch.Tensor:
    """The solver's state at sigmas[0] (float64): sigmas[0] · noise, plus the start's x0 estimate if it has one. A
    cascade's solver starts below sigma_max, from noise of its own (engine/sampling/cascade.py)."""
    return start_parts(sampler, noise, y, y_mask)[0]


def start_parts(sampler: Sampler, noise: torch.Tensor, y, y_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(start_state's state, the start's x0 estimate or None: a super-resolution stage's condition)."""
    if sampler.start is None:
        return noise.double() * sampler.plan.sigmas[0], None
    x0_hat = sampler.start(noise, y, y_mask, sampler.settings.cfg_scale).double()
    if hasattr(sampler.start, "restart_noise"):
        noise = sampler.start.restart_noise(noise)
    return x0_hat + noise.double() * sampler.plan.sigmas[0], x0_hat


def run_solver(sampler: Sampler, denoise, x_start: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The plan's solver from x_start with `denoise`; counts the evaluations into sampler.last_nfe. `noise`: the unit
    start noise, which seeds each image's fresh noise under stochastic sampling."""
    plan, counted = sampler.plan, Counted(denoise)
    extra = {}
    if sampler.churn is not None:
        if noise is None:
            raise ValueError("stochastic sampling (sample.s_churn > 0) needs the start noise to seed its fresh noise")
        extra["churn"] = with_image_noise(sampler.churn, noise)
    out = SOLVERS[plan.solver].fn(counted, x_start, plan.sigmas, plan.orders, plan.variant, **extra)
    sampler.last_nfe = counted.nfe
    return out


@torch.no_grad()
def sample(
    model, edm: EDM, y: torch.Tensor, y_mask: torch.Tensor | None, steps: int = 30, cfg_scale: float = 1.0,
    generator: torch.Generator | None = None, sampler: Sampler | None = None, noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images (B, C, H, W) for caption embeddings y (B, L, D) with mask (B, L). Without `sampler`: EDM Heun on `steps`
    Karras points plus 0; with one, its solver, plan and start (and its cfg_scale; `steps` is then unused). An
    initial-step model (edm.objective == 'init_step') returns its x0 prediction from the noise instead. `noise`
    (B, C, H, W) unit Gaussian: the initial noise, given (paired evaluations) or else drawn from `generator`; for a
    nested model (edm.nested) a list of every stream's, low first, and the result is its highest stream."""
    cfg = model.cfg
    B = y.shape[0]
    if edm.nested:
        x = nested_start(edm, cfg, B, noise, generator, y.device)  # (B, D): the streams packed
    else:
        x = noise.to(y.device) if noise is not None else initial_noise(cfg, B, generator, y.device)
    if edm.objective == "init_step":  # its "sample" is the guided mean-image prediction
        from engine.sampling.start import InitStepStart
        return InitStepStart(model, edm, "plain")(x, y, y_mask, cfg_scale).float()
    image = (lambda out: highest(edm, out, cfg.in_channels).float()) if edm.nested else (lambda out: out.float())
    if edm.lowres_condition and (sampler is None or sampler.settings.sample.init != "cascade"):
        raise SamplerSettingsError("a run conditioned on a low-resolution image (diffusion.lowres_condition) samples "
                                   "with sample.init=cascade: its condition is the low model's sample")
    if sampler is None:
        denoise = guided_denoiser(model, edm, y, y_mask, cfg_scale)
        sigmas = karras_sigmas(edm, steps).tolist()
        return image(heun(denoise, x.double() * sigmas[0], sigmas))
    x_start, x0_hat = start_parts(sampler, x, y, y_mask)
    if edm.lowres_condition:  # a super-resolution stage: the low model's image conditions every evaluation
        model = Conditioned(model, x0_hat.float())
    interval = guidance_interval(sampler.settings.sample)
    denoise = guided_denoiser(model, edm, y, y_mask, sampler.settings.cfg_scale, interval, sampler.guide)
    return image(run_solver(sampler, denoise, x_start, x))

def nested_start(edm: EDM, cfg, batch: int, noise, generator, device) -> torch.Tensor:
    """The nested model's packed unit start from every stream's noise (given, low first, or drawn: the highest stream
    first, so it gets the noise a single-stream model of its size would, then the lower ones)."""
    if noise is None:
        sizes = edm.resolutions[::-1]
        noise = [torch.randn(batch, cfg.in_channels, r, r, generator=generator, device=device) for r in sizes][::-1]
    return initial_state(edm, [n.to(device) for n in noise])
