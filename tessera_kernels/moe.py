"""Expert-choice mixture of experts (Zhou et al. 2022): every expert picks its top-k tokens
(config `kernels.moe: torch | triton | megablocks`).

    x:             (B, T, D)  float16 / bfloat16 / float32 / float64; routing is per sample, over its T tokens
    router_weight: (E, D)     router logits = x @ router_weightᵀ, softmax over experts (in at least fp32)
    w1:            (E, D, F)  expert up-projections
    w2:            (E, F, D)  expert down-projections
    k:             tokens per expert, int(capacity * T / E), 1 <= k <= T, fixed per phase so shapes are static
    out:           (B, T, D)  sum over (expert, slot) of gate * GELU(x w1) w2, added back to the chosen token

Dispatch is a gather into (E, B*k, D), the experts are one batched GEMM per matrix, combine is a scatter-add.
A token no expert chose gets zeros; a token several experts chose sums their gate-weighted outputs.

Backends:
    expert_choice_ref        plain PyTorch: gather -> bmm -> GELU -> bmm -> gate -> scatter_add (atomics on GPU)
    expert_choice_triton     the same math; Triton dispatch and combine, deterministic:
        routing   torch: logits, softmax over experts, topk over tokens per expert (B, E, k). Same ops as the
                  reference, so both pick the same tokens bit for bit.
        plan      torch, no host sync: dest (E·B·k,) = global token row of every expert slot (slot r = e·B·k+b·k+j);
                  the inverse map as a CSR: entries = stable argsort(dest) (slots grouped by token, ascending
                  expert inside a token), offsets (B·T+1,) = searchsorted(dest[entries], 0..B·T).
        dispatch  Triton gather of the chosen rows into (E, B·k, D) (kernels.gather's row kernel). No gate here:
                  the gate multiplies the expert OUTPUT (a nonlinear expert makes the two differ).
        experts   torch.bmm, twice, with GELU between: every expert has exactly B·k rows, so this is one dense
                  batched GEMM per matrix that cuBLAS runs near peak (~800 TFLOP/s bf16 measured for large GEMMs on
                  these H100s); a Triton grouped GEMM only pays for ragged groups, which expert choice never has.
                  Replacing it needs a GPU measurement first.
        combine   Triton: each token sums gate·y over its own CSR entries in a fixed order, in fp32 (fp64 for fp64).
                  No atomics: deterministic, two runs are bit-identical.
        backward  combine: dy[r] = gate[r]·dout[dest[r]] and dgate[r] = <dout[dest[r]], y[r]> in one Triton pass
                  over slots; dispatch: dx[t] = Σ dxin over t's CSR entries (the combine kernel, no gate). The router
                  gradient flows from dgate through topk/softmax/linear by torch autograd.
    megablocks               not usable: megablocks offers token-choice dMoE (each token picks its top-k experts), not
                             expert choice; its available() says why (not installed / no CUDA / wrong routing).

Custom ops (fake + autograd registered; torch.compile traces with fullgraph=True): tessera::moe_dispatch,
tessera::moe_combine, tessera::moe_combine_backward. Limits: each expert picks k DISTINCT tokens per sample
(true of topk), so a token has at most E entries. Offsets are int64.
Host syncs: none.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from tessera_kernels.gather import launch_copy_rows, row_blocks, use_triton
from tessera_kernels.gather import triton_unavailable  # noqa: F401  (the registry's check for `kernels.moe: triton`)

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference keeps working; the triton backend reports itself unavailable
    import types

    triton = types.SimpleNamespace(jit=lambda fn=None, **kw: fn, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=None)


# ---- routing (shared by every backend, so they choose the same tokens) ----------------------------------------------
def router_probs(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """(B, T, E) router probabilities, softmax over experts in at least fp32."""
    logits = F.linear(x, router_weight)  # (B, T, E)
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)


def route(x: torch.Tensor, router_weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate (B, E, k) in at least fp32, token (B, E, k) int64: each expert's top-k tokens by router probability."""
    T = x.shape[1]
    if not 1 <= k <= T:
        raise ValueError(f"expert_choice: tokens per expert k={k} must be in [1, T={T}]")
    return torch.topk(router_probs(x, router_weight).transpose(1, 2), k, dim=-1)  # (B, E, k) each


# ---- reference ---------------------------------------------------------------------------------------------------
def expert_choice_ref(
    x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, k: int
) -> torch.Tensor:
    """Plain PyTorch reference: gather -> bmm -> GELU -> bmm -> gate -> scatter-add."""
    B, T, D = x.shape
    E = router_weight.shape[0]
    gate, token = route(x, router_weight, k)  # (B, E, k) each
    token = token.reshape(B, E * k)  # (B, E*k)
    xin = torch.gather(x, 1, token.unsqueeze(-1).expand(-1, -1, D))  # (B, E*k, D)
    xin = xin.view(B, E, k, D).transpose(0, 1).reshape(E, B * k, D)  # (E, B*k, D)
    h = F.gelu(torch.bmm(xin, w1))  # (E, B*k, F)
    h = torch.bmm(h, w2)  # (E, B*k, D)
    h = h.view(E, B, k, D).transpose(0, 1) * gate.unsqueeze(-1).to(h.dtype)  # (B, E, k, D)
    out = torch.zeros_like(x)
    return out.scatter_add(1, token.unsqueeze(-1).expand(-1, -1, D), h.reshape(B, E * k, D))  # (B, T, D)


# ---- Triton kernels ------------------------------------------------------------------------------------------------
@triton.jit
def _combine_kernel(
    y_ptr, gate_ptr, off_ptr, ent_ptr, out_ptr, n_rows, D, E,
    HAS_GATE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t] = Σ_{i < cnt[t]} gate[s_i]·y[s_i], s_i = entries[offsets[t] + i], in the order of i (fixed).
    BLOCK_M tokens per program; a token has at most E entries. Per-token values are kept as (BLOCK_M, 1) columns of
    the tile's layout: as 1-D vectors, Triton's layout pass on sm_90 failed to compile this kernel at small widths."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # (BLOCK_M, 1)
    rmask = rows < n_rows
    start = tl.load(off_ptr + rows, mask=rmask, other=0)
    cnt = tl.load(off_ptr + rows + 1, mask=rmask, other=0) - start
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
        cmask = cols < D
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        for i in range(0, E):
            m = rmask & (i < cnt)
            slot = tl.load(ent_ptr + start + i, mask=m, other=0).to(tl.int64)
            v = tl.load(y_ptr + slot * D + cols, mask=m & cmask, other=0.0)
            if HAS_GATE:
                g = tl.load(gate_ptr + slot, mask=m, other=0.0).to(ACC)
                acc += v.to(ACC) * g
            else:
                acc += v.to(ACC)
        tl.store(out_ptr + rows * D + cols, acc.to(out_ptr.dtype.element_ty), mask=rmask & cmask)


@triton.jit
def _combine_bwd_kernel(
    dout_ptr, y_ptr, gate_ptr, dest_ptr, dy_ptr, dgate_ptr, n_slots, D,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per expert slot r: dy[r] = gate[r]·dout[dest[r]], dgate[r] = <dout[dest[r]], y[r]>; BLOCK_M slots a program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_slots
    t = tl.load(dest_ptr + rows, mask=rmask, other=0).to(tl.int64)
    g = tl.load(gate_ptr + rows, mask=rmask, other=0.0).to(ACC)
    dot = tl.zeros([BLOCK_M], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        do = tl.load(dout_ptr + t[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        yv = tl.load(y_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(dy_ptr + rows[:, None] * D + cols[None, :], (do * g[:, None]).to(dy_ptr.dtype.element_ty), mask=mask)
        dot += tl.sum(do * yv, axis=1)
    tl.store(dgate_ptr + rows, dot.to(dgate_ptr.dtype.element_ty), mask=rmask)


def _blocks(D: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of the combine kernels: as kernels.gather.row_blocks (4K-element tiles)."""
    return row_blocks(0, D, device)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---- launchers (checks) ----------------------------------------------------------------------------------------------
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_plan(dest, offsets, entries, n_tokens, device, name):
    for t, nm in ((dest, "dest"), (offsets, "offsets"), (entries, "entries")):
        if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32) or not t.is_contiguous() or t.device != device:
            raise ValueError(f"{name}: {nm} must be a contiguous 1-D int tensor on {device}")
    if offsets.numel() != n_tokens + 1 or entries.numel() != dest.numel():
        raise ValueError(f"{name}: offsets must have {n_tokens + 1} entries and entries {dest.numel()}")


def dispatch_launch(x, dest, offsets, entries, num_experts: int) -> torch.Tensor:
    """x (B, T, D) -> xin (E, B·k, D), xin[r] = x_rows[dest[r]]."""
    B, T, D = x.shape
    _check_plan(dest, offsets, entries, B * T, x.device, "moe_dispatch")
    if x.dtype not in _FLOATS or not x.is_contiguous() or dest.numel() % max(num_experts, 1):
        raise ValueError("moe_dispatch: x must be a contiguous float tensor and dest a multiple of E long")
    xin = torch.empty(num_experts, dest.numel() // num_experts, D, dtype=x.dtype, device=x.device)
    if not use_triton(x):
        return xin.copy_(x.reshape(B * T, D)[dest].view_as(xin))
    launch_copy_rows(x, xin, dest, dest.numel(), D, 1, 0, gather=True)  # G=1, S=0: mapped row = dest[r]
    return xin


def combine_launch(y, gate, offsets, entries, B: int, T: int) -> torch.Tensor:
    """y (E, B·k, D), gate (E, B·k) or None -> out (B, T, D), out[t] = Σ_entries gate·y, fp32 accumulation."""
    E, BK, D = y.shape
    if y.dtype not in _FLOATS or not y.is_contiguous():
        raise ValueError("moe_combine: y must be a contiguous float tensor (E, B*k, D)")
    if gate is not None and (gate.shape != (E, BK) or not gate.is_contiguous() or gate.device != y.device):
        raise ValueError(f"moe_combine: gate must be contiguous ({E}, {BK}), got {tuple(gate.shape)}")
    _check_plan(entries, offsets, entries, B * T, y.device, "moe_combine")
    out = torch.empty(B, T, D, dtype=y.dtype, device=y.device)
    if not use_triton(y):
        src = y.reshape(E * BK, D).float() if y.dtype != torch.float64 else y.reshape(E * BK, D)
        if gate is not None:
            src = src * gate.reshape(-1, 1).to(src.dtype)
        counts = offsets[1:] - offsets[:-1]
        token_of_entry = torch.repeat_interleave(torch.arange(B * T, device=y.device), counts,
                                                 output_size=E * BK)  # (E·B·k,) sorted by token
        acc = torch.zeros(B * T, D, dtype=src.dtype, device=y.device).index_add_(0, token_of_entry, src[entries])
        return out.copy_(acc.view(B, T, D))
    if out.numel() > 0:
        block_m, block_d, warps = _blocks(D, y.device)
        _combine_kernel[(triton.cdiv(B * T, block_m),)](
            y, gate if gate is not None else y, offsets, entries, out, B * T, D, E,
            HAS_GATE=gate is not None, ACC=_acc(y.dtype), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
        )
    return out


def combine_backward_launch(dout, y, gate, dest) -> tuple[torch.Tensor, torch.Tensor]:
    """dout (B, T, D), y (E, B·k, D), gate (E, B·k), dest (E·B·k,) -> dy (E, B·k, D) in y's dtype and
    dgate (E, B·k) in gate's dtype."""
    E, BK, D = y.shape
    if dout.shape[-1] != D or not dout.is_contiguous() or not y.is_contiguous() or not gate.is_contiguous():
        raise ValueError("moe_combine_backward: contiguous dout (B, T, D), y (E, B*k, D) and gate (E, B*k) expected")
    dy = torch.empty_like(y)
    dgate = torch.empty_like(gate)
    if not use_triton(y):
        do = dout.reshape(-1, D)[dest].view(E, BK, D)
        dy.copy_(do * gate.unsqueeze(-1).to(do.dtype))
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        dgate.copy_((do.to(acc) * y.to(acc)).sum(-1))
        return dy, dgate
    if y.numel() > 0:
        block_m, block_d, warps = _blocks(D, y.device)
        _combine_bwd_kernel[(triton.cdiv(E * BK, block_m),)](
            dout, y, gate, dest, dy, dgate, E * BK, D,
            ACC=_acc(y.dtype), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
        )
    return dy, dgate


# ---- custom ops ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("tessera::moe_dispatch", mutates_args=())
def _dispatch_op(x: torch.Tensor, dest: torch.Tensor, offsets: torch.Tensor, entries: torch.Tensor,
                 num_experts: int) -> torch.Tensor:
    return dispatch_launch(x, dest, offsets, entries, num_experts)


@_dispatch_op.register_fake
def _(x, dest, offsets, entries, num_experts):
    return x.new_empty(num_experts, dest.shape[0] // num_experts, x.shape[2])


@torch.library.custom_op("tessera::moe_combine", mutates_args=())
def _combine_op(y: torch.Tensor, gate: torch.Tensor | None, dest: torch.Tensor, offsets: torch.Tensor,
                entries: torch.Tensor, B: int, T: int) -> torch.Tensor:
    return combine_launch(y, gate, offsets, entries, B, T)


@_combine_op.register_fake
def _(y, gate, dest, offsets, entries, B, T):
    return y.new_empty(B, T, y.shape[2])


@torch.library.custom_op("tessera::moe_combine_backward", mutates_args=())
def _combine_backward_op(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, dest: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    return combine_backward_launch(dout, y, gate, dest)


@_combine_backward_op.register_fake
def _(dout, y, gate, dest):
    return torch.empty_like(y), torch.empty_like(gate)


def _dispatch_setup(ctx, inputs, output):
    x, dest, offsets, entries, _ = inputs
    ctx.save_for_backward(dest, offsets, entries)
    ctx.BT = x.shape[:2]


def _dispatch_backward(ctx, dxin):
    dest, offsets, entries = ctx.saved_tensors
    dx = _combine_op(dxin.contiguous(), None, dest, offsets, entries, *ctx.BT)  # each token sums its own rows
    return dx, None, None, None, None


def _combine_setup(ctx, inputs, output):
    y, gate, dest, offsets, entries, B, T = inputs
    ctx.save_for_backward(y, gate, dest, offsets, entries)


def _combine_backward(ctx, dout):
    y, gate, dest, offsets, entries = ctx.saved_tensors
    if gate is None:  # a plain sum (dispatch's backward): each slot's gradient is its token's gradient row
        dy = _dispatch_op(dout.contiguous(), dest, offsets, entries, y.shape[0])
        return dy, None, None, None, None, None, None
    dy, dgate = _combine_backward_op(dout.contiguous(), y, gate, dest)
    return dy, dgate, None, None, None, None, None


_dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)
_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


# ---- public backend ----------------------------------------------------------------------------------------------
def combine_plan(token: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token (B, E, k) -> dest (E·B·k,), offsets (B·T+1,), entries (E·B·k,), int64, on token's device; torch ops
    only (stable sort + searchsorted), no host sync. Slot r = e·B·k + b·k + j holds token b·T + token[b, e, j]."""
    B, E, k = token.shape
    base = torch.arange(B, device=token.device).view(B, 1, 1) * T  # (B, 1, 1)
    dest = (token + base).transpose(0, 1).reshape(E * B * k)  # (E·B·k,)
    sorted_dest, entries = torch.sort(dest, stable=True)  # slots grouped by token, ascending slot (= expert) inside
    offsets = torch.searchsorted(sorted_dest, torch.arange(B * T + 1, device=token.device))  # (B·T+1,)
    return dest, offsets, entries


def expert_choice_triton(
    x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, k: int
) -> torch.Tensor:
    """`kernels.moe: triton`: same function as expert_choice_ref, Triton dispatch/combine (deterministic)."""
    B, T, D = x.shape
    E = router_weight.shape[0]
    gate, token = route(x, router_weight, k)  # (B, E, k) each
    dest, offsets, entries = combine_plan(token, T)
    xin = _dispatch_op(x.contiguous(), dest, offsets, entries, E)  # (E, B·k, D)
    h = F.gelu(torch.bmm(xin, w1))  # (E, B·k, F)
    y = torch.bmm(h, w2)  # (E, B·k, D)
    g = gate.transpose(0, 1).reshape(E, B * k)  # (E, B·k) in slot order, fp32
    return _combine_op(y.contiguous(), g.contiguous(), dest, offsets, entries, B, T)  # (B, T, D)


# ---- megablocks ----------------------------------------------------------------------------------------------------
def megablocks_unavailable() -> str | None:
    """Why `kernels.moe: megablocks` cannot run. megablocks offers token-choice dMoE (each token picks its top-k
    experts, dropless), not expert choice, so even where it is installed on a GPU it does not compute this op."""
    if importlib.util.find_spec("megablocks") is None:
        return "megablocks is not installed (extra `gpu`; it builds only with CUDA)"
    if not torch.cuda.is_available():
        return "megablocks needs a CUDA device"
    return ("megablocks implements token-choice dMoE only; MicroDiT's MoE is expert choice (each expert picks its "
            "top-k tokens), which megablocks does not offer")


def expert_choice_megablocks(x, router_weight, w1, w2, k):  # never resolved: megablocks_unavailable() is never None
    raise NotImplementedError(megablocks_unavailable())
