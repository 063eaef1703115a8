"""A nested (Matryoshka, Gu et al. 2024) MicroDiT: an unchanged MicroDiT denoises the low resolution inside an outer
stream that denoises the high one.

The outer stream embeds the high-resolution patches, runs a few blocks, merges each k×k group of its tokens into one
token of the inner model's grid and adds it (through a zero-initialised linear) to the inner model's token
embeddings; the inner model runs; its last hidden tokens go back through a zero-initialised linear, are split into
k×k outer tokens and added to the outer stream, which runs its last blocks (on the tokens kept by deferred masking, if
any) and its own final layer. Both streams share the inner model's caption embedding and adaLN condition (timestep +
pooled caption). With the adapters at zero the inner model's output is exactly what it is alone, so a checkpoint of a
low-resolution MicroDiT is the nested model's inner model (progressive training).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

import tessera_kernels as kernels
from models.blocks import DiTBlock
from models.config import ModelConfig
from models.layers import FinalLayer, layer_norm, sincos_pos_embed_2d
from models.microdit import DEFAULT_KERNELS, MicroDiT, PatchEmbed, init_block, patchify, unpatchify


@dataclass
class OuterConfig:
    """The outer stream's shapes. Its blocks take the inner model's settings (head width, norms, MLP kind) and its
    conditioning; sizes live in models/sizes.py OUTER_SIZES."""

    input_size: int = 32
    """Side of the high-resolution input."""
    in_channels: int = 3
    """Channels of the input."""
    patch_size: int = 4
    """Side of an outer patch."""
    dim: int = 96
    """Width of the outer blocks."""
    pre_depth: int = 1
    """Outer blocks before the inner model (their tokens feed it)."""
    post_depth: int = 1
    """Outer blocks after it (they read its output)."""
    mlp_ratio: float = 2.0
    """MLP hidden / dim of the outer blocks."""

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def patch_channels(self) -> int:
        return self.patch_size**2 * self.in_channels


@dataclass
class NestedConfig:
    """Inner (low resolution) and outer (high resolution) streams."""

    inner: ModelConfig
    outer: OuterConfig

    def validate(self) -> None:
        self.inner.validate("model")
        gi, go = self.inner.input_size // self.inner.patch_size, self.outer.grid
        if self.outer.input_size % self.outer.patch_size or go % gi:
            raise ValueError(f"model.outer: a {self.outer.input_size} px input in patches of {self.outer.patch_size} "
                             f"must give a token grid that is a multiple of the inner one ({gi}x{gi})")
        if self.outer.dim % self.inner.head_dim:
            raise ValueError(f"model.outer: dim {self.outer.dim} must be a multiple of head_dim {self.inner.head_dim}")

    @property
    def merge(self) -> int:
        """k: outer tokens per inner token along each side."""
        return self.outer.grid // (self.inner.input_size // self.inner.patch_size)

    @property
    def num_patches(self) -> int:
        """Tokens of the high-resolution stream: the ones deferred masking draws from."""
        return self.outer.grid**2

    @property
    def input_size(self) -> int:
        return self.outer.input_size

    @property
    def in_channels(self) -> int:
        return self.outer.in_channels

    @property
    def resolutions(self) -> list[int]:
        return [self.inner.input_size, self.outer.input_size]


class NestedMicroDiT(nn.Module):
    def __init__(self, cfg: NestedConfig, kernel_backends: dict[str, str] | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.inner = MicroDiT(cfg.inner, kernel_backends)
        backends = {**DEFAULT_KERNELS, **(kernel_backends or {})}
        ops = {op: kernels.resolve(op, name) for op, name in kernels.flag_backends(backends).items()}
        self.gather_fn = ops["gather"]
        ic, oc = cfg.inner, cfg.outer
        k2 = cfg.merge**2
        self.x_embedder = PatchEmbed(oc.patch_size, oc.in_channels, oc.dim)
        pos = sincos_pos_embed_2d(oc.dim, oc.grid, ic.pos_interp_scale).to(self.x_embedder.proj.weight.device)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # (1, N_hi, outer dim)
        # caption tokens at the outer width, as the patch-mixer maps them
        self.map_y = nn.Sequential(layer_norm(ic.dim, ic.norm_eps), nn.Linear(ic.dim, oc.dim, bias=ic.use_bias)) \
            if oc.dim != ic.dim else nn.Identity()
        self.pre_blocks = nn.ModuleList(DiTBlock(ic, oc.dim, 1.0, oc.mlp_ratio, False, ops)
                                        for _ in range(oc.pre_depth))
        self.down = nn.Linear(k2 * oc.dim, ic.dim)  # k×k outer tokens -> one inner token embedding
        self.up = nn.Linear(ic.dim, k2 * oc.dim)  # one inner hidden token -> k×k outer tokens
        self.post_blocks = nn.ModuleList(DiTBlock(ic, oc.dim, 1.0, oc.mlp_ratio, False, ops)
                                         for _ in range(oc.post_depth))
        self.final_layer = FinalLayer(oc.dim, ic.dim, oc.patch_channels, ic.norm_eps, ops["norm"])
        self.initialize_outer()

    def forward(self, xs: list[torch.Tensor], c_noise: torch.Tensor, y: torch.Tensor,
                y_mask: torch.Tensor | None = None, keep_idx: torch.Tensor | None = None) -> list[torch.Tensor]:
        """xs: preconditioned inputs [low (B, C, r, r), high (B, C, R, R)]; keep_idx (B, K) high-resolution tokens
        kept for the last outer blocks (None = all). Returns [(B, N_lo, p_i²·C), (B, K or N_hi, p_o²·C)]."""
        x_lo, x_hi = xs
        h_in, y_in, c = self.inner.embed(x_lo, c_noise, y, y_mask)  # (B, N_lo, d_i), (B, L, d_i), (B, d_i)
        dt = self.x_embedder.proj.weight.dtype
        h = (self.x_embedder(x_hi.to(dt)) + self.pos_embed).to(dt)  # (B, N_hi, d_o)
        y_out = self.map_y(y_in)  # (B, L, d_o)
        for block in self.pre_blocks:
            h = block(h, y_out, y_mask, c)
        h_in = h_in + self.down(self.merge_tokens(h))  # (B, N_lo, d_i)
        h_in = self.inner.trunk(h_in, y_in, y_mask, c)  # the inner model runs on all its tokens
        out_lo = self.inner.final_layer(h_in, c)  # (B, N_lo, p_i²·C)
        h = h + self.split_tokens(self.up(h_in))  # (B, N_hi, d_o)
        if keep_idx is not None:
            h = self.gather_fn(h, keep_idx)  # (B, K, d_o): deferred masking of the high-resolution stream
        for block in self.post_blocks:
            h = block(h, y_out, y_mask, c)
        return [out_lo, self.final_layer(h, c)]

    # ---- token grids --------------------------------------------------------------------------------------------
    def merge_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N_hi, d) -> (B, N_lo, k·k·d): the k×k outer tokens over each inner token, row-major."""
        B, _, d = h.shape
        k, g = self.cfg.merge, self.cfg.outer.grid // self.cfg.merge
        h = h.reshape(B, g, k, g, k, d)  # (B, gy, ky, gx, kx, d)
        return h.permute(0, 1, 3, 2, 4, 5).reshape(B, g * g, k * k * d)

    def split_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N_lo, k·k·d) -> (B, N_hi, d); inverse of merge_tokens."""
        B = h.shape[0]
        k, g = self.cfg.merge, self.cfg.outer.grid // self.cfg.merge
        d = h.shape[-1] // (k * k)
        h = h.reshape(B, g, g, k, k, d)  # (B, gy, gx, ky, kx, d)
        return h.permute(0, 1, 3, 2, 4, 5).reshape(B, g * k * g * k, d)

    # ---- patches <-> images, per stream (0 = low, 1 = high) -------------------------------------------------------
    def patchify(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        return self.inner.patchify(x) if stream == 0 else patchify(x, self.cfg.outer.patch_size)

    def unpatchify(self, tokens: torch.Tensor, stream: int) -> torch.Tensor:
        if stream == 0:
            return self.inner.unpatchify(tokens)
        return unpatchify(tokens, self.cfg.outer.patch_size, self.cfg.outer.in_channels)

    # ---- init and accounting ------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_outer(self) -> None:
        """The inner model's scheme for the outer blocks (identity at init, zero gates); the adapters and the outer
        final layer start at zero, so the inner model starts out as it is alone and the high stream outputs 0."""
        for m in [self.map_y, *self.pre_blocks, *self.post_blocks, self.final_layer]:
            for lin in (x for x in m.modules() if isinstance(x, nn.Linear)):
                nn.init.xavier_uniform_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        depth = self.cfg.inner.depth
        for block in [*self.pre_blocks, *self.post_blocks]:
            init_block(block, 0.02 / (2 * depth) ** 0.5, self.cfg.inner.init == "identity")
        for lin in (self.down, self.up, self.final_layer.linear, self.final_layer.adaLN_modulation[-1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def block_containers(self) -> list[nn.ModuleList]:
        """Every list of transformer blocks, the inner model's too: the unit FSDP shards and compiles."""
        return [*self.inner.block_containers(), self.pre_blocks, self.post_blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
