"""Sampler settings: the run config's `sample` and `diffusion.sigma_*` keys, optionally overridden by command-line
flags. One table maps each flag to its config key, so engine/sample.py and engine/evaluate.py share the flags, and the
config's own checks (engine/config/rules.py `sampling_checks`) validate flags and config files alike."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from engine.config import (DPMPP_VARIANTS, GUIDE_CAPTIONS, INITS, MOE_ROUTINGS, PARALLEL_MODES, SCHEDULES,
                           SING_GUIDANCE, SOLVERS, Config, ConfigError, SampleConfig, build, set_nested, to_dict)

# flag, config key, type, choices (None: any value the config accepts), help
FLAGS = [
    ("--solver", "sample.solver", str, SOLVERS, "ODE solver"),
    ("--order", "sample.order", int, (1, 2, 3), "dpmpp / unipc order"),
    ("--dpmpp-variant", "sample.dpmpp_variant", str, DPMPP_VARIANTS, "DPM-Solver++ variant"),
    ("--unipc-variant", "sample.unipc_variant", str, ("bh1", "bh2"), "UniPC B(h)"),
    ("--lower-order-final", "sample.lower_order_final", str, None, "always | never | below:N"),
    ("--nfe", "sample.nfe", int, None, "model evaluations (default: the run's sample.nfe, else --steps)"),
    ("--schedule", "sample.schedule", str, SCHEDULES, "noise levels"),
    ("--rho", "sample.rho", float, None, "Karras exponent"),
    ("--stepopt-power", "sample.stepopt_power", int, (1, 2), "optimized schedule: error model sigma^p"),
    ("--stepopt-init", "sample.stepopt_init", str, SCHEDULES[:3], "optimized schedule: initial schedule"),
    ("--init", "sample.init", str, INITS, "initial state"),
    ("--sing-run", "sample.sing_run", str, None, "run folder of the initial-step model (--init sing)"),
    ("--sing-guidance", "sample.sing_guidance", str, SING_GUIDANCE, "guidance of the initial-step model"),
    ("--cascade-run", "sample.cascade_run", str, None, "run folder of the lower-resolution model (--init cascade)"),
    ("--cascade-until", "sample.cascade_until", float, None, "cascade: where the low model stops"),
    ("--cascade-restart", "sample.cascade_restart", float, None, "cascade: where this run's model takes over"),
    ("--guide-run", "sample.guide_run", str, None, "autoguidance: run folder of the weaker guiding model"),
    ("--guide-step", "sample.guide_step", int, None, "autoguidance: checkpoint step of the guiding model"),
    ("--guide-caption", "sample.guide_caption", str, GUIDE_CAPTIONS, "autoguidance: the caption the guide reads"),
    ("--cfg-sigma-min", "sample.cfg_sigma_min", float, None, "guidance only above this noise level"),
    ("--cfg-sigma-max", "sample.cfg_sigma_max", float, None, "guidance only up to this noise level"),
    ("--s-churn", "sample.s_churn", float, None, "stochastic sampling: fresh noise per step (0: deterministic)"),
    ("--s-tmin", "sample.s_tmin", float, None, "stochastic sampling: lowest noise level churned"),
    ("--s-tmax", "sample.s_tmax", float, None, "stochastic sampling: highest noise level churned"),
    ("--s-noise", "sample.s_noise", float, None, "stochastic sampling: scale of the fresh noise"),
    ("--sigma-min", "diffusion.sigma_min", float, None, "where the solver stops"),
    ("--sigma-max", "diffusion.sigma_max", float, None, "where sampling starts"),
]
# Sampling across processes: engine/sample.py only (evaluation samples in one process).
PARALLEL_FLAGS = [
    ("--parallel", "sample.parallel", str, PARALLEL_MODES, "split sampling across the torchrun processes"),
    ("--warmup-evals", "sample.warmup_evals", int, None, "patch: synchronous evaluations at the start"),
    ("--moe-routing", "sample.moe_routing", str, MOE_ROUTINGS, "expert-choice routing across bands"),
]


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """The sampler flags; each defaults to the run's config value (engine/config/sampling.py documents the keys)."""
    add_flags(parser.add_argument_group("sampler (default: the run's config)"), FLAGS)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """The flags of sampling across processes (engine/sampling/parallel_sample.py)."""
    add_flags(parser.add_argument_group("across processes (launch with torchrun; default: the run's config)"),
              PARALLEL_FLAGS)


def add_flags(group, table) -> None:
    for flag, key, kind, choices, help in table:
        group.add_argument(flag, type=kind, choices=choices, default=None, help=f"{help} ({key})")


class SamplerSettingsError(ConfigError):
    """Sampler settings that cannot work; entry points (engine/training/errors.py run_cli) print the message as one
    line and exit with status 2."""


@dataclass(frozen=True)
class SamplerSettings:
    sample: SampleConfig  # solver, schedule, nfe, init ... (validated)
    sigma_min: float
    sigma_max: float
    cfg_scale: float
    cache_dir: str | None = None  # where optimized schedules are kept (stepopt/ below it)

    @classmethod
    def from_config(cls, cfg: Config, cache_dir: str | None = None) -> "SamplerSettings":
        s = cfg.sample
        if s.init == "sing":
            check_sing_run(s.sing_run)
        return cls(s, cfg.diffusion.sigma_min, cfg.diffusion.sigma_max, s.cfg_scale, cache_dir)

    @classmethod
    def from_args(cls, args: argparse.Namespace, cfg: Config, cache_dir: str | None = None) -> "SamplerSettings":
        """The run's config with the flags given in `args` (add_sampler_args; --steps and --cfg where the entry point
        has them) applied and validated; an impossible combination raises SamplerSettingsError naming flag and key."""
        table = FLAGS + PARALLEL_FLAGS  # an entry point without the parallel flags leaves them None
        given = {key: getattr(args, flag[2:].replace("-", "_"), None) for flag, key, *_ in table}
        given["sample.steps"] = getattr(args, "steps", None)
        given["sample.cfg_scale"] = getattr(args, "cfg", None)
        raw = to_dict(cfg)
        for key, value in given.items():
            if value is not None:
                set_nested(raw, key, value)
        try:
            new = build(Config, raw, "").validate()
        except ValueError as e:
            flags = {key: flag for flag, key, *_ in table} | {"sample.steps": "--steps", "sample.cfg_scale": "--cfg"}
            named = [f"{flags[k]} ({k})" for k, v in given.items() if v is not None and k in str(e)]
            raise SamplerSettingsError(f"{e}{'; given: ' + ', '.join(named) if named else ''}") from None
        return cls.from_config(new, cache_dir)

    def record(self) -> dict:
        """The settings as eval.json records them."""
        s = self.sample
        rec = {"solver": s.solver, "schedule": s.schedule, "nfe": s.nfe, "steps": s.steps, "init": s.init,
               "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "cfg_scale": self.cfg_scale}
        if s.cfg_sigma_min > 0 or s.cfg_sigma_max is not None:  # guidance in an interval
            rec |= {"cfg_sigma_min": s.cfg_sigma_min, "cfg_sigma_max": s.cfg_sigma_max}
        if s.guide_run:  # autoguidance
            rec |= {"guide_run": s.guide_run, "guide_step": s.guide_step, "guide_caption": s.guide_caption}
        if s.s_churn > 0:  # stochastic sampling
            rec |= {"s_churn": s.s_churn, "s_tmin": s.s_tmin, "s_tmax": s.s_tmax, "s_noise": s.s_noise}
        if s.solver in ("dpmpp", "unipc"):
            rec |= {"order": s.order, "lower_order_final": s.lower_order_final,
                    "variant": s.dpmpp_variant if s.solver == "dpmpp" else s.unipc_variant}
        if s.schedule == "karras" or s.stepopt_init == "karras":
            rec["rho"] = s.rho
        if s.schedule == "optimized":
            rec |= {"stepopt_power": s.stepopt_power, "stepopt_init": s.stepopt_init}
        if s.init == "sing":
            rec |= {"sing_run": s.sing_run, "sing_guidance": s.sing_guidance}
        if s.init == "cascade":
            rec |= {"cascade_run": s.cascade_run, "cascade_until": s.cascade_until,
                    "cascade_restart": s.cascade_restart}
        return rec


def check_sing_run(folder: str) -> None:
    """sample.sing_run must be a run trained with diffusion.objective=init_step (its config says so; the weights and
    their fit to the sampled run are checked when they load, engine/sampling/start.py)."""
    from pathlib import Path

    from engine.config import load_config

    where = f"sample.sing_run / --sing-run {folder}"
    if not (Path(folder) / "config.yaml").is_file():
        raise SamplerSettingsError(f"{where}: not a run folder (no config.yaml); train an initial-step model with "
                                   "diffusion.objective=init_step")
    objective = load_config(Path(folder) / "config.yaml").diffusion.objective
    if objective != "init_step":
        raise SamplerSettingsError(f"{where}: trained with diffusion.objective={objective!r}, not an initial-step "
                                   "model (init_step)")


# data keys a second model used in sampling (a cascade's low model, a guiding model) must share with the sampled run:
# the same captions reach both
SHARED_DATA_KEYS = ("text_encoder", "caption_len", "caption_channels", "channels", "attend_to_padding")


def check_companion(where: str, other_cfg: Config, other_edm, cfg: Config) -> None:
    """A second model sampled beside the run (its config and EDM; `where` names the setting) must be a plain
    denoiser of one resolution that reads the run's captions."""
    e = other_edm
    if e.nested or e.objective != "edm" or other_cfg.model.experts or e.lowres_condition:
        raise SamplerSettingsError(f"{where}: must be a plain denoiser of one resolution (not nested, not split into "
                                   "experts, not an initial-step model, not conditioned on a lower resolution)")
    for key in SHARED_DATA_KEYS:
        if getattr(other_cfg.data, key) != getattr(cfg.data, key):
            raise SamplerSettingsError(f"{where}: data.{key}={getattr(other_cfg.data, key)!r} differs from this run's "
                                       f"{getattr(cfg.data, key)!r}")
