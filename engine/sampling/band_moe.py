"""Expert-choice MoE when each process holds one band of a sample's tokens (patch-parallel sampling).

Expert choice routes by top-k over ALL of a sample's T tokens per expert (tessera_kernels/moe.py), which a band alone
cannot
do. With `sync` routing every process gathers the router probabilities of all bands at the layer (B·T·E floats) and
takes the same top-k as one process would: exact. With `displaced` routing the other bands' probabilities come from
the previous evaluation (sent with the keys/values), so processes may disagree on a few winners. `local` routing
needs no wrapper: the layer's own op on the band takes the top tokens_per_expert(T / N) of the band's tokens.

The band's winners of an expert are ragged (0..k of its tokens), so the experts run as one GEMM pair each on the
rows they chose, instead of the fixed-k batched op.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.sampling.exchange import Exchange
from tessera_kernels.moe import router_probs
from models.moe import ExpertChoiceMoE


class BandExpertChoice(nn.Module):
    """Wraps a built ExpertChoiceMoE: the band's tokens go through the experts that chose them by image-wide top-k."""

    def __init__(self, inner: ExpertChoiceMoE, exchange: Exchange, key: str, routing: str, first_token: int):
        super().__init__()
        self.inner, self.exchange, self.key, self.routing, self.first = inner, exchange, key, routing, first_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = router_probs(x, self.inner.gate.weight)  # (B, n, E) for this band's n tokens
        if self.routing == "sync":
            probs = self.exchange.gather_now(probs, dim=1)  # (B, T, E)
        else:
            probs = self.exchange.all_bands(self.key, probs)  # (B, T, E); other bands possibly stale
        k = self.inner.tokens_per_expert(probs.shape[1])
        gate, token = torch.topk(probs.transpose(1, 2), k, dim=-1)  # (B, E, k) each
        return band_experts(x, gate, token, self.first, self.inner.w1, self.inner.w2)


def band_experts(x: torch.Tensor, gate: torch.Tensor, token: torch.Tensor, first: int, w1: torch.Tensor,
                 w2: torch.Tensor) -> torch.Tensor:
    """out (B, n, D) of the band x (B, n, D) whose first token is image token `first`: the sum of gate·GELU(x w1) w2
    over the (expert, slot) pairs of gate/token (B, E, k) that picked one of the band's tokens (the reference op's
    arithmetic, tessera_kernels/moe.py expert_choice_ref, restricted to the band)."""
    B, n, D = x.shape
    E = w1.shape[0]
    mine = (token >= first) & (token < first + n)  # (B, E, k)
    b, e, j = mine.nonzero(as_tuple=True)  # NOTE: host sync (how many of the winners are this band's is ragged)
    order = torch.argsort(e, stable=True)  # group the slots by expert
    b, e, j = b[order], e[order], j[order]
    rows = b * n + token[b, e, j] - first  # (S,) row of each chosen token in x viewed as (B·n, D)
    xin = x.reshape(B * n, D)[rows]  # (S, D)
    counts = torch.bincount(e, minlength=E).tolist()  # NOTE: host sync
    h = torch.cat([F.gelu(xe @ w1[i]) @ w2[i] for i, xe in enumerate(xin.split(counts))])  # (S, D)
    h = h * gate[b, e, j].unsqueeze(-1).to(h.dtype)
    return torch.zeros(B * n, D, dtype=x.dtype, device=x.device).index_add_(0, rows, h).view(B, n, D)
