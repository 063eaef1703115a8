"""Multi-head attention with an optional key padding mask (non-causal).

    q: (B, H, Nq, Dh)   k, v: (B, H, Nk, Dh)
    key_padding_mask: (B, Nk) bool, True = attend to this key; None = all keys valid
    out: (B, H, Nq, Dh)

Known limit: a row whose keys are all padded gives NaN here (the callers never build one: the null caption is a
full-length zero embedding). The fast backends land in their own issue with defined zeros for that case.
"""
import math

import torch
import torch.nn.functional as F


def _bias_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)


def attention_sdpa(q, k, v, key_padding_mask=None):
    """torch scaled_dot_product_attention: picks flash / cuDNN / memory-efficient kernels on GPU."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_bias_mask(key_padding_mask))


def attention_ref(q, k, v, key_padding_mask=None):
    """Plain PyTorch reference: softmax(q kᵀ / sqrt(Dh)) v, computed in float32."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    mask = _bias_mask(key_padding_mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.float()).to(q.dtype)
