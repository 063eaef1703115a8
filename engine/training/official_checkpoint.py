"""Official MicroDiT checkpoints (SonyResearch/micro_diffusion) as Tessera run folders (the library behind
engine/convert.py).

Tessera's MicroDiT uses the official parameter names, so the key map is the identity once the trainer's container
and key prefixes are removed and the two official buffers are dropped (`pos_embed` is rebuilt from the config,
Tessera has no `mask_token`). The size is the registered one whose model has exactly the same keys and shapes.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from engine.config import Config, ConfigError, save_config
from engine.training.checkpoint import Checkpointer
from models.config import ModelConfig
from models.microdit import MicroDiT
from models.sizes import model_config, sizes

ANCHOR = "x_embedder.proj.weight"  # every MicroDiT state dict has it; what precedes it is the wrapper's prefix
DROPPED = ("pos_embed", "mask_token")  # official buffers Tessera does not keep
WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # compile / FSDP1 / AC
CONTAINER_KEYS = ("state", "model", "state_dict", "module")  # searched first: Composer's {"state": {"model": ...}}
BASE_INPUT_SIZE = 32  # latent side at 256 px: the resolution position embeddings are interpolated from
REFERENCE_KERNELS = {"gather": "torch", "moe": "torch", "norm": "torch", "attention": "torch"}  # never run here
OFFICIAL_TEXT_ENCODER = "apple/DFN5B-CLIP-ViT-H-14-378"  # what every released model was trained on (1024 wide)
OFFICIAL_CAPTION_CHANNELS = 1024


# ---- state dict -> (state dict, config, size) -------------------------------------------------------------------

def official_state_dict_to_tessera(sd: dict) -> tuple[dict[str, torch.Tensor], ModelConfig, str]:
    """Map an official MicroDiT state dict (raw, or wrapped as the Composer trainer saves it) onto Tessera.

    Returns the Tessera state dict, its ModelConfig and size name. Raises ValueError naming the closest size and
    the first offending keys when no registered size has exactly these keys and shapes."""
    sd = strip_prefix(find_weights(sd))
    pos = sd.get("pos_embed")
    sd = {k: v for k, v in sd.items() if k not in DROPPED}
    w = sd[ANCHOR]  # (dim, C, p, p)
    in_channels, patch = w.shape[1], w.shape[-1]
    caption_channels = require(sd, "y_embedder.y_proj.fc1.weight").shape[1]  # (dim, caption_channels)
    input_size = BASE_INPUT_SIZE
    if pos is not None:  # (1, N, dim) with N = (input_size / p)²
        side = math.isqrt(pos.shape[1])
        if side * side != pos.shape[1]:
            raise ValueError(f"pos_embed {tuple(pos.shape)} is not a square grid of tokens")
        input_size = patch * side
    # The official 512 px models interpolate positions so the larger grid spans the 256 px grid's range.
    scale = input_size / BASE_INPUT_SIZE if input_size > BASE_INPUT_SIZE else 1.0
    name, cfg = match_size(sd, input_size=input_size, in_channels=in_channels, caption_channels=caption_channels,
                           pos_interp_scale=scale)
    return sd, cfg, name


def find_weights(obj) -> dict:
    """The flat {name: tensor} dict inside a possibly nested checkpoint container."""
    found = _search(obj)
    if found is None:
        raise ValueError(f"no MicroDiT weights found (no key ending in '{ANCHOR}')")
    return found


def _search(obj) -> dict | None:
    if not isinstance(obj, dict):
        return None
    if any(isinstance(k, str) and _is_anchor(k) for k in obj):
        return obj
    # Known containers first, so e.g. Composer's model weights win over a callback's copy stored beside them.
    children = [obj[k] for k in CONTAINER_KEYS if k in obj] + [v for k, v in obj.items() if k not in CONTAINER_KEYS]
    return next((found for child in children if (found := _search(child)) is not None), None)


def _is_anchor(key: str) -> bool:
    return key == ANCHOR or key.endswith("." + ANCHOR)


def strip_prefix(sd: dict) -> dict:
    """Remove wrapper segments (torch.compile, FSDP1, activation checkpointing) and the prefix before the model's
    own names ("dit.", "model.dit.", "module.", ...); keys outside the model (VAE, text encoder) are left out."""
    clean = {}
    for key, value in sd.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            for seg in WRAPPER_SEGMENTS:
                key = key.replace(seg, "")
            clean[key] = value
    # The shortest prefix is the model itself rather than a copy nested deeper (e.g. "ema.dit.").
    prefix = min((k[: -len(ANCHOR)] for k in clean if _is_anchor(k)), key=len)
    return {k[len(prefix):]: v for k, v in clean.items() if k.startswith(prefix)}


def require(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"'{key}' missing: not a MicroDiT state dict")
    return sd[key]


def match_size(sd: dict, **data) -> tuple[str, ModelConfig]:
    """The registered size whose model (built on the meta device: no memory, no init) has exactly sd's keys and
    shapes; `data` fills the data-dependent fields of its config."""
    mismatches = {}
    for name in sizes():
        cfg = model_config(name, **data)
        try:
            with torch.device("meta"):
                ref = MicroDiT(cfg, REFERENCE_KERNELS).state_dict()
        except ValueError:  # e.g. input_size is not a multiple of this size's patch
            continue
        missing = [k for k in ref if k not in sd]
        unexpected = [k for k in sd if k not in ref]
        wrong = [f"{k} (checkpoint {tuple(sd[k].shape)}, {name} {tuple(ref[k].shape)})"
                 for k in ref if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)]
        if not (missing or unexpected or wrong):
            return name, cfg
        mismatches[name] = (missing, unexpected, wrong)
    if not mismatches:
        raise ValueError(f"no size accepts {data}")
    closest = min(mismatches, key=lambda n: sum(map(len, mismatches[n])))
    missing, unexpected, wrong = (lst[:5] for lst in mismatches[closest])
    raise ValueError(f"no Tessera size matches these weights; closest is {closest}: missing {missing}, "
                     f"unexpected {unexpected}, wrong shape {wrong}")


# ---- files ------------------------------------------------------------------------------------------------------

def load_official(path: str | Path, allow_pickle: bool = False) -> dict:
    """Read a released .pt (torch.load, weights only unless `allow_pickle`) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ConfigError(f"{path}: not a readable .safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for files that are not checkpoints
        refused = "Weights only load failed" in str(e)  # a valid pickle holding objects beyond tensors
        if not (refused and allow_pickle):
            hint = "; it holds Python objects: if you trust it, pass --allow-pickle" if refused else ""
            raise ConfigError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]}){hint}") from None
    print(f"warning: unpickling {path} with weights_only=False (--allow-pickle): it can run code", file=sys.stderr)
    return torch.load(path, map_location="cpu", weights_only=False)


def run_config(out: Path, name: str, cfg: ModelConfig) -> Config:
    """The run folder's config: the official model on random data of its shapes (no dataset is implied)."""
    c = Config()
    c.run.out_dir, c.run.name = str(out.parent), out.name
    c.model.name, c.model.pos_interp_scale = name, cfg.pos_interp_scale
    c.data.source, c.data.image_size, c.data.channels = "random", cfg.input_size, cfg.in_channels
    c.data.caption_channels = cfg.caption_channels
    if cfg.caption_channels == OFFICIAL_CAPTION_CHANNELS:  # other widths name no encoder: --text-encoder picks one
        c.data.text_encoder = OFFICIAL_TEXT_ENCODER
    c.data.caption_len = 77  # the official text encoder's (DFN5B-CLIP) token count
    c.data.attend_to_padding = True  # the official model attends to the encoder's padding tokens
    c.diffusion.sigma_data = 0.9  # the official EDM setting for SDXL-VAE latents
    return c.validate()


def convert(src: str | Path, out: str | Path, step: int = 0, allow_pickle: bool = False) -> tuple[Path, str, MicroDiT]:
    """Convert `src` into the run folder `out`; returns (checkpoint folder, size name, model)."""
    src, out = Path(src), Path(out)
    raw = load_official(src, allow_pickle)
    try:
        sd, cfg, name = official_state_dict_to_tessera(raw)
    except ValueError as e:
        raise ConfigError(f"{src}: {e}") from None
    # Built on meta and given the loaded tensors (assign): no random init of a 1B model that is overwritten anyway.
    # strict=True: every parameter is replaced. pos_embed (non-persistent) stays on meta; it is never saved.
    with torch.device("meta"):
        model = MicroDiT(cfg, REFERENCE_KERNELS)
    model.load_state_dict({k: v.float().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    out.mkdir(parents=True, exist_ok=True)
    save_config(run_config(out, name, cfg), out / "config.yaml")
    # The same weights as model and EMA (the module itself serves as both: no second copy in memory).
    ckpt = Checkpointer(out / "checkpoints", keep_last=None).save(
        step, model=model, ema=model, extra={"step": step, "converted_from": str(src)})
    return ckpt, name, model
