"""Expert-choice mixture of experts (Zhou et al. 2022): every expert picks its top-k tokens.

    x:             (B, T, D)  routing is per sample, over its T tokens
    router_weight: (E, D)     router logits = x @ router_weightᵀ, softmax over experts
    w1:            (E, D, F)  expert up-projections
    w2:            (E, F, D)  expert down-projections
    k:             tokens per expert, int(capacity * T / E), fixed per phase so shapes are static
    out:           (B, T, D)  sum over (expert, slot) of gate * GELU(x w1) w2, added back to the chosen token

Dispatch is a gather into (E, B*k, D), the experts are one batched GEMM per matrix, combine is a scatter-add.
A token no expert chose gets zeros; a token several experts chose sums their gate-weighted outputs.
"""
import torch
import torch.nn.functional as F


def expert_choice_ref(
    x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, k: int
) -> torch.Tensor:
    """Plain PyTorch reference: gather -> bmm -> GELU -> bmm -> gate -> scatter-add."""
    B, T, D = x.shape
    E = router_weight.shape[0]
    if not 1 <= k <= T:
        raise ValueError(f"expert_choice: tokens per expert k={k} must be in [1, T={T}]")
    logits = F.linear(x, router_weight)  # (B, T, E)
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # at least fp32 routing
    gate, token = torch.topk(probs.transpose(1, 2), k, dim=-1)  # (B, E, k) each
    token = token.reshape(B, E * k)  # (B, E*k)
    xin = torch.gather(x, 1, token.unsqueeze(-1).expand(-1, -1, D))  # (B, E*k, D)
    xin = xin.view(B, E, k, D).transpose(0, 1).reshape(E, B * k, D)  # (E, B*k, D)
    h = F.gelu(torch.bmm(xin, w1))  # (E, B*k, F)
    h = torch.bmm(h, w2)  # (E, B*k, D)
    h = h.view(E, B, k, D).transpose(0, 1) * gate.unsqueeze(-1).to(h.dtype)  # (B, E, k, D)
    out = torch.zeros_like(x)
    return out.scatter_add(1, token.unsqueeze(-1).expand(-1, -1, D), h.reshape(B, E * k, D))  # (B, T, D)
