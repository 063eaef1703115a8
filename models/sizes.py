"""Size registry, as DiT's: a name maps to a ModelConfig. Data-dependent fields are passed as overrides."""
from __future__ import annotations

from dataclasses import replace

from models.config import ModelConfig
from models.microdit import MicroDiT
from models.nested import NestedConfig, NestedMicroDiT, OuterConfig

# CPU-sized: trains in minutes on two cores (pixel space, patch 4 on 32×32 images). The other CPU sizes change only
# what their names say.
_NANO_4 = dict(
    patch_size=4, dim=128, depth=4, head_dim=32, multiple_of=32, mixer_depth=2, mixer_dim=96,
    num_experts=4, qkv_ratio=(0.5, 1.0), mlp_ratio=(1.0, 4.0),
)

_SIZES: dict[str, dict] = {
    # The paper's 1.16B model: 6 mixer blocks at 768 wide, 28 backbone blocks at 1024, MoE every second block.
    "MicroDiT_XL_2": dict(dim=1024, depth=28, head_dim=64, mixer_depth=6, mixer_dim=768),
    # The official code's small model.
    "MicroDiT_Tiny_2": dict(dim=512, depth=16, head_dim=32, mixer_depth=4, mixer_dim=512),
    # Used by configs/tiny.yaml.
    "MicroDiT_Nano_4": _NANO_4,
    # Nano at width 192 (4.9M parameters with a 32-wide pixel head, 1.9x Nano_4's; 6 heads of 32), same patches: on the
    # 16-px phase it reads the relation words after fewer images than Nano_4, at 1.33x its cost per image. The
    # super-resolution stage's network (configs/tiny_reference_sr.yaml, with a pixel head), and the CPU reference's
    # until 2026-12-05 (docs/results/cpu_models.md).
    "MicroDiT_Mini_4": dict(_NANO_4, dim=192),
    # Nano twice as wide and 1.5x as deep (12.0M parameters with a 32-wide pixel head, 4.6x Nano_4's), same patches:
    # on the 16-px reference phase it reads the relation words after half the images Nano_4 needs
    # (docs/results/cpu_models.md).
    "MicroDiT_Micro_4": dict(_NANO_4, dim=256, depth=6, mixer_dim=128),
    # Nano's backbone on 2x2 patches (256 tokens at 32 px, 12 values each), one narrow mixer block: 4x4 patches paint
    # each 48-value patch flat, 2x2 keep shapes but blobs merge (the earlier CPU reference; docs/results/cpu_models.md).
    "MicroDiT_Nano_2": dict(_NANO_4, patch_size=2, mixer_depth=1, mixer_dim=64),
    # Plain DiT-XL/2 (Peebles & Xie) conditioned through adaLN on the pooled caption: no mixer, no MoE,
    # constant width, GELU MLP, no cross-attention or QK-norm.
    "DiT_XL_2": dict(
        dim=1152, depth=28, head_dim=72, mixer_depth=0, experts_every_n=0, qkv_ratio=(1.0, 1.0), mlp_ratio=(4.0, 4.0),
        mlp="gelu", cross_attention=False, caption_refiner=False, qk_norm=False, use_bias=True, freq_embed_dim=256,
        depth_init=False,
    ),
}

# Outer streams of nested (Matryoshka) models: the high-resolution stream around a MicroDiT (models/nested.py).
_OUTER_SIZES: dict[str, dict] = {
    # Around MicroDiT_Nano_4 at 16 px inside 32 px: 8x8 tokens of width 96, one block before and one after the inner
    # model, 2x2 tokens merged into each inner token.
    "Outer_Nano_4": dict(patch_size=4, dim=96, pre_depth=1, post_depth=1, mlp_ratio=2.0),
}


def sizes() -> list[str]:
    return sorted(_SIZES)


def model_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of size `name`, with `overrides` (e.g. input_size, in_channels, caption_channels) applied."""
    if name not in _SIZES:
        raise ValueError(f"model.name: unknown size '{name}'; choices: {', '.join(sizes())}")
    return replace(ModelConfig(**_SIZES[name]), **overrides)


def build_model(cfg: ModelConfig, kernel_backends: dict[str, str] | None = None) -> MicroDiT:
    return MicroDiT(cfg, kernel_backends)


def outer_sizes() -> list[str]:
    return sorted(_OUTER_SIZES)


def outer_config(name: str, **overrides) -> OuterConfig:
    """The OuterConfig of outer stream `name`, with `overrides` (input_size, in_channels) applied."""
    if name not in _OUTER_SIZES:
        raise ValueError(f"model.outer: unknown outer stream '{name}'; choices: {', '.join(outer_sizes())}")
    return OuterConfig(**{**_OUTER_SIZES[name], **overrides})


def build_network(cfg: ModelConfig | NestedConfig, kernel_backends: dict[str, str] | None = None):
    """A MicroDiT, or a nested model for a NestedConfig."""
    if isinstance(cfg, NestedConfig):
        return NestedMicroDiT(cfg, kernel_backends)
    return MicroDiT(cfg, kernel_backends)
