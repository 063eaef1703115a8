"""Gated residual add fused with the LayerNorm (+ adaLN modulate) that follows it (config `kernels.norm`, which this
op follows: `torch | triton`).

    x:      (B, N, D) float16 / bfloat16 / float32 / float64   the residual stream
    y:      (B, N, D) same dtype                               a branch output (attention, cross-attention)
    gate:   (B, D) or None   per-sample gate; rows may be strided (the model's `.chunk(6, dim=-1)` views)
    weight: (D,) or None     LayerNorm's elementwise scale (MicroDiT's norms have no bias)
    shift:  (B, D) or None   adaLN shift and scale: both or neither (neither = a plain LayerNorm, e.g. the
    scale:  (B, D) or None   pre-norm of MicroDiT's cross-attention)
    eps:    float
    -> (h, out), both (B, N, D) in x's dtype:
       h   = x + gate·y            (x + y without a gate)       the new residual stream
       out = LN(h)·(1+scale)+shift (LN(h) without shift/scale)  the next branch's input

In a MicroDiT block this replaces `x = x + gate1·attn(...)` + `norm2(x)` and `x = x + xattn(...)` + modulated
`norm3(x)` (models/blocks.py). Unfused, the add reads x and y and writes h, then the norm reads h again and writes
out: 5 passes over (B, N, D). Fused: 4 (read x, y; write h, out). Backward unfused: the norm's backward (read dout, h;
write dn), the residual sum (read dh, dn; write), gate·dh and Σ dh·y (read dh twice, y; write dy): ~10 passes.
Fused: read dout, dh, h, y; write dx, dy: 6.

Backends:
    add_layernorm_modulate_ref     plain PyTorch, exactly the unfused block's ops
    add_layernorm_modulate_triton  Triton forward + backward, custom op `tessera::add_layernorm_modulate`
                                   (fake + autograd registered: torch.compile traces it with fullgraph=True)

Numerics: h is computed in fp32 (fp64 for fp64) and rounded once to x's dtype (torch rounds gate·y, then the sum);
the statistics are taken from the ROUNDED h, which is what the backward reads back and what the unfused norm saw.
The kernels are tessera_kernels/norm.py's, with their residual flag on (HAS_RES): same tiles and grid (a whole row in
registers, D <= 8192; per-sample reductions of the backward — dshift, dscale, dgate — and dweight as fp32 partials
summed by torch in a fixed order): no atomics, deterministic.
Host syncs: none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera_kernels import norm as _norm
from tessera_kernels.gather import triton_unavailable  # noqa: F401  (the registry's check for `kernels.norm: triton`)
from tessera_kernels.norm import layernorm_modulate_ref


# ---- reference ---------------------------------------------------------------------------------------------------
def add_layernorm_modulate_ref(x, y, gate, weight, shift, scale, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch reference: the block's unfused residual add, then its norm."""
    h = x + (y if gate is None else gate.unsqueeze(1) * y)  # (B, N, D)
    if shift is None:
        return h, F.layer_norm(h, (h.shape[-1],), weight, None, eps)
    return h, layernorm_modulate_ref(h, weight, shift, scale, eps)


# ---- launchers -----------------------------------------------------------------------------------------------------
def _check(x, y, gate, weight, shift, scale, name):
    if (shift is None) != (scale is None):
        raise ValueError(f"{name}: give both shift and scale (adaLN) or neither (plain LayerNorm)")
    _norm._check(x, weight, shift if shift is not None else x[:, 0], scale if scale is not None else x[:, 0], name)
    if y.shape != x.shape or y.dtype != x.dtype or not y.is_contiguous() or y.device != x.device:
        raise ValueError(f"{name}: y must be contiguous {tuple(x.shape)} {x.dtype} like x, got {tuple(y.shape)} "
                         f"{y.dtype}")
    if gate is not None and (gate.shape != (x.shape[0], x.shape[2]) or gate.stride(1) != 1 or gate.device != x.device):
        raise ValueError(f"{name}: gate must be ({x.shape[0]}, {x.shape[2]}) with unit column stride, got "
                         f"{tuple(gate.shape)} strides {gate.stride()}")


def _flags(x, gate, weight, shift):
    return dict(HAS_GATE=gate is not None, HAS_W=weight is not None, HAS_MOD=shift is not None, ACC=_norm._acc(x.dtype))


def _mod_or_zeros(t, x):
    return t if t is not None else x.new_zeros(x.shape[0], x.shape[2])


def add_layernorm_modulate_launch(x, y, gate, weight, shift, scale, eps: float):
    """Triton forward -> (h, out). See the header for shapes."""
    name = "add_layernorm_modulate"
    _check(x, y, gate, weight, shift, scale, name)
    B, N, D = x.shape
    h, out = torch.empty_like(x), torch.empty_like(x)
    if x.numel() == 0:
        return h, out
    if not _norm._use_triton(x):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        yv = y.to(acc) if gate is None else gate.to(acc).unsqueeze(1) * y.to(acc)
        h.copy_(x.to(acc) + yv)
        return h, _norm._forward_torch(h, weight, _mod_or_zeros(shift, x), _mod_or_zeros(scale, x), eps, out)
    block_m, block_d, rows, S, warps = _norm._tiles(B, N, D, x.device, backward=False)
    _norm._ln_modulate_fwd_kernel[(B, S)](
        x, y, gate if gate is not None else x, weight if weight is not None else x,
        shift if shift is not None else x, scale if scale is not None else x, h, out,
        N, D, gate.stride(0) if gate is not None else 0, shift.stride(0) if shift is not None else 0,
        scale.stride(0) if scale is not None else 0, eps, rows,
        HAS_RES=True, **_flags(x, gate, weight, shift), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return h, out


def add_layernorm_modulate_backward_launch(dout, dres, h, y, gate, weight, scale, has_mod: bool, eps: float):
    """Triton backward -> (dx, dy) in h's dtype and (dweight (D,), dshift, dscale, dgate (B, D)) in fp32 (fp64 for
    fp64). dshift/dscale are zeros without modulation, dgate zeros without a gate."""
    name = "add_layernorm_modulate_backward"
    _check(h, y, gate, weight, scale if has_mod else None, scale if has_mod else None, name)
    for t, nm in ((dout, "dout"), (dres, "dres")):
        if t.shape != h.shape or not t.is_contiguous() or t.device != h.device:
            raise ValueError(f"{name}: {nm} must be contiguous {tuple(h.shape)}, got {tuple(t.shape)}")
    B, N, D = h.shape
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    if not _norm._use_triton(h):
        dn, dw, dshift, dscale = _norm._backward_torch(dout, h, weight, _mod_or_zeros(scale, h), eps)
        dh = dres.to(acc) + dn.to(acc)
        dgate = (dh * y.to(acc)).sum(1) if gate is not None else h.new_zeros(B, D, dtype=acc)
        dy = dh.clone() if gate is None else dh * gate.to(acc).unsqueeze(1)  # outputs of a custom op never alias
        if not has_mod:
            dshift, dscale = torch.zeros_like(dshift), torch.zeros_like(dscale)
        return dh.to(h.dtype), dy.to(h.dtype), dw, dshift, dscale, dgate
    dx, dy = torch.empty_like(h), torch.empty_like(h)
    block_m, block_d, rows, S, warps = _norm._tiles(B, N, D, h.device, backward=True)
    parts = torch.empty(4, B * S, D, dtype=acc, device=h.device)  # dshift, dscale, dweight, dgate partials
    if h.numel() > 0:
        _norm._ln_modulate_bwd_kernel[(B, S)](
            dout, dres, h, y, gate if gate is not None else h, weight if weight is not None else h,
            scale if has_mod else h, dx, dy, parts,
            N, D, gate.stride(0) if gate is not None else 0, scale.stride(0) if has_mod else 0, eps, rows, S, B * S * D,
            HAS_RES=True, **_flags(h, gate, weight, scale if has_mod else None), BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=warps,
        )
    else:
        parts.zero_()
    dshift, dscale, dweight, dgate = (p.view(B, S, D).sum(1) for p in parts)  # fixed-order reductions
    return dx, dy, dweight.sum(0), dshift, dscale, dgate


# ---- custom ops ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("tessera::add_layernorm_modulate", mutates_args=())
def _add_ln_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
               shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return add_layernorm_modulate_launch(x, y, gate, weight, shift, scale, eps)


@_add_ln_op.register_fake
def _(x, y, gate, weight, shift, scale, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("tessera::add_layernorm_modulate_backward", mutates_args=())
def _add_ln_backward_op(
    dout: torch.Tensor, dres: torch.Tensor, h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None,
    weight: torch.Tensor | None, scale: torch.Tensor | None, has_mod: bool, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layernorm_modulate_backward_launch(dout, dres, h, y, gate, weight, scale, has_mod, eps)


@_add_ln_backward_op.register_fake
def _(dout, dres, h, y, gate, weight, scale, has_mod, eps):
    B, N, D = h.shape
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    per_sample = [h.new_empty(B, D, dtype=acc) for _ in range(3)]
    return torch.empty_like(h), torch.empty_like(h), h.new_empty(D, dtype=acc), *per_sample


def _setup(ctx, inputs, output):
    x, y, gate, weight, shift, scale, eps = inputs
    ctx.save_for_backward(output[0], y, gate, weight, scale)
    ctx.eps, ctx.has_mod = eps, shift is not None
    ctx.dtypes = [None if t is None else t.dtype for t in (gate, weight, shift, scale)]


def _backward(ctx, dh, dout):
    h, y, gate, weight, scale = ctx.saved_tensors
    dx, dy, dw, dshift, dscale, dgate = _add_ln_backward_op(
        dout.contiguous(), dh.contiguous(), h, y, gate, weight, scale, ctx.has_mod, ctx.eps)
    grads = [dgate, dw, dshift, dscale]
    dgate, dw, dshift, dscale = (None if d is None else g.to(d) for g, d in zip(grads, ctx.dtypes))
    return dx, dy, dgate, dw, dshift, dscale, None


_add_ln_op.register_autograd(_backward, setup_context=_setup)


def add_layernorm_modulate_triton(x, y, gate, weight, shift, scale, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.norm: triton`: (x + gate·y, LN(x + gate·y)·(1+scale)+shift) in one pass forward and one backward."""
    def rows(t):  # keep strided (B, D) views as they are; copy only if a row is not contiguous
        return t if t is None or t.stride(-1) == 1 else t.contiguous()
    w = None if weight is None else weight.contiguous()
    return _add_ln_op(x.contiguous(), y.contiguous(), rows(gate), w, rows(shift), rows(scale), eps)
