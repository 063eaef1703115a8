"""LayerNorm followed by adaLN modulation: LN(x) * (1 + scale) + shift, with per-sample scale and shift.

    x:      (B, N, D)
    weight: (D,) or None   LayerNorm's elementwise scale (MicroDiT's norms have no bias)
    shift:  (B, D)
    scale:  (B, D)
    out:    (B, N, D)
"""
import torch
import torch.nn.functional as F


def layernorm_modulate_ref(
    x: torch.Tensor, weight: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """Plain PyTorch reference."""
    h = F.layer_norm(x, (x.shape[-1],), weight, None, eps)
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
