"""One MicroDiT block: adaLN-modulated self-attention, cross-attention to the caption, and a dense or MoE MLP."""
from __future__ import annotations

import torch
import torch.nn as nn

from models.config import ModelConfig
from models.layers import CrossAttention, Mlp, SelfAttention, SwiGLU, layer_norm, round_up
from models.moe import ExpertChoiceMoE


class DiTBlock(nn.Module):
    """x + gate·attn(mod(LN x)); x + xattn(LN x, caption); x + gate·mlp(mod(LN x)). Gates and the cross-attention
    output start at zero (adaLN-Zero), so a fresh block is the identity."""

    def __init__(self, cfg: ModelConfig, dim: int, qkv_ratio: float, mlp_ratio: float, moe: bool, ops: dict):
        super().__init__()
        eps, bias, hd = cfg.norm_eps, cfg.use_bias, cfg.head_dim
        # Layer-wise scaling: the attention width is rounded to a multiple of two heads (as the official code).
        qkv_hidden = dim if qkv_ratio == 1 else round_up(int(dim * qkv_ratio), 2 * hd)
        self.norm_fn, self.residual_norm_fn, self.eps = ops["norm"], ops["residual_norm"], eps
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, qkv_hidden, hd, cfg.qk_norm, bias, eps, ops["attention"])
        self.cross_attention = cfg.cross_attention
        if cfg.cross_attention:
            self.cross_attn = CrossAttention(dim, dim, hd, cfg.qk_norm, bias, eps, ops["attention"])
            self.norm2 = layer_norm(dim, eps)
        self.norm3 = layer_norm(dim, eps)
        hidden = int(dim * mlp_ratio)
        if moe:
            self.mlp = ExpertChoiceMoE(dim, hidden, cfg.num_experts, cfg.expert_capacity, cfg.multiple_of, ops["moe"])
        elif cfg.mlp == "swiglu":
            self.mlp = SwiGLU(dim, hidden, cfg.multiple_of, bias)
        else:
            self.mlp = Mlp(dim, hidden, dim, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, 6 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift3, scale3, gate3 = self.adaLN_modulation(c).chunk(6, dim=-1)  # (B, dim) each
        branch, gate = self.attn(self.norm_fn(x, self.norm1.weight, shift1, scale1, self.eps)), gate1
        # Each residual add is fused with the norm that reads its result: (x + gate·branch, norm(x + gate·branch)).
        if self.cross_attention:
            x, h = self.residual_norm_fn(x, branch, gate, self.norm2.weight, None, None, self.eps)
            branch, gate = self.cross_attn(h, y, y_mask), None
        x, h = self.residual_norm_fn(x, branch, gate, self.norm3.weight, shift3, scale3, self.eps)
        return x + gate3.unsqueeze(1) * self.mlp(h)
