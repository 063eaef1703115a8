"""Token gather for deferred masking: keep K of N tokens per sample (config `kernels.gather: torch | triton | cuda`).

    x:    (B, N, D) float16 / bfloat16 / float32 / float64, contiguous (the public functions make it so)
    idx:  (B, K) int64 or int32, values in [0, N)
    out:  (B, K, D) = x[b, idx[b, k], :], x's dtype
    pos:  (N, D) x's dtype  (gather_tokens_pos_* only: out = x[b, idx[b, k]] + pos[idx[b, k]])

Backward scatters the output gradient into zeros of shape (B, N, D).

Backends:
    gather_tokens_ref       plain PyTorch (torch.gather); any idx, duplicates allowed (their gradients add)
    gather_tokens_triton    Triton, custom op `tessera::gather_tokens` (fake + autograd registered: torch.compile
                            traces it with fullgraph=True). See tessera_kernels/gather_cuda.py for the CUDA C++ backend.

Limits and assumptions of the Triton backend:
  * Kept indices of one sample are DISTINCT (the trainer draws them with argsort of noise / randperm). The backward
    is then a pure permutation write: no atomics, deterministic. With duplicates the forward is still right but the
    backward keeps ONE of the duplicate gradients instead of their sum. This is checked in the tests on the
    reference side, never in the hot path (checking would need a host sync).
  * Indices are not range-checked on the device (an index outside [0, N) reads/writes out of bounds), as in
    torch's own CUDA gather without TORCH_USE_CUDA_DSA. The launcher checks shapes, dtypes, devices, contiguity.
  * Offsets are computed in int64: no 2**31-element limit.
  * On CPU it runs only under TRITON_INTERPRET=1 (slow: ~0.4 ms per program); tessera_kernels/__init__.py ranks it below
    `torch` there so `auto` never picks it on CPU.

Backward, two ways (both deterministic, both with the same result):
  * "dense" (default): build the inverse map inv (B, N) int32 (k for a kept token, -1 otherwise) with one torch
    scatter_, then ONE Triton pass writes every row of dx: grad row or zeros. Bytes: B·N·D written + B·K·D read.
  * "store": torch.zeros (a memset) then a Triton scatter-store of the B·K gradient rows.
    Bytes: B·N·D + B·K·D written + B·K·D read, i.e. ~1.2x "dense" at K = N/4, in two launches.
  bench/test_kernels.py times both; `scatter_tokens_triton(..., method=)` selects.

Fused position embedding (gather_tokens_pos_triton): out = x[b, idx] + pos[idx] in one pass. It is wired nowhere:
MicroDiT adds pos_embed before the patch-mixer (all N tokens are needed there), so the gather after the mixer has
nothing to add. It pays where masking happens right after the patch embedding with no mixer (plain DiT or MDT/MaskDiT
-style masking at the input): there it saves one full read+write of (B, N, D) by adding pos to the kept rows only.
Not done (issue 3 asks for it "where that is faster"): fusing this gather into the mixer->backbone projection
(patch_mixer_map_xout). That projection starts with a LayerNorm, so the gather would fuse into the norm's row loads,
not into a GEMM's A loads. What it could save, by byte count at XL 256 px (B=256, K=64, width 768, bf16): the
(B, K, 768) write and re-read, 2 x 25 MB forward and about as much backward, ~35 us at 3 TB/s, against ~0.15 s of
matrix work per micro-batch (282 GFLOP x 256 images at ~500 TFLOP/s): about 0.02%. Not worth a second norm kernel
until a GPU profile says otherwise.

Host syncs: none.
"""
from __future__ import annotations

import types

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference keeps working; the triton backend reports itself unavailable
    triton = types.SimpleNamespace(jit=lambda fn=None, **kw: fn, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=None)


# ---- reference ---------------------------------------------------------------------------------------------------
def gather_tokens_ref(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch reference: out[b, k] = x[b, idx[b, k]]."""
    if x.dim() != 3 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: expected x (B,N,D) and idx (B,K), got {tuple(x.shape)} and {tuple(idx.shape)}")
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)


def gather_tokens_pos_ref(x: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Reference of the fused variant: x[b, idx[b, k]] + pos[idx[b, k]]."""
    return gather_tokens_ref(x, idx) + pos[idx]  # (B, K, D)


# ---- Triton kernel -------------------------------------------------------------------------------------------------
@triton.jit
def copy_rows_kernel(
    src_ptr, dst_ptr, map_ptr, pos_ptr,
    n_rows, D, G, S,
    GATHER: tl.constexpr, ADD_POS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row copy through an index map, BLOCK_M rows per program, D in BLOCK_D chunks.

    For every row r < n_rows of the iteration space, j = map[r] and m = (r // G) * S + j is the mapped row:
      GATHER:     dst[r] = src[m]   (j < 0: dst[r] = 0)         -- gather, dense scatter via an inverse map
      not GATHER: dst[m] = src[r]   (j < 0: nothing is written) -- scatter-store
    ADD_POS (gather only): dst[r] += pos[j], added in ACC (fp32, or fp64 for fp64 data).
    Rows are D elements, contiguous. Shared by tessera_kernels/moe.py (dispatch).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    in_range = rows < n_rows
    j = tl.load(map_ptr + rows, mask=in_range, other=-1).to(tl.int64)
    hit = in_range & (j >= 0)
    mapped = (rows // G) * S + j
    if GATHER:
        src_rows, dst_rows, load_ok, store_ok = mapped, rows, hit, in_range
    else:
        src_rows, dst_rows, load_ok, store_ok = rows, mapped, in_range, hit
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        v = tl.load(src_ptr + src_rows[:, None] * D + cols[None, :], mask=load_ok[:, None] & cmask[None, :], other=0.0)
        if ADD_POS:
            p = tl.load(pos_ptr + j[:, None] * D + cols[None, :], mask=hit[:, None] & cmask[None, :], other=0.0)
            v = (v.to(ACC) + p.to(ACC)).to(dst_ptr.dtype.element_ty)  # one rounding, as torch's add
        tl.store(dst_ptr + dst_rows[:, None] * D + cols[None, :], v, mask=store_ok[:, None] & cmask[None, :])


def row_blocks(n_rows: int, D: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for a row copy over rows of D elements. GPU: tiles of 4K elements over 4 warps
    (32 per thread: four 16-byte accesses in flight for 16-bit data; the 16-byte width comes from Triton's
    divisibility-by-16 specialization of D and the pointers), D in chunks that divide it where possible (768 -> 3 x 256,
    so no masked lanes). Interpreter (CPU): large tiles, since each program costs ~0.4 ms whatever its size."""
    block_d = min(triton.next_power_of_2(max(D, 1)), 1024)
    if D % block_d and D % 256 == 0:
        block_d = 256
    if device.type == "cpu":
        return max(1, min(256, 16384 // block_d)), block_d, 1
    return max(1, 4096 // block_d), block_d, 4


def launch_copy_rows(src, dst, row_map, n_rows, D, G, S, gather, pos=None) -> None:
    """Launch copy_rows_kernel over n_rows rows (no checks: callers check)."""
    if n_rows == 0 or D == 0:
        return
    block_m, block_d, warps = row_blocks(n_rows, D, src.device)
    grid = (triton.cdiv(n_rows, block_m),)
    copy_rows_kernel[grid](
        src, dst, row_map, pos if pos is not None else src, n_rows, D, G, S,
        GATHER=gather, ADD_POS=pos is not None, ACC=tl.float64 if src.dtype == torch.float64 else tl.float32,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )


def interpreted() -> bool:
    """True when the kernels here were built for TRITON_INTERPRET=1 (Triton decides that at import time)."""
    return type(copy_rows_kernel).__name__ == "InterpretedFunction"


def triton_unavailable() -> str | None:
    """Registry check for the `triton` backends of gather, moe and norm: None when their kernels can run here."""
    if isinstance(triton, types.SimpleNamespace):
        return "triton is not installed"
    if torch.cuda.is_available() or interpreted():
        return None
    return "no CUDA device; on CPU Triton kernels run only under TRITON_INTERPRET=1 (set before import; slow: tests)"


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under the interpreter. Otherwise (a CPU model on a CUDA machine,
    where `auto` picks triton) the custom ops run their torch fallback, which computes the same values."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and interpreted())


# ---- launchers -----------------------------------------------------------------------------------------------------
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x: torch.Tensor, idx: torch.Tensor, name: str) -> None:
    if x.dim() != 3 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: expected x (B,N,D) and idx (B,K), got {tuple(x.shape)} and {tuple(idx.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: x must be a float tensor, got {x.dtype}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: idx must be int64 or int32, got {idx.dtype}")
    if x.device != idx.device:
        raise ValueError(f"{name}: x on {x.device} but idx on {idx.device}")
    if not (x.is_contiguous() and idx.is_contiguous()):
        raise ValueError(f"{name}: x and idx must be contiguous")


def gather_tokens_launch(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Triton forward: (B, N, D), (B, K) [, pos (N, D)] -> (B, K, D)."""
    _check(x, idx, "gather_tokens")
    B, N, D = x.shape
    K = idx.shape[1]
    if pos is not None and (pos.shape != (N, D) or pos.dtype != x.dtype or not pos.is_contiguous()
                            or pos.device != x.device):
        raise ValueError(f"gather_tokens_pos: pos must be contiguous ({N}, {D}) {x.dtype} on {x.device}, "
                         f"got {tuple(pos.shape)} {pos.dtype}")
    if not use_triton(x):
        return gather_tokens_ref(x, idx) if pos is None else gather_tokens_pos_ref(x, pos, idx)
    out = torch.empty(B, K, D, dtype=x.dtype, device=x.device)
    launch_copy_rows(x, out, idx, B * K, D, K, N, gather=True, pos=pos)  # out row b*K+k <- x row b*N+idx
    return out


def scatter_tokens_launch(grad: torch.Tensor, idx: torch.Tensor, n: int, method: str = "dense") -> torch.Tensor:
    """Triton backward: grad (B, K, D), idx (B, K) distinct per row -> (B, n, D), zeros where no index points."""
    _check(grad, idx, "gather_tokens_backward")
    B, K, D = grad.shape
    if idx.shape[1] != K:
        raise ValueError(f"gather_tokens_backward: grad has K={K} rows, idx {idx.shape[1]}")
    if not use_triton(grad):
        return grad.new_zeros(B, n, D).scatter_(1, idx.long().unsqueeze(-1).expand(-1, -1, D), grad)
    if method == "dense":
        # inv[b, idx[b, k]] = k; untouched entries stay -1 (a permutation write: deterministic for distinct idx)
        ks = torch.arange(K, dtype=torch.int32, device=idx.device).expand(B, K)
        inv = torch.full((B, n), -1, dtype=torch.int32, device=idx.device).scatter_(1, idx.long(), ks)  # (B, n)
        dx = torch.empty(B, n, D, dtype=grad.dtype, device=grad.device)
        launch_copy_rows(grad, dx, inv, B * n, D, n, K, gather=True)  # dx row b*n+t <- grad row b*K+inv (or 0)
        return dx
    if method == "store":
        dx = torch.zeros(B, n, D, dtype=grad.dtype, device=grad.device)
        launch_copy_rows(grad, dx, idx, B * K, D, K, n, gather=False)  # dx row b*n+idx <- grad row b*K+k
        return dx
    raise ValueError(f"scatter_tokens: method must be 'dense' or 'store', got {method!r}")


# ---- custom ops (torch.compile traces through them) ------------------------------------------------------------------
@torch.library.custom_op("tessera::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return gather_tokens_launch(x, idx)


@_gather_tokens_op.register_fake
def _(x, idx):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("tessera::gather_tokens_backward", mutates_args=())
def _gather_tokens_backward_op(grad: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    return scatter_tokens_launch(grad, idx, n)


@_gather_tokens_backward_op.register_fake
def _(grad, idx, n):
    return grad.new_empty(grad.shape[0], n, grad.shape[2])


def _gather_setup(ctx, inputs, output):
    x, idx = inputs[0], inputs[1]
    ctx.save_for_backward(idx)
    ctx.n = x.shape[1]


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return _gather_tokens_backward_op(grad.contiguous(), idx, ctx.n), None


_gather_tokens_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_gather_tokens_backward_op.register_autograd(  # double backward: the gather of the gradient's gradient
    lambda ctx, gg: (_gather_tokens_op(gg.contiguous(), ctx.idx), None, None),
    setup_context=lambda ctx, inputs, output: setattr(ctx, "idx", inputs[1]),
)


@torch.library.custom_op("tessera::gather_tokens_pos", mutates_args=())
def _gather_tokens_pos_op(x: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return gather_tokens_launch(x, idx, pos)


@_gather_tokens_pos_op.register_fake
def _(x, pos, idx):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


def _gather_pos_setup(ctx, inputs, output):
    x, pos, idx = inputs
    ctx.save_for_backward(idx)
    ctx.n = x.shape[1]


def _gather_pos_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    dx = _gather_tokens_backward_op(grad.contiguous(), idx, ctx.n)  # (B, N, D)
    dpos = dx.sum(0) if ctx.needs_input_grad[1] else None  # (N, D): a fixed-order reduction, no atomics
    return dx, dpos, None


_gather_tokens_pos_op.register_autograd(_gather_pos_backward, setup_context=_gather_pos_setup)


# ---- public backend functions ----------------------------------------------------------------------------------------
def gather_tokens_triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`kernels.gather: triton`: out[b, k] = x[b, idx[b, k]] (indices distinct per sample, see header)."""
    return _gather_tokens_op(x.contiguous(), idx.contiguous())


def gather_tokens_pos_triton(x: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Fused x[b, idx] + pos[idx] (wired nowhere; see header for where it would pay)."""
    return _gather_tokens_pos_op(x.contiguous(), pos.to(x.dtype).contiguous(), idx.contiguous())


def scatter_tokens_triton(grad: torch.Tensor, idx: torch.Tensor, n: int, method: str = "dense") -> torch.Tensor:
    """The backward alone (for benchmarks): grad (B, K, D) -> (B, n, D)."""
    return scatter_tokens_launch(grad.contiguous(), idx.contiguous(), n, method)
