"""Architecture hyper-parameters of MicroDiT (and plain DiT as a setting of it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Everything that fixes the network's shapes. Sizes live in models/sizes.py; data-dependent fields
    (input_size, in_channels, caption_channels) are filled from the data config."""

    input_size: int = 32
    """Side of the (square) input: latent side (32 at 256 px with an f8 VAE) or image side in pixel space."""
    in_channels: int = 4
    """Channels of the input: 4 for SDXL-VAE latents, 3 for pixels."""
    patch_size: int = 2
    """Side of a patch; tokens = (input_size / patch_size)²."""
    dim: int = 1024
    """Backbone width."""
    depth: int = 28
    """Number of backbone blocks."""
    head_dim: int = 64
    """Width of one attention head."""
    multiple_of: int = 256
    """MLP hidden widths are rounded up to a multiple of this."""
    caption_channels: int = 1024
    """Width of the text encoder's token embeddings."""
    caption_refiner: bool = True
    """Run one transformer block over the caption tokens before use (MicroDiT's y_emb_preprocess)."""
    cross_attention: bool = True
    """Cross-attention from image tokens to caption tokens in every block; False = adaLN-only conditioning."""
    qk_norm: bool = True
    """LayerNorm (no affine) on queries and keys."""
    mlp: str = "swiglu"
    """Dense MLP type: 'swiglu' (MicroDiT) or 'gelu' (DiT)."""
    qkv_ratio: tuple[float, float] = (0.5, 1.0)
    """Layer-wise scaling: attention width / dim grows linearly from the first to the last block."""
    mlp_ratio: tuple[float, float] = (0.5, 4.0)
    """Layer-wise scaling: MLP hidden / dim grows linearly from the first to the last block."""
    mixer_depth: int = 6
    """Patch-mixer blocks run over all tokens before masking; 0 disables the mixer."""
    mixer_dim: int = 768
    """Patch-mixer width."""
    mixer_mlp_ratio: float = 4.0
    """Patch-mixer MLP hidden / mixer_dim."""
    num_experts: int = 8
    """Experts per MoE layer."""
    expert_capacity: float = 2.0
    """Expert-choice capacity: each expert takes capacity * tokens / experts tokens."""
    experts_every_n: int = 2
    """Every n-th block (never the last) uses an expert-choice MoE instead of the dense MLP; 0 disables MoE."""
    use_bias: bool = False
    """Biases in attention and MLP linears."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon."""
    pos_interp_scale: float = 1.0
    """Position-embedding interpolation: 1 at 256 px, 2 at 512 px so both cover the same range."""
    freq_embed_dim: int = 512
    """Width of the sinusoidal timestep features."""
    depth_init: bool = True
    """Scale each backbone block's output-projection init by its depth."""
    init: str = "identity"
    """'identity': the cross-attention output and the patch-embedding bias start at zero, so with the zero gates a
    fresh block is the identity. 'official': as the official code, which draws the cross-attention output like the
    other output projections and keeps PyTorch's default (uniform) patch-embedding bias."""
    pixel_head: int = 0
    """Width of a convolutional pixel head after the patch output (models/pixel_head.py); 0 = none. It needs every
    token, so it trains unmasked."""
    pixel_head_blocks: int = 2
    """Residual blocks of two 3x3 convolutions in the pixel head."""
    cond_channels: int = 0
    """Channels of an image the network is conditioned on, concatenated to its input: a cascade's super-resolution
    stage sees the low-resolution image, upsampled (engine/diffusion/lowres.py). 0 = none; the output keeps
    in_channels."""
    time_free: bool = False
    """No timestep embedding: the adaLN condition is the pooled caption alone. SingDiffusion's initial-step model
    (a network that predicts x0 from pure noise and the caption) is such a model."""
    pooled_caption: bool = True
    """Add the mean of the caption tokens (through an MLP) to the adaLN condition, as MicroDiT does. False leaves the
    caption to cross-attention alone: the adaLN condition is the timestep."""

    def __post_init__(self) -> None:
        self.qkv_ratio = tuple(float(r) for r in self.qkv_ratio)
        self.mlp_ratio = tuple(float(r) for r in self.mlp_ratio)

    def validate(self, prefix: str = "model") -> None:
        """Raise ValueError naming the key of the first impossible value."""
        checks = [
            ("input_size", self.input_size % self.patch_size == 0, "must be a multiple of patch_size"),
            ("dim", self.dim % self.head_dim == 0, "must be a multiple of head_dim"),
            ("mixer_dim", self.mixer_depth == 0 or self.mixer_dim % self.head_dim == 0, "must be a multiple of head_dim"),
            ("mlp", self.mlp in ("swiglu", "gelu"), "must be 'swiglu' or 'gelu'"),
            ("init", self.init in ("identity", "official"), "must be 'identity' or 'official'"),
            ("depth", self.depth >= 1, "must be >= 1"),
            ("pixel_head", self.pixel_head >= 0, "must be >= 0 (0 = no pixel head)"),
            ("pixel_head_blocks", self.pixel_head_blocks >= 0, "must be >= 0"),
            ("cond_channels", self.cond_channels >= 0, "must be >= 0 (0 = no conditioning image)"),
            ("pooled_caption", self.pooled_caption or self.cross_attention,
             "must be true without cross-attention: the caption would not reach the network"),
            ("pooled_caption", self.pooled_caption or not self.time_free,
             "must be true for a time-free network: its adaLN condition is the pooled caption"),
            ("num_experts", self.num_experts >= 1, "must be >= 1"),
            ("expert_capacity", self.expert_capacity > 0, "must be > 0"),
            ("qkv_ratio", len(self.qkv_ratio) == 2 and min(self.qkv_ratio) > 0, "must be two positive numbers"),
            ("mlp_ratio", len(self.mlp_ratio) == 2 and min(self.mlp_ratio) > 0, "must be two positive numbers"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"{prefix}.{key}={getattr(self, key)!r} {why}")

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def patch_channels(self) -> int:
        """Values per output token: patch_size² · in_channels."""
        return self.patch_size**2 * self.in_channels

    def block_ratios(self) -> list[tuple[float, float]]:
        """(qkv_ratio, mlp_ratio) of each backbone block: linear from first to last (layer-wise scaling)."""
        def lerp(lo: float, hi: float, i: int) -> float:
            return lo if self.depth == 1 else lo + (hi - lo) * i / (self.depth - 1)

        return [(lerp(*self.qkv_ratio, i), lerp(*self.mlp_ratio, i)) for i in range(self.depth)]

    def is_moe_block(self, i: int, mixer: bool = False) -> bool:
        """MoE in every n-th block counting from 1; never in the backbone's last block nor the mixer's first
        (the official code's placement, so its checkpoints convert)."""
        n = self.experts_every_n
        if n <= 0 or (i + 1) % n != 0:
            return False
        return i >= 1 if mixer else i < self.depth - 1
