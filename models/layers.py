"""Building blocks of MicroDiT: attention, MLPs, embedders and the output layer.

Parameter names follow the official MicroDiT implementation so its checkpoints convert with a key map
(engine/convert.py). Attention itself is an op from tessera_kernels/ picked by config.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    """MicroDiT's LayerNorm: elementwise scale, no bias."""
    return nn.LayerNorm(dim, eps=eps, bias=False)


def round_up(n: int, multiple: int) -> int:
    return multiple * ((n + multiple - 1) // multiple)


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional QK-norm over the full query/key width (as the official code)."""

    def __init__(self, dim: int, hidden: int, head_dim: int, qk_norm: bool, bias: bool, eps: float, attn_fn: Callable):
        super().__init__()
        self.heads, self.head_dim, self.qk_norm, self.eps, self.attn_fn = hidden // head_dim, head_dim, qk_norm, eps, attn_fn
        self.qkv = nn.Linear(dim, 3 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, hidden) each
        return self.proj(attend(self, q, k, v, key_padding_mask))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; caption padding is masked out."""

    def __init__(self, dim: int, hidden: int, head_dim: int, qk_norm: bool, bias: bool, eps: float, attn_fn: Callable):
        super().__init__()
        self.heads, self.head_dim, self.qk_norm, self.eps, self.attn_fn = hidden // head_dim, head_dim, qk_norm, eps, attn_fn
        self.q_linear = nn.Linear(dim, hidden, bias=bias)
        self.kv_linear = nn.Linear(dim, 2 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        k, v = self.kv_linear(y).chunk(2, dim=-1)  # (B, L, hidden) each
        return self.proj(attend(self, self.q_linear(x), k, v, y_mask))


def attend(m: SelfAttention | CrossAttention, q, k, v, key_padding_mask) -> torch.Tensor:
    """QK-norm, split heads, attention op, merge heads. q (B, N, hidden), k/v (B, L, hidden) -> (B, N, hidden)."""
    if m.qk_norm:
        q = F.layer_norm(q, (q.shape[-1],), eps=m.eps)
        k = F.layer_norm(k, (k.shape[-1],), eps=m.eps)
    B, N, hidden = q.shape
    split = lambda t: t.view(B, t.shape[1], m.heads, m.head_dim).transpose(1, 2)  # (B, heads, len, head_dim)
    out = m.attn_fn(split(q), split(k), split(v), key_padding_mask)  # (B, heads, N, head_dim)
    return out.transpose(1, 2).reshape(B, N, hidden)


class SwiGLU(nn.Module):
    """Dense MLP of MicroDiT: w3(silu(w1 x) * w2 x); hidden = 2/3 of the nominal width, rounded up."""

    def __init__(self, dim: int, hidden: int, multiple_of: int, bias: bool):
        super().__init__()
        hidden = round_up(int(2 * hidden / 3), multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> optional LayerNorm -> fc2 (DiT's MLP, and MicroDiT's caption projections)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, bias: bool = True, norm_eps: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden, bias=bias)
        self.act = nn.GELU(approximate="tanh")
        self.norm = layer_norm(hidden, norm_eps) if norm_eps is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class CaptionBlock(nn.Module):
    """Pre-norm transformer block over caption tokens (MicroDiT's y_emb_preprocess)."""

    def __init__(self, dim: int, head_dim: int, multiple_of: int, bias: bool, eps: float, attn_fn: Callable):
        super().__init__()
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, dim, head_dim, True, bias, eps, attn_fn)
        self.norm2 = layer_norm(dim, eps)
        self.mlp = SwiGLU(dim, 4 * dim, multiple_of, bias)

    def forward(self, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        y = y + self.attn(self.norm1(y), y_mask)
        return y + self.mlp(self.norm2(y))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (EDM c_noise) time value, then a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from width to patch values."""

    def __init__(self, dim: int, cond_dim: int, patch_channels: int, eps: float, norm_fn: Callable):
        super().__init__()
        self.norm_fn, self.eps = norm_fn, eps
        self.norm_final = layer_norm(dim, eps)
        self.linear = nn.Linear(dim, patch_channels)
        self.adaLN_modulation = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, dim) each
        return self.linear(self.norm_fn(x, self.norm_final.weight, shift, scale, self.eps))


def sincos_pos_embed_2d(dim: int, grid: int, interp_scale: float = 1.0, base_size: int | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid², dim). Positions are scaled so that a larger grid with
    interp_scale = grid / base grid spans the same range as the base grid (how 512 px reuses a 256 px model)."""
    if dim % 4:
        raise ValueError(f"position embedding width {dim} must be a multiple of 4")
    base_size = base_size or grid
    pos = np.arange(grid, dtype=np.float64) / (grid / base_size) / interp_scale
    ww, hh = np.meshgrid(pos, pos)  # (grid, grid), row-major over (h, w)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # (dim/4,)

    def embed_1d(p: np.ndarray) -> np.ndarray:
        out = np.outer(p.reshape(-1), omega)  # (grid², dim/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # The first half encodes the w coordinate, the second the h coordinate (the official layout).
    return torch.from_numpy(np.concatenate([embed_1d(ww), embed_1d(hh)], axis=1)).float()
