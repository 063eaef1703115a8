"""Expert-choice MoE feed-forward layer: parameters here, the routing/dispatch op in tessera_kernels/ (config
`kernels.moe`)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from models.layers import round_up


class ExpertChoiceMoE(nn.Module):
    """E GELU experts of hidden width `hidden`; each takes int(capacity · T / E) tokens of every sample."""

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity: float, multiple_of: int, moe_fn: Callable):
        super().__init__()
        hidden = round_up(hidden, multiple_of)
        self.num_experts, self.capacity, self.moe_fn = num_experts, capacity, moe_fn
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def tokens_per_expert(self, num_tokens: int) -> int:
        """k: static for a fixed token count, so a compiled graph never sees a new shape."""
        return max(1, int(self.capacity * num_tokens / self.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe_fn(x, self.gate.weight, self.w1, self.w2, self.tokens_per_expert(x.shape[1]))
