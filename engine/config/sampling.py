"""The config's `sample` section: how a run's images are sampled (solver, time steps, start state, guidance, the
cascade, autoguidance, sampling across processes). Kept apart from engine/config/__init__.py, which builds, checks and
loads the whole config, for its size; the rules that check these keys are in engine/config/rules.py."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampleConfig:
    steps: int = 30
    """Solver steps when sample.nfe is null: Heun takes this many points plus a last Euler step into 0 (2·steps − 1
    model evaluations), the other solvers this many evaluations."""
    cfg_scale: float = 4.0
    """Classifier-free guidance scale (1 = off)."""
    cfg_sigma_min: float = 0.0
    """Guidance only where cfg_sigma_min < sigma <= cfg_sigma_max (Kynkaanniemi et al. 2024, guidance in a limited
    interval); outside it the conditional branch alone (scale 1, half the batch). 0 with null: every noise level.
    Taken by the configured sampler (engine/sample.py, engine/evaluate.py, the sample grids and the closing check, a
    cascade's low model included); the debiasing tools keep the original Heun sampler, guided at every level."""
    cfg_sigma_max: float | None = None
    """Upper end of the guidance interval (null: no upper end)."""
    s_churn: float = 0.0
    """EDM's stochastic sampling (Karras et al. 2022, Alg. 2; heun and euler, taken where the guidance interval is):
    > 0 adds fresh noise before each step from a level s_tmin <= sigma <= s_tmax, raising it to sigma (1 + gamma),
    gamma = min(s_churn / steps, sqrt 2 - 1); the same evaluations. An image's noise is seeded by its own initial
    noise (paired comparisons stay paired). 0: the deterministic solver."""
    s_tmin: float = 0.0
    """Stochastic sampling: lowest noise level that gets fresh noise."""
    s_tmax: float | None = None
    """Stochastic sampling: highest noise level that gets fresh noise (null: no upper end)."""
    s_noise: float = 1.0
    """Stochastic sampling: scale of the fresh noise (EDM's S_noise; above 1 offsets a denoiser removing too much)."""
    prompts: list[str] = field(default_factory=lambda: [
        "a red circle", "two blue squares", "a green triangle left of a yellow circle", "three white circles",
    ])
    """Fixed prompts of the sample grids written at checkpoints."""
    per_prompt: int = 4
    """Images per prompt in a grid."""
    seed: int = 0
    """Noise seed of the sample grids and of the final check."""
    final_eval_images: int = 64
    """Synthetic runs: at the end, score the final EMA model on this many held-out prompts with the GenEval-style
    detector, print one line and write <run>/final_eval.json (0 = off)."""
    solver: str = "heun"
    """ODE solver (engine/sampling/solvers.py): 'heun' (EDM's, 2nd order), 'euler', 'dpmpp' (DPM-Solver++ 1/2M/3M, by
    sample.order) or 'unipc' (UniPC-1/2/3 with its corrector, by sample.order)."""
    order: int = 2
    """dpmpp and unipc: order 1-3 (unipc's corrector adds one)."""
    dpmpp_variant: str = "midpoint"
    """dpmpp: 'midpoint' or 'heun' (diffusers' 2M variants, both with the official 3M step, which converges at 2nd order
    only) or 'lagrange' (every step integrates the interpolating polynomial exactly: 2M = heun, 3M of 3rd order)."""
    unipc_variant: str = "bh2"
    """unipc: B(h) = 'bh1' (h) or 'bh2' (e^h − 1)."""
    lower_order_final: str = "always"
    """Multistep solvers: lower the last steps' orders (last one first order) 'always', 'never' or 'below:N' (only
    when there are fewer than N steps; DPM-Solver's code uses below:10, diffusers below:15)."""
    nfe: int | None = None
    """Model evaluations (with guidance, one evaluation = the conditional and unconditional batch); null = sample.steps.
    Heun: odd n ends with the Euler step into 0, even n ends at sigma_min."""
    schedule: str = "karras"
    """Noise levels: 'karras' (rho), 'logsnr' (uniform in log sigma), 'uniform' (in sigma) or 'optimized' (Xue et al.
    2024, made for the multistep solver's order pattern; cached)."""
    rho: float = 7.0
    """Karras schedule exponent."""
    stepopt_power: int = 2
    """Optimized schedule: the modelled data-prediction error at sigma is sigma^p (EDM units, the official sigma_vp^p /
    alpha_vp); p = 1 or 2."""
    stepopt_init: str = "logsnr"
    """Optimized schedule: the schedule the optimizer starts from ('karras', 'logsnr' or 'uniform')."""
    init: str = "noise"
    """Initial state: 'noise' (sigma_max · n), 'sing' (the initial-step model's x0 + sigma_max · n, SingDiffusion),
    'data_mean' (the training data's mean image + sigma_max · n: no network, the baseline for 'sing') or 'cascade' (a
    lower-resolution model samples down to cascade_until; this run's model goes on from cascade_restart)."""
    sing_run: str = ""
    """sample.init=sing: run folder of the trained initial-step model (diffusion.objective=init_step)."""
    sing_guidance: str = "normalized"
    """sample.init=sing with guidance: 'normalized' ((u + w (c − u)) / w, the paper's code), 'plain' (u + w (c − u))
    or 'none' (conditional only)."""
    cascade_run: str = ""
    """sample.init=cascade: run folder of a model trained on the same captions at a lower resolution that divides this
    run's (e.g. 16 px for 32: diffusion.resolutions=[16]); its latest checkpoint's EMA weights lay out the image."""
    cascade_until: float = 1.0
    """sample.init=cascade: the noise level where the low model stops; its clean-image estimate there is upsampled.
    1.0 with cascade_restart 1.0 was picked on tuning prompts (docs/results/cascade.md): of the pairs tried (4 / 2
    down to 0.5 / 0.25), the lowest attribute FD on both models tried, and all-correct within 0.01 of the best."""
    cascade_restart: float = 1.0
    """sample.init=cascade: the noise level (<= cascade_until) the upsampled estimate is noised to with fresh noise,
    where this run's model takes over (engine/sampling/cascade.py). A run conditioned on the low model's image
    (diffusion.lowres_condition) may restart above cascade_until, up to diffusion.sigma_max (from pure noise)."""
    guide_run: str = ""
    """Autoguidance (Karras et al., NeurIPS 2024): run folder of a weaker model of the same task (a shorter run, or
    this run itself at an earlier checkpoint: sample.guide_step) whose output takes the unconditional branch's place,
    D = D_guide + cfg_scale (D - D_guide), where guidance runs; the same evaluations as classifier-free guidance
    (engine/sampling/autoguide.py). '' = classifier-free guidance. Taken by the configured sampler (engine/sample.py,
    engine/evaluate.py, the sample grids and the closing check, which load it when training starts: it must exist
    then); the debiasing tools keep classifier-free guidance."""
    guide_step: int | None = None
    """sample.guide_run: the checkpoint step of the guiding model (null: its newest); its EMA weights."""
    guide_caption: str = "cond"
    """sample.guide_run: the guiding model reads the caption ('cond': autoguidance proper, which sharpens what the
    model draws without pushing it toward the caption) or the null caption ('uncond': classifier-free guidance whose
    unconditional branch is the weaker model)."""
    parallel: str = "none"
    """Sampling across the processes of a torchrun launch (engine/sampling/parallel_sample.py): 'none' (one process),
    'patch' (DistriFusion: each process owns a band of token rows; self-attention uses the other bands' keys/values
    from the previous model evaluation, exchanged asynchronously), 'full_sync' (the same bands, every exchange
    synchronous: the one-process output to fp32 round-off), 'naive_patch' (bands that never exchange) or 'cfg_split'
    (the conditional and unconditional halves of guidance on two processes: exact)."""
    warmup_evals: int = 1
    """sample.parallel=patch: model evaluations at the start whose exchanges are synchronous (at least 1: the first
    evaluation has no earlier keys/values to use)."""
    moe_routing: str = "displaced"
    """Expert-choice MoE under the band modes: 'sync' (router scores of all tokens gathered at every MoE layer: exact
    routing), 'displaced' (top-k over this band's fresh scores and the other bands' scores of the previous evaluation,
    sent with the keys/values) or 'local' (top-k/N over this band's tokens: no exchange)."""
    expert_sigmas: list[float] = field(default_factory=list)
    """With model.experts: the noise levels where one expert hands over to the next, descending (one fewer than the
    experts). Expert i denoises expert_sigmas[i] <= sigma < expert_sigmas[i-1]; each evaluation picks its expert by
    its own sigma (Heun's correction too), as each was trained."""
