"""MicroDiT: patch-mixer over all tokens, deferred masking, then a layer-wise-scaled backbone with expert-choice MoE.

Plain DiT is a setting of the same class (no mixer, no MoE, constant width, adaLN-only conditioning).
The model predicts, for the kept tokens, the values of their patches (EDM's F_θ); engine/diffusion/edm.py wraps it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import tessera_kernels as kernels
from models.blocks import DiTBlock
from models.config import ModelConfig
from models.layers import CaptionBlock, FinalLayer, Mlp, SwiGLU, TimestepEmbedder, layer_norm, sincos_pos_embed_2d
from models.moe import ExpertChoiceMoE
from models.pixel_head import PixelHead

DEFAULT_KERNELS = {"gather": "auto", "moe": "auto", "norm": "auto", "attention": "auto"}


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> tokens, row-major over the patch grid."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, dim)


class MicroDiT(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel_backends: dict[str, str] | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        backends = {**DEFAULT_KERNELS, **(kernel_backends or {})}
        ops = {op: kernels.resolve(op, name) for op, name in kernels.flag_backends(backends).items()}
        self.gather_fn = ops["gather"]
        dim, eps = cfg.dim, cfg.norm_eps

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels + cfg.cond_channels, dim)
        grid = cfg.input_size // cfg.patch_size
        pos = sincos_pos_embed_2d(dim, grid, cfg.pos_interp_scale).to(self.x_embedder.proj.weight.device)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # (1, N, dim); rebuilt per resolution
        if not cfg.time_free:
            self.t_embedder = TimestepEmbedder(dim, cfg.freq_embed_dim)
        self.y_embedder = nn.Module()
        self.y_embedder.y_proj = Mlp(cfg.caption_channels, dim, dim, norm_eps=eps)
        if cfg.caption_refiner:
            self.y_emb_preprocess = CaptionBlock(dim, cfg.head_dim, cfg.multiple_of, cfg.use_bias, eps, ops["attention"])
        if cfg.pooled_caption:
            self.pooled_y_emb_process = Mlp(dim, dim, dim, norm_eps=eps)

        if cfg.mixer_depth > 0:
            md = cfg.mixer_dim
            self.patch_mixer = nn.ModuleList(
                DiTBlock(cfg, md, 1.0, cfg.mixer_mlp_ratio, cfg.is_moe_block(i, mixer=True), ops)
                for i in range(cfg.mixer_depth)
            )
            proj = lambda a, b: nn.Sequential(layer_norm(a, eps), nn.Linear(a, b, bias=cfg.use_bias)) if a != b else nn.Identity()
            self.patch_mixer_map_xin, self.patch_mixer_map_xout, self.patch_mixer_map_y = proj(dim, md), proj(md, dim), proj(dim, md)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg, dim, qkv, mlp, cfg.is_moe_block(i), ops) for i, (qkv, mlp) in enumerate(cfg.block_ratios())
        )
        self.final_layer = FinalLayer(dim, dim, cfg.patch_channels, eps, ops["norm"])
        if cfg.pixel_head:
            self.pixel_head = PixelHead(cfg.in_channels, cfg.pixel_head, cfg.pixel_head_blocks, dim, cfg.cond_channels)
        self.initialize_weights()

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        y: torch.Tensor,
        y_mask: torch.Tensor | None = None,
        keep_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C + cond_channels, H, W) preconditioned input, then the conditioning image if any; c_noise (B,); y
        (B, L, caption_channels); y_mask (B, L) bool, True = real token; keep_idx (B, K) tokens kept after the mixer
        (None = all). Returns (B, K or N, p²·C)."""
        h, y, c = self.embed(x, c_noise, y, y_mask)
        out = self.final_layer(self.trunk(h, y, y_mask, c, keep_idx), c)  # (B, K, p²·C)
        if self.cfg.pixel_head:
            if keep_idx is not None:
                raise ValueError("a model with a pixel head predicts every token: train it with diffusion.mask_ratio=0")
            rows = x.shape[-2] // self.cfg.patch_size  # the whole grid, or one band of it in patch-parallel sampling
            out = self.patchify(self.pixel_head(self.unpatchify(out, rows), x, c))
        return out

    def embed(self, x: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None):
        """Image tokens (B, N, dim), caption tokens (B, L, dim) and the adaLN condition (B, dim)."""
        dt = self.x_embedder.proj.weight.dtype  # the compute dtype (bf16 under FSDP mixed precision)
        h = (self.x_embedder(x.to(dt)) + self.pos_embed).to(dt)  # (B, N, dim); pos_embed is an fp32 buffer
        y = self.y_embedder.y_proj(y.to(dt))  # (B, L, dim); c_noise stays fp32 for the timestep features
        if self.cfg.caption_refiner:
            y = self.y_emb_preprocess(y, y_mask)
        if not self.cfg.pooled_caption:
            return h, y, self.t_embedder(c_noise)
        pooled = self.pooled_y_emb_process(masked_mean(y, y_mask))  # (B, dim)
        c = pooled if self.cfg.time_free else self.t_embedder(c_noise) + pooled
        return h, y, c

    def trunk(self, h: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None, c: torch.Tensor,
              keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-mixer, deferred masking, backbone: embedded tokens (B, N, dim) -> last hidden tokens (B, K|N, dim)."""
        mixer = self.cfg.mixer_depth > 0
        if mixer:
            h, y_mixer = self.patch_mixer_map_xin(h), self.patch_mixer_map_y(y)  # (B, N, mixer_dim), (B, L, mixer_dim)
            for block in self.patch_mixer:
                h = block(h, y_mixer, y_mask, c)
        if keep_idx is not None:
            h = self.gather_fn(h, keep_idx)  # (B, K, width): deferred masking, after the mixer
        if mixer:
            h = self.patch_mixer_map_xout(h)  # (B, K, dim): projected on kept tokens only
        for block in self.blocks:
            h = block(h, y, y_mask, c)
        return h

    # ---- patches <-> images -------------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p·p·C) in the token order of PatchEmbed."""
        return patchify(x, self.cfg.patch_size)

    def unpatchify(self, tokens: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """(B, N, p·p·C) -> (B, C, H, W); inverse of patchify. rows: token rows of the grid (default: square)."""
        return unpatchify(tokens, self.cfg.patch_size, self.cfg.in_channels, rows)

    # ---- init ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official scheme (xavier everywhere, small normals on embedders, depth-scaled output projections, zero
        modulation gates and final layer). cfg.init='identity' also zeroes the cross-attention output and the
        patch-embedding bias (adaLN-Zero in full: a fresh block is the identity); 'official' draws them as the
        official code does (depth-scaled normal; PyTorch's default conv bias, left as constructed)."""
        identity = self.cfg.init == "identity"
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if identity:
            nn.init.zeros_(self.x_embedder.proj.bias)
        t_mlp = [] if self.cfg.time_free else [self.t_embedder.mlp[0], self.t_embedder.mlp[2]]
        pooled_mlp = [self.pooled_y_emb_process.fc1, self.pooled_y_emb_process.fc2] if self.cfg.pooled_caption else []
        for lin in (*t_mlp, self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2, *pooled_mlp):
            nn.init.normal_(lin.weight, std=0.02)
        depth = self.cfg.depth
        for i, block in enumerate(self.blocks):
            init_block(block, 0.02 / (2 * (i + 1 if self.cfg.depth_init else depth)) ** 0.5, identity)
        for block in self.patch_mixer if self.cfg.mixer_depth > 0 else []:
            init_block(block, 0.02 / (2 * depth) ** 0.5, identity)
        if self.cfg.caption_refiner:
            blk = self.y_emb_preprocess
            trunc(blk.attn.qkv.weight, 0.02)
            trunc(blk.mlp.w1.weight, 0.02)
            trunc(blk.mlp.w2.weight, 0.02)
            nn.init.zeros_(blk.attn.proj.weight)
            nn.init.zeros_(blk.mlp.w3.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.linear.weight)
        if self.cfg.pixel_head:
            self.pixel_head.reset_parameters()

    def block_containers(self) -> list[nn.ModuleList]:
        """The lists of transformer blocks (patch-mixer, then backbone): the unit FSDP shards and compiles."""
        return [self.patch_mixer, self.blocks] if self.cfg.mixer_depth > 0 else [self.blocks]

    # ---- accounting ---------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p·p·C), tokens row-major over the patch grid (PatchEmbed's order)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, q)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, rows: int | None = None) -> torch.Tensor:
    """(B, N, p·p·C) -> (B, C, H, W); inverse of patchify. rows: token rows of the grid (default: square; a band of
    rows for patch-parallel sampling)."""
    B, N, _ = tokens.shape
    h = int(round(N**0.5)) if rows is None else rows
    w = N // h
    x = tokens.reshape(B, h, w, p, p, channels)  # (B, h, w, p, q, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * p, w * p)


def masked_mean(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over caption tokens that are real. y (B, L, D), mask (B, L) -> (B, D)."""
    if mask is None:
        return y.mean(dim=1)
    w = mask.to(y.dtype).unsqueeze(-1)  # (B, L, 1)
    return (y * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)


def trunc(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std)


def init_block(block: DiTBlock, out_std: float, identity: bool) -> None:
    """Input projections ~ N(0, 0.02); output projections depth-scaled; gates zero, and with `identity` the
    cross-attention output too."""
    for norm in (block.norm1, block.norm3, *([block.norm2] if block.cross_attention else [])):
        nn.init.ones_(norm.weight)
    trunc(block.attn.qkv.weight, 0.02)
    trunc(block.attn.proj.weight, out_std)
    if block.cross_attention:
        trunc(block.cross_attn.q_linear.weight, 0.02)
        trunc(block.cross_attn.kv_linear.weight, 0.02)
        if identity:  # zero so the fresh block is the identity (adaLN-Zero spirit)
            nn.init.zeros_(block.cross_attn.proj.weight)
        else:  # the official code: like the other output projections
            trunc(block.cross_attn.proj.weight, out_std)
    mlp = block.mlp
    if isinstance(mlp, ExpertChoiceMoE):
        trunc(mlp.gate.weight, 0.02)
        trunc(mlp.w1, 0.02)
        trunc(mlp.w2, out_std)
    elif isinstance(mlp, SwiGLU):
        trunc(mlp.w1.weight, 0.02)
        trunc(mlp.w2.weight, out_std)
        trunc(mlp.w3.weight, out_std)
    else:  # GELU Mlp (DiT)
        trunc(mlp.fc1.weight, 0.02)
        trunc(mlp.fc2.weight, out_std)
    nn.init.zeros_(block.adaLN_modulation[-1].weight)
    nn.init.zeros_(block.adaLN_modulation[-1].bias)
