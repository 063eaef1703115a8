"""How a config is checked: the allowed values of the keys that name a choice, and every rule (key, test, what is
allowed), per key and across keys and sections, run in order by Config.validate in engine/config/__init__.py. The sampler's
command-line flags are checked by the same rules."""
from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    from engine.config import Config, DiffusionConfig, ModelSection, SadmConfig, SampleConfig, TrainConfig

# The allowed values of the keys that name a choice (engine/config/__init__.py and sampling.py document each key).
TARGETS = ("edm", "x0", "eps", "v")
WEIGHTINGS = ("edm", "snr", "sqrt_snr", "uniform")
SOLVERS = ("euler", "heun", "dpmpp", "unipc")
SCHEDULES = ("karras", "logsnr", "uniform", "optimized")
INITS = ("noise", "sing", "data_mean", "cascade")
SING_GUIDANCE = ("normalized", "plain", "none")
GUIDE_CAPTIONS = ("cond", "uncond")
DPMPP_VARIANTS = ("midpoint", "heun", "lagrange")
PARALLEL_MODES = ("none", "patch", "full_sync", "naive_patch", "cfg_split")
MOE_ROUTINGS = ("sync", "displaced", "local")


def patch_size(m: ModelSection) -> int:
    """The patch side of model.name's network with model.patch_size applied."""
    from models.sizes import model_config

    return m.patch_size or model_config(m.name).patch_size


def pixel_head(m: ModelSection) -> int:
    """The pixel-head width of model.name's network with model.pixel_head applied (0 = none)."""
    from models.sizes import model_config

    return m.pixel_head if m.pixel_head >= 0 else model_config(m.name).pixel_head


def _folder_name(name: str) -> bool:
    return name not in ("", ".", "..") and not set(name) & set("/\\")


def method_checks(c: "Config") -> list[tuple[str, typing.Callable[[], bool], str]]:
    """(key, ok, why) of the training methods' keys: targets and weightings, expert pairs, nested resolutions."""
    from models.sizes import model_config, outer_config, outer_sizes

    m, d, t, s, dt = c.model, c.diffusion, c.train, c.sample, c.data
    from_ = lambda choices: f"must be one of: {', '.join(choices)}"
    res, sr, w, ex, cuts = d.resolutions, d.sigma_range, d.resolution_loss_weights, m.experts, s.expert_sigmas
    nested = len(res) == 2
    outer_patch = lambda: outer_config(m.outer).patch_size
    return [
        ("diffusion.target", lambda: d.target in TARGETS, from_(TARGETS)),
        ("diffusion.weighting", lambda: d.weighting in WEIGHTINGS, from_(WEIGHTINGS)),
        ("diffusion.sigma_range", lambda: len(sr) in (0, 2), "must be [] or [lo, hi] (null = no bound)"),
        ("diffusion.sigma_range", lambda: all(v is None or v > 0 for v in sr)
         and (len(sr) == 0 or None in sr or sr[0] < sr[1]), "needs 0 < lo < hi"),
        ("model.experts", lambda: len(ex) != 1, "must name at least two expert runs, or none"),
        ("model.experts", lambda: all(_folder_name(e) for e in ex) and len(set(ex)) == len(ex)
         and c.run.name not in ex, "must be distinct run folder names other than run.name"),
        ("sample.expert_sigmas", lambda: len(cuts) == max(0, len(ex) - 1),
         f"must hold one noise level fewer than model.experts ({len(ex)} experts)"),
        ("sample.expert_sigmas", lambda: all(v > 0 for v in cuts) and all(a > b for a, b in zip(cuts, cuts[1:])),
         "must be > 0 and in descending order (expert 0 takes the highest noise)"),
        ("diffusion.sigma_range", lambda: not ex or not sr,
         "is set for each expert from sample.expert_sigmas when model.experts is given; leave it empty"),
        ("diffusion.resolutions", lambda: len(res) <= 2, "must hold at most two resolutions (low, high)"),
        ("diffusion.resolutions", lambda: all(v >= 1 for v in res) and all(a < b for a, b in zip(res, res[1:])),
         "must be increasing positive sizes"),
        ("diffusion.resolutions", lambda: all(dt.image_size % v == 0 for v in res),
         f"must each divide data.image_size={dt.image_size} (the data is average-pooled to each)"),
        ("diffusion.resolutions", lambda: not res or res[0] % patch_size(m) == 0,
         f"must start with a multiple of {m.name}'s patch size (model.patch_size)"),
        ("diffusion.resolutions", lambda: not nested or res[1] % res[0] == 0,
         "must end with a whole multiple of the low resolution"),
        ("model.outer", lambda: m.outer in ("", *outer_sizes()),
         f"must be empty or one of: {', '.join(outer_sizes())}"),
        ("model.outer", lambda: bool(m.outer) == nested,
         "names the outer stream of a nested model: set it exactly when diffusion.resolutions holds two resolutions"),
        ("diffusion.resolutions", lambda: not nested or res[1] % outer_patch() == 0,
         f"must end with a multiple of model.outer={m.outer!r}'s patch size"),
        ("diffusion.resolutions", lambda: not nested or (res[1] // outer_patch()) % (res[0] // patch_size(m)) == 0,
         "must give an outer token grid that is a whole multiple of the inner one (a k×k token merge)"),
        ("diffusion.resolutions", lambda: not (nested and ex), "cannot be nested with model.experts"),
        ("diffusion.resolution_loss_weights", lambda: not w or len(w) == max(1, len(res)),
         f"must hold one weight per resolution ({max(1, len(res))}: diffusion.resolutions={res})"),
        ("diffusion.resolution_loss_weights", lambda: all(v >= 0 for v in w) and (not w or sum(w) > 0),
         "must be >= 0 and not all 0"),
        ("diffusion.schedule_shift_power", lambda: d.schedule_shift_power >= 0, "must be >= 0"),
        ("diffusion.objective", lambda: d.objective == "edm" or not res,
         "must be 'edm' with diffusion.resolutions (the initial-step model trains at data.image_size)"),
        ("diffusion.lowres_condition", lambda: d.lowres_condition == 0 or (
            0 < d.lowres_condition < dt.image_size and dt.image_size % d.lowres_condition == 0),
         f"must be 0 (off) or a side that divides data.image_size={dt.image_size} and is smaller"),
        ("diffusion.lowres_condition", lambda: d.lowres_condition == 0 or (not res and d.objective == "edm"),
         "needs a plain denoiser at data.image_size (no diffusion.resolutions, diffusion.objective=edm)"),
        ("model.pooled_caption", lambda: m.pooled_caption or d.objective != "init_step",
         "must be true with diffusion.objective=init_step: a time-free network's adaLN condition is the pooled caption"),
        ("model.pooled_caption", lambda: m.pooled_caption or model_config(m.name).cross_attention,
         f"must be true for {m.name}: without cross-attention the caption reaches the network only pooled"),
        ("diffusion.lowres_aug", lambda: d.lowres_aug >= 0, "must be >= 0 (0 = no noise on the condition)"),
        ("sample.init", lambda: d.lowres_condition == 0 or s.init == "cascade",
         "must be 'cascade' for a run conditioned on a low-resolution image (diffusion.lowres_condition): its "
         "condition is the low model's sample"),
        ("sample.parallel", lambda: d.lowres_condition == 0 or s.parallel == "none",
         "must be 'none' for a run conditioned on a low-resolution image (its condition is not split)"),
        ("train.init_prefix", lambda: not t.init_prefix or t.init_prefix.endswith("."),
         "must be empty or a submodule name ending in '.', e.g. 'inner.'"),
        ("train.init_prefix", lambda: not t.init_prefix or bool(t.init_from), "needs train.init_from"),
        ("train.init_from_ema", lambda: not t.init_from_ema or bool(t.init_from), "needs train.init_from"),
        ("train.init_resize_patches", lambda: not t.init_resize_patches or bool(t.init_from), "needs train.init_from"),
    ]


def sadm_checks(a: SadmConfig, d: DiffusionConfig, t: TrainConfig) -> list[tuple[str, typing.Callable[[], bool], str]]:
    """(key, ok, why) of the sadm section; the cross-section ones only matter when it is enabled."""
    from engine.diffusion.structure import DISTANCES, KERNELS

    return [
        ("sadm.weight", lambda: a.weight >= 0, "must be >= 0"),
        ("sadm.disc_lr", lambda: a.disc_lr > 0, "must be > 0"),
        ("sadm.disc_width", lambda: a.disc_width >= 1, "must be >= 1"),
        ("sadm.kernel", lambda: a.kernel in KERNELS, f"must be one of: {', '.join(KERNELS)}"),
        ("sadm.distance", lambda: a.distance in DISTANCES, f"must be one of: {', '.join(DISTANCES)}"),
        ("sadm.sigma_max", lambda: a.sigma_max >= 0, "must be >= 0 (0 = no noise gate)"),
        ("sadm.start_step", lambda: a.start_step >= 0, "must be >= 0"),
        ("sadm.disc_every", lambda: a.disc_every >= 1, "must be >= 1"),
        ("sadm.enabled", lambda: not a.enabled or d.objective == "edm",
         f"needs diffusion.objective=edm (got {d.objective!r}): the structure compares one-step denoiser predictions"),
        ("sadm.enabled", lambda: not a.enabled or not d.resolutions,
         "cannot be combined with diffusion.resolutions: the structure term reads one stream's predictions"),
        ("sadm.enabled", lambda: not a.enabled or t.micro_batch >= 2,
         f"needs train.micro_batch >= 2 (got {t.micro_batch}): the structure relates samples within a micro-batch"),
    ]


def _colour_bias_ok(text: str) -> bool:
    from engine.data.synthetic import parse_colour_weights
    try:
        parse_colour_weights(text)
    except ValueError:
        return False
    return True


def _colour_bias_why(text: str) -> str:
    from engine.data.synthetic import parse_colour_weights
    try:
        parse_colour_weights(text)
    except ValueError as e:
        return f"is not a colour distribution: {e}"
    return ""


def sampling_checks(s: SampleConfig, d: DiffusionConfig) -> list[tuple[str, typing.Callable[[], bool], str]]:
    """(key, ok, why) of the sampler's settings; shared by config files and the sampling flags."""
    from_ = lambda choices: f"must be one of: {', '.join(choices)}"
    rule = s.lower_order_final
    return [
        ("diffusion.objective", lambda: d.objective in ("edm", "init_step"), from_(("edm", "init_step"))),
        ("diffusion.sigma_min", lambda: d.sigma_min > 0, "must be > 0"),
        ("diffusion.sigma_min", lambda: d.sigma_min < d.sigma_max, f"must be < diffusion.sigma_max={d.sigma_max}"),
        ("sample.solver", lambda: s.solver in SOLVERS, from_(SOLVERS)),
        ("sample.order", lambda: 1 <= s.order <= 3, "must be 1, 2 or 3"),
        ("sample.dpmpp_variant", lambda: s.dpmpp_variant in DPMPP_VARIANTS, from_(DPMPP_VARIANTS)),
        ("sample.unipc_variant", lambda: s.unipc_variant in ("bh1", "bh2"), from_(("bh1", "bh2"))),
        ("sample.lower_order_final",
         lambda: rule in ("always", "never") or (rule.startswith("below:") and rule[6:].isdigit()),
         "must be 'always', 'never' or 'below:N' (N a whole number)"),
        ("sample.nfe", lambda: s.nfe is None or s.nfe >= 1, "must be >= 1 (or null: use sample.steps)"),
        ("sample.schedule", lambda: s.schedule in SCHEDULES, from_(SCHEDULES)),
        ("sample.schedule", lambda: s.schedule != "optimized" or s.solver != "heun",
         "is made for a multistep solver's order pattern (euler, dpmpp, unipc), not sample.solver=heun"),
        ("sample.rho", lambda: s.rho > 0, "must be > 0"),
        ("sample.stepopt_power", lambda: s.stepopt_power in (1, 2), "must be 1 or 2"),
        ("sample.stepopt_init", lambda: s.stepopt_init in SCHEDULES[:3], from_(SCHEDULES[:3])),
        ("sample.init", lambda: s.init in INITS, from_(INITS)),
        ("sample.init", lambda: s.init == "noise" or not d.resolutions,
         "must be 'noise' with diffusion.resolutions (the other starts are made at data.image_size)"),
        ("sample.sing_run", lambda: s.init != "sing" or bool(s.sing_run),
         "must name a trained initial-step run (diffusion.objective=init_step) when sample.init=sing"),
        ("sample.sing_guidance", lambda: s.sing_guidance in SING_GUIDANCE, from_(SING_GUIDANCE)),
        ("sample.cascade_run", lambda: s.init != "cascade" or bool(s.cascade_run),
         "must name the run folder of a lower-resolution model when sample.init=cascade"),
        ("sample.cascade_until", lambda: s.init != "cascade" or d.sigma_min < s.cascade_until < d.sigma_max,
         f"must lie between diffusion.sigma_min={d.sigma_min} and diffusion.sigma_max={d.sigma_max}"),
        ("sample.cascade_restart", lambda: s.init != "cascade" or d.sigma_min < s.cascade_restart <= (
            d.sigma_max if d.lowres_condition else s.cascade_until),
         f"must be > diffusion.sigma_min={d.sigma_min} and <= sample.cascade_until={s.cascade_until} (<= "
         f"diffusion.sigma_max={d.sigma_max} for a run conditioned on the low model's image)"),
        ("sample.guide_step", lambda: s.guide_step is None or s.guide_step >= 0, "must be >= 0 (or null: newest)"),
        ("sample.guide_step", lambda: s.guide_step is None or bool(s.guide_run),
         "names a checkpoint of the guiding model: set sample.guide_run too"),
        ("sample.guide_caption", lambda: s.guide_caption in GUIDE_CAPTIONS, from_(GUIDE_CAPTIONS)),
        ("sample.guide_run", lambda: not s.guide_run or s.parallel == "none",
         f"needs sample.parallel='none', not {s.parallel!r}: the parallel modes guide with the run's own "
         "unconditional branch"),
        ("sample.guide_run", lambda: not s.guide_run or d.lowres_condition == 0,
         "cannot guide a run conditioned on a low-resolution image (diffusion.lowres_condition)"),
        ("sample.cfg_sigma_min", lambda: s.cfg_sigma_min >= 0, "must be >= 0"),
        ("sample.cfg_sigma_max", lambda: s.cfg_sigma_max is None or s.cfg_sigma_max > s.cfg_sigma_min,
         f"must be > sample.cfg_sigma_min={s.cfg_sigma_min} (or null: no upper end)"),
        ("sample.s_churn", lambda: s.s_churn >= 0, "must be >= 0 (0: the deterministic solver)"),
        ("sample.s_churn", lambda: s.s_churn == 0 or s.solver in ("heun", "euler"),
         f"needs sample.solver heun or euler (one-step solvers), not {s.solver!r}: a multistep solver's history "
         "does not hold once noise is added between steps"),
        ("sample.s_tmin", lambda: s.s_tmin >= 0, "must be >= 0"),
        ("sample.s_tmax", lambda: s.s_tmax is None or s.s_tmax > s.s_tmin,
         f"must be > sample.s_tmin={s.s_tmin} (or null: no upper end)"),
        ("sample.s_noise", lambda: s.s_noise > 0, "must be > 0"),
        ("sample.parallel", lambda: s.parallel in PARALLEL_MODES, from_(PARALLEL_MODES)),
        ("sample.parallel", lambda: s.parallel == "none" or s.s_churn == 0,
         "must be 'none' with stochastic sampling (sample.s_churn > 0): the parallel modes run the deterministic "
         "solver"),
        ("sample.parallel", lambda: s.parallel == "none" or (s.cfg_sigma_min == 0 and s.cfg_sigma_max is None),
         "must be 'none' with a guidance interval (sample.cfg_sigma_min / sample.cfg_sigma_max): the parallel modes "
         "keep both halves of guidance at every evaluation"),
        ("sample.warmup_evals", lambda: s.warmup_evals >= 1,
         "must be >= 1 (the first evaluation has no earlier keys/values to use)"),
        ("sample.moe_routing", lambda: s.moe_routing in MOE_ROUTINGS, from_(MOE_ROUTINGS)),
        ("sample.moe_routing", lambda: s.parallel != "naive_patch" or s.moe_routing != "displaced",
         "needs the exchange of sample.parallel=patch or full_sync; naive_patch exchanges nothing: use local (no "
         "exchange at all) or sync"),
    ]


def config_checks(c: Config) -> list[tuple[str, typing.Callable[[], bool], str]]:
    """Every (key, test, what is allowed) of a config, in the order they are checked."""
    from models.sizes import sizes

    r, m, dt, d, t, o, s = c.run, c.model, c.data, c.diffusion, c.train, c.optim, c.sample
    # (key, test, what is allowed); tests are lambdas so that one runs only after the keys it divides by passed.
    return [
        ("run.name", lambda: _folder_name(r.name),
         "must be a folder name (not empty, no '/' or '\\')"),
        ("run.out_dir", lambda: bool(r.out_dir), "must not be empty"),
        ("run.seed", lambda: r.seed >= 0, "must be >= 0"),
        ("model.name", lambda: m.name in sizes(), f"is not a model size; choices: {', '.join(sizes())}"),
        ("model.pos_interp_scale", lambda: m.pos_interp_scale > 0, "must be > 0"),
        ("model.init", lambda: m.init in ("identity", "official"), "must be 'identity' or 'official'"),
        ("data.source", lambda: dt.source in ("synthetic", "precomputed", "random"),
         "must be 'synthetic', 'precomputed' or 'random'"),
        ("data.path", lambda: dt.source != "precomputed" or bool(dt.path),
         "must name the precomputed folder when data.source=precomputed"),
        ("data.resolution", lambda: dt.resolution >= 1, "must be >= 1"),
        ("data.num_workers", lambda: dt.num_workers >= 0, "must be >= 0"),
        ("data.num_samples", lambda: dt.num_samples >= 1, "must be >= 1"),
        ("data.backgrounds", lambda: dt.backgrounds in ("fixed", "prompted"), "must be 'fixed' or 'prompted'"),
        ("data.colour_bias", lambda: _colour_bias_ok(dt.colour_bias), _colour_bias_why(dt.colour_bias)),
        ("data.caption_colour_dropout", lambda: 0 <= dt.caption_colour_dropout <= 1, "must be in [0, 1]"),
        ("data.colour_bias", lambda: dt.source == "synthetic" or not (dt.colour_bias or dt.caption_colour_dropout),
         "and data.caption_colour_dropout apply to data.source=synthetic only"),
        ("data.image_size", lambda: dt.image_size >= 1, "must be >= 1"),
        ("model.patch_size", lambda: m.patch_size >= 0, "must be >= 0 (0 = the size's own)"),
        ("model.pixel_head", lambda: m.pixel_head >= -1, "must be >= -1 (-1 = the size's own, 0 = none)"),
        ("model.pixel_head", lambda: not pixel_head(m) or d.mask_ratio == 0,
         "needs diffusion.mask_ratio=0: the pixel head predicts every pixel, deferred masking drops tokens"),
        ("model.pixel_head", lambda: not pixel_head(m) or not m.outer,
         "is for single-stream models; a nested model (model.outer) has none"),
        ("data.image_size", lambda: bool(d.resolutions) or dt.image_size % patch_size(m) == 0,
         f"must be a multiple of {m.name}'s patch size (model.patch_size)"),
        ("data.image_size", lambda: dt.source != "synthetic" or dt.image_size >= 16,
         "must be >= 16 for data.source=synthetic (smaller shapes are unreadable)"),
        ("data.channels", lambda: dt.channels >= 1, "must be >= 1"),
        ("data.channels", lambda: dt.source != "synthetic" or dt.channels == 3,
         "must be 3 for data.source=synthetic (it renders RGB pixels)"),
        ("data.text_encoder", lambda: bool(dt.text_encoder), "must name a text encoder (hub id or folder)"),
        ("data.caption_len", lambda: dt.caption_len >= 1, "must be >= 1"),
        ("data.caption_channels", lambda: dt.caption_channels >= 1, "must be >= 1"),
        ("data.caption_dropout", lambda: 0 <= dt.caption_dropout < 1, "must be in [0, 1)"),
        ("diffusion.mask_ratio", lambda: 0 <= d.mask_ratio < 1,
         "must be in [0, 1): at least one token must be kept"),
        ("diffusion.p_std", lambda: d.p_std > 0, "must be > 0"),
        ("diffusion.sigma_data", lambda: d.sigma_data > 0, "must be > 0"),
        *method_checks(c),
        ("train.steps", lambda: t.steps >= 1, "must be >= 1"),
        ("train.micro_batch", lambda: t.micro_batch >= 1, "must be >= 1"),
        ("train.global_batch", lambda: t.global_batch >= 1, "must be >= 1"),
        ("train.global_batch", lambda: t.global_batch % t.micro_batch == 0,
         f"must be a multiple of train.micro_batch={t.micro_batch}"),
        ("train.precision", lambda: t.precision in ("auto", "bf16", "fp32"), "must be 'auto', 'bf16' or 'fp32'"),
        ("train.reduce_dtype", lambda: t.reduce_dtype in ("fp32", "bf16"), "must be 'fp32' or 'bf16'"),
        ("train.fsdp", lambda: t.fsdp in ("auto", "always"), "must be 'auto' or 'always'"),
        ("train.ema_decay", lambda: 0 <= t.ema_decay < 1, "must be in [0, 1)"),
        ("train.ema_start", lambda: t.ema_start >= 0, "must be >= 0"),
        ("train.max_nonfinite_steps", lambda: t.max_nonfinite_steps >= 1, "must be >= 1"),
        ("train.log_every", lambda: t.log_every >= 1, "must be >= 1"),
        ("train.ckpt_every", lambda: t.ckpt_every >= 1, "must be >= 1"),
        ("train.keep_checkpoints", lambda: t.keep_checkpoints >= 1, "must be >= 1"),
        ("train.sample_every", lambda: t.sample_every >= 0, "must be >= 0"),
        ("optim.lr", lambda: o.lr > 0, "must be > 0"),
        ("optim.betas", lambda: all(0 <= b < 1 for b in o.betas), "must be two numbers in [0, 1)"),
        ("optim.weight_decay", lambda: o.weight_decay >= 0, "must be >= 0"),
        ("optim.eps", lambda: o.eps > 0, "must be > 0"),
        ("optim.schedule", lambda: o.schedule in ("cosine", "constant", "wsd"), "must be 'cosine', 'constant' or 'wsd'"),
        ("optim.decay_fraction", lambda: 0 < o.decay_fraction <= 1, "must be in (0, 1]"),
        ("optim.decay_shape", lambda: o.decay_shape in ("linear", "cosine", "1-sqrt"),
         "must be 'linear', 'cosine' or '1-sqrt'"),
        ("optim.optimizer", lambda: o.optimizer in ("adamw", "muon"), "must be 'adamw' or 'muon'"),
        ("optim.muon_momentum", lambda: 0 <= o.muon_momentum < 1, "must be in [0, 1)"),
        ("optim.muon_ns_dtype", lambda: o.muon_ns_dtype in ("auto", "bf16", "fp32"), "must be 'auto', 'bf16' or 'fp32'"),
        ("optim.muon_ns_steps", lambda: o.muon_ns_steps >= 1, "must be >= 1"),
        ("optim.warmup_steps", lambda: o.warmup_steps >= 0, "must be >= 0"),
        ("optim.min_lr_ratio", lambda: 0 <= o.min_lr_ratio <= 1, "must be in [0, 1]"),
        ("optim.grad_clip", lambda: o.grad_clip >= 0, "must be >= 0"),
        ("sample.steps", lambda: s.steps >= 1, "must be >= 1"),
        ("sample.prompts", lambda: len(s.prompts) >= 1, "must hold at least one prompt"),
        ("sample.per_prompt", lambda: s.per_prompt >= 1, "must be >= 1"),
        ("sample.final_eval_images", lambda: s.final_eval_images >= 0, "must be >= 0 (0 = no final check)"),
        ("sample.seed", lambda: s.seed >= 0, "must be >= 0"),
        *sampling_checks(s, d),
        ("cost.usd_per_gpu_hour", lambda: c.cost.usd_per_gpu_hour >= 0, "must be >= 0"),
        *sadm_checks(c.sadm, d, t),
    ]
