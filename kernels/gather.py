"""Token gather for deferred masking: keep K of N tokens per sample.

    x:   (B, N, D) any float dtype
    idx: (B, K) int64, values in [0, N); rows need not be sorted; duplicates are allowed (their grads add)
    out: (B, K, D) = x[b, idx[b, k], :]

Backward scatters the output gradient into zeros of shape (B, N, D) (autograd of torch.gather does exactly that).
Only the `torch` reference lives here for now; fast backends share this signature.
"""
import torch


def gather_tokens_ref(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch reference: out[b, k] = x[b, idx[b, k]]."""
    if x.dim() != 3 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: expected x (B,N,D) and idx (B,K), got {tuple(x.shape)} and {tuple(idx.shape)}")
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
