"""`kernels.gather: cuda`: the CUDA C++ gather/scatter of csrc/ (extension module `tessera_csrc`).

    x:   (B, N, D) any dtype, CUDA, contiguous (made so here)
    idx: (B, K) int64 or int32, values in [0, N), DISTINCT per sample (the backward is a plain scatter-store)
    out: (B, K, D) = x[b, idx[b, k]]; backward: zeros (B, N, D) with dx[b, idx[b, k]] = grad[b, k]

setup.py builds `tessera_csrc` only where CUDA and nvcc are present at install time; elsewhere this backend reports
"extension not built" and the registry refuses `kernels.gather: cuda` with that reason. The C++ ops are
torch.ops.tessera_csrc.gather_tokens_forward / gather_tokens_backward (TORCH_LIBRARY); fake (meta) and autograd
registrations are added here so torch.compile(fullgraph=True) traces them. Host syncs: none.
"""
from __future__ import annotations

import torch

try:
    import tessera_csrc  # noqa: F401  (loading it registers torch.ops.tessera_csrc.*)

    _IMPORT_ERROR: Exception | None = None
except (ImportError, OSError) as e:  # not built, or built against another torch / CUDA
    _IMPORT_ERROR = e


def cuda_unavailable() -> str | None:
    """None when the extension is importable and a CUDA device is present; else the reason."""
    if _IMPORT_ERROR is not None:
        if isinstance(_IMPORT_ERROR, ModuleNotFoundError):
            return "extension not built (needs CUDA + nvcc at install time)"
        return f"extension tessera_csrc does not load: {_IMPORT_ERROR}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


if _IMPORT_ERROR is None:
    _fwd = torch.ops.tessera_csrc.gather_tokens_forward
    _bwd = torch.ops.tessera_csrc.gather_tokens_backward

    @torch.library.register_fake("tessera_csrc::gather_tokens_forward")
    def _(x, idx):
        return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])

    @torch.library.register_fake("tessera_csrc::gather_tokens_backward")
    def _(grad, idx, n):
        return grad.new_empty(grad.shape[0], n, grad.shape[2])

    def _setup(ctx, inputs, output):
        x, idx = inputs
        ctx.save_for_backward(idx)
        ctx.n = x.shape[1]

    def _backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return _bwd(grad.contiguous(), idx, ctx.n), None

    torch.library.register_autograd("tessera_csrc::gather_tokens_forward", _backward, setup_context=_setup)


def gather_tokens_cuda(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[b, k] = x[b, idx[b, k]] through the CUDA C++ kernel (indices distinct per sample)."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"kernels.gather: backend 'cuda' is not usable here ({cuda_unavailable()})")
    return _fwd(x.contiguous(), idx.contiguous())


def scatter_tokens_cuda(grad: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """The backward alone (for benchmarks): grad (B, K, D) -> zeros (B, n, D) with the K rows stored."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"kernels.gather: backend 'cuda' is not usable here ({cuda_unavailable()})")
    return _bwd(grad.contiguous(), idx.contiguous(), n)
