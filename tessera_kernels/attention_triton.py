"""Our own FlashAttention-2-style attention in Triton: forward and backward, non-causal, with a key padding mask.

    attention_triton(q, k, v, key_padding_mask=None, kv_lens=None) -> out
      q:                (B, H, Nq, Dh)  fp32 | fp16 | bf16, any strides with stride(-1) == 1 (the model's
                                        head-split view of (B, N, H, Dh) memory goes in without a copy)
      k, v:             (B, H, Nk, Dh)  same dtype and device as q
      key_padding_mask: (B, Nk) bool, True = attend to this key; None = all keys valid
      kv_lens:          (B,) int, keys j >= kv_lens[b] are padding (per-batch lengths, as for padded captions);
                        may be given with or without the mask (a key must pass both)
      out:              (B, H, Nq, Dh)  q's dtype, a view of (B, Nq, H, Dh) memory so merging heads is free
    Internals kept for backward: lse (B, H, Nq) fp32, the natural-log sum of exp(q·k/√Dh) over valid keys.

Limits: Dh <= 128 (any value; tiles are padded to the next power of two >= 16, and 32/64/128 waste nothing);
any Nq, Nk >= 0 (not multiples of the block: the tails are masked), B, H >= 1. Softmax scale 1/√Dh.
A query row whose keys are all padded gives zeros (lse = +inf) and zero gradients, never NaN.
Arithmetic: fp32 accumulation everywhere; P and dS are rounded to the input dtype before their matmuls (as
FlashAttention does); fp32 inputs use exact fp32 dots ("ieee") unless torch allows TF32 matmuls.
Runs on CUDA (Ampere/Hopper) or, slowly, on CPU under TRITON_INTERPRET=1 (one fixed config there; bf16 dots are
done in fp32 in the interpreter because its bf16 tl.dot is wrong).

Host syncs: none. The mask becomes per-batch key lengths on the device (the loop bound is read inside the kernel),
shapes and dtypes come from tensor metadata, and autotuning runs once per shape key. (Convention: any host sync
added here must be marked `# NOTE: host sync`.)

QK-norm is NOT fused here. MicroDiT normalizes q and k with a LayerNorm over the full hidden width, across all
heads of a token, while each program of this kernel sees one head's tile; fusing would need every program to read all
heads of its rows (H× the Q/K traffic) or a separate statistics pass plus a cross-head reduction in backward. That
LayerNorm is an O(N·hidden) memory-bound pass next to attention's O(N²·hidden) math; it belongs to the norm op (or
to torch.compile, which can fuse it with the elementwise work around the qkv projection).

Structure: `_attn_fwd` (one program per BLOCK_M query rows of one (batch, head); streams K/V blocks with an online
softmax in base 2), `_attn_bwd_delta` (rowsum(dO·O)), `_attn_bwd_dkdv` (one program per key block, loops over
queries: no atomics) and `_attn_bwd_dq` (one program per query block, loops over keys). The launchers are
torch.library custom ops `tessera::flash_attention_fwd/bwd` with fake (meta) kernels and a registered autograd
formula, so torch.compile(fullgraph=True) traces through them.

GPU tuning (Ampere/Hopper): autotuned over 64/128-row query tiles, 32-128-key steps, 4/8 warps and 2-4 pipeline
stages, keyed on (Nq, Nk, Dh, mask flags, dtype); the first call per key benchmarks the configs. Not done yet (leads
from the Hopper notes, to try once a benchmark exists): TMA tensor descriptors for the K/V stream, a persistent
grid for the many small (batch, head) problems of 64-token self-attention, and warp specialization. fp32 inputs
with exact dots do not use tensor cores: train in bf16. GPU speed is unmeasured so far (bench/test_attention.py).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

# the plain-PyTorch reference these kernels are tested against
from tessera_kernels.attention import attention_ref  # noqa: F401

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["attention_triton", "flash_attention_fwd", "flash_attention_bwd", "INTERPRET", "MAX_HEAD_DIM"]


# ------------------------------------------------------------------------------------------------ configs
def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# The interpreter needs exactly one config; 64x64 tiles keep the program count low (it costs ~0.4 ms per program)
# while 77- and 130-long test sequences still span several blocks with ragged tails.
_INTERPRET_CONFIGS = [_cfg(64, 64, 4, 1)]
# GPU (Ampere/Hopper): 64-128 query rows per program (a Hopper warpgroup MMA wants >= 64 rows), 32-128 keys per
# step, 4 or 8 warps, 2-4 pipeline stages for the K/V stream (cp.async / TMA prefetch). Pruned by sequence length.
_FWD_CONFIGS = [
    _cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 32, 4, 4),
    _cfg(64, 64, 4, 3), _cfg(64, 64, 4, 4), _cfg(64, 128, 4, 3), _cfg(128, 128, 8, 2), _cfg(64, 32, 4, 4),
]
# dK/dV programs hold BLOCK_N keys and loop over BLOCK_M queries; dQ programs hold BLOCK_M queries.
_BWD_KV_CONFIGS = [
    _cfg(64, 64, 4, 3), _cfg(64, 128, 8, 3), _cfg(32, 128, 4, 3), _cfg(32, 64, 4, 4), _cfg(64, 128, 8, 2),
    _cfg(64, 64, 8, 2),
]
_BWD_Q_CONFIGS = [
    _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 32, 4, 3), _cfg(64, 32, 4, 4), _cfg(128, 64, 8, 2),
]


def _configs(gpu_list: list[triton.Config]) -> list[triton.Config]:
    return _INTERPRET_CONFIGS if INTERPRET else gpu_list


def _prune(configs, named_args, **kwargs):
    """Drop tiles far larger than the sequences (a 64-token self-attention gains nothing from 128-row tiles)."""
    cap_m = max(32, triton.next_power_of_2(max(1, named_args["N_Q"])))
    cap_n = max(32, triton.next_power_of_2(max(1, named_args["N_K"])))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
    return kept or configs[:1]


_KEY = ["N_Q", "N_K", "HEAD_DIM", "HAS_MASK", "HAS_LENS", "DOT_FP32", "PRECISION"]
_EVEN = {
    "EVEN_M": lambda a: a["N_Q"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["N_K"] % a["BLOCK_N"] == 0,
}


# ------------------------------------------------------------------------------------------------ kernels
# Everything is inlined into the kernels: under the interpreter every call of a @triton.jit function re-patches
# triton.language (~1.5 ms a call; tl.cdiv and tl.zeros are such functions, hence plain arithmetic and tl.full). Tiles outside the K/V loops are always
# loaded with row/column masks (once per program); the K/V loads in the loops drop their masks when the tiles are
# full (EVEN_N, HEAD_DIM == BLOCK_D).
@triton.autotune(configs=_configs(_FWD_CONFIGS), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.heuristics(_EVEN)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, MASK, LENS,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_mb,
    H, N_Q, N_K, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENS: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """One program per BLOCK_M query rows of one (batch, head): online softmax over BLOCK_N-key steps, base 2."""
    FULL_KV: tl.constexpr = EVEN_N and HEAD_DIM == BLOCK_D  # K/V tiles need no load mask
    MASK_N: tl.constexpr = HAS_MASK or HAS_LENS or not EVEN_N  # scores need a key mask
    num_m = (N_Q + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    bh = pid // num_m  # neighbouring programs share one head's K/V in L2
    pid_m = pid % num_m
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    md_ok = (offs_m < N_Q)[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :], mask=md_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_ptrs = K + b64 * s_kb + h * s_kh + offs_n0[:, None] * s_kn + offs_d[None, :]
    v_ptrs = V + b64 * s_vb + h * s_vh + offs_n0[:, None] * s_vn + offs_d[None, :]
    if HAS_LENS:  # loop bound read on the device: no host sync
        n_end = tl.minimum(tl.maximum(tl.load(LENS + b), 0), N_K)
    else:
        n_end = N_K

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of scaled scores (base 2)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + offs_n0
        if FULL_KV:
            k = tl.load(k_ptrs + start_n * s_kn)
            v = tl.load(v_ptrs + start_n * s_vn)
        else:
            nd_ok = (offs_n < N_K)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs + start_n * s_kn, mask=nd_ok, other=0.0)
            v = tl.load(v_ptrs + start_n * s_vn, mask=nd_ok, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK_N:
            valid = offs_n < n_end
            if HAS_MASK:
                valid = valid & (tl.load(MASK + b64 * s_mb + offs_n, mask=offs_n < N_K, other=0) != 0)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: avoid (-inf) - (-inf)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    has_key = l_i > 0.0  # False only for rows whose keys are all padded: out 0, lse +inf
    l_use = tl.where(has_key, l_i, 1.0)
    out = acc / l_use[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_use)) * 0.6931471805599453, float("inf"))
    tl.store(O + b64 * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=md_ok)
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA, s_ob, s_oh, s_om, s_db, s_dh, s_dm, H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[i, d] * O[i, d] (the softmax-backward row term), fp32."""
    num_m = (N_Q + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    bh = pid // num_m
    pid_m = pid % num_m
    b64 = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b64 * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b64 * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.autotune(configs=_configs(_BWD_KV_CONFIGS), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.heuristics(_EVEN)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, LENS,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dm, s_gb, s_gh, s_gn, s_mb,
    H, N_Q, N_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENS: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """One program per BLOCK_N keys of one (batch, head): dV = Pᵀ dO, dK = scale · dSᵀ Q, looping over the queries
    (no atomics). DK and DV share the strides s_g*."""
    FULL_Q: tl.constexpr = EVEN_M and HEAD_DIM == BLOCK_D
    MASK_N: tl.constexpr = HAS_MASK or HAS_LENS or not EVEN_N
    num_n = (N_K + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    bh = pid // num_n
    pid_n = pid % num_n
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    nd_ok = (offs_n < N_K)[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :], mask=nd_ok, other=0.0)
    v = tl.load(V + b64 * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :], mask=nd_ok, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if HAS_LENS:
        n_end = tl.minimum(tl.maximum(tl.load(LENS + b), 0), N_K)
    else:
        n_end = N_K
    valid = offs_n < n_end
    if HAS_MASK:
        valid = valid & (tl.load(MASK + b64 * s_mb + offs_n, mask=offs_n < N_K, other=0) != 0)
    q_ptrs = Q + b64 * s_qb + h * s_qh + offs_m0[:, None] * s_qm + offs_d[None, :]
    do_ptrs = DO + b64 * s_db + h * s_dh + offs_m0[:, None] * s_dm + offs_d[None, :]
    row_ptrs = bh.to(tl.int64) * N_Q + offs_m0

    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    m_stop = tl.where(pid_n * BLOCK_N < n_end, N_Q, 0)  # a block of padded keys only: nothing to add
    for start_m in range(0, m_stop, BLOCK_M):
        if FULL_Q:
            q = tl.load(q_ptrs + start_m * s_qm)
            do = tl.load(do_ptrs + start_m * s_dm)
        else:
            md_ok = (start_m + offs_m0 < N_Q)[:, None] & d_ok[None, :]
            q = tl.load(q_ptrs + start_m * s_qm, mask=md_ok, other=0.0)
            do = tl.load(do_ptrs + start_m * s_dm, mask=md_ok, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        if EVEN_M:
            lse2 = tl.load(LSE + row_ptrs + start_m) * 1.4426950408889634
            delta = tl.load(DELTA + row_ptrs + start_m)
        else:  # rows past N_Q: lse = +inf makes their P zero
            m_ok = start_m + offs_m0 < N_Q
            lse2 = tl.load(LSE + row_ptrs + start_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_ptrs + start_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASK_N:
            p_t = tl.where(valid[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)

    g = b64 * s_gb + h * s_gh + offs_n[:, None] * s_gn + offs_d[None, :]
    tl.store(DK + g, (dk * sm_scale).to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + g, dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.autotune(configs=_configs(_BWD_Q_CONFIGS), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.heuristics(_EVEN)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, LENS,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dm, s_gb, s_gh, s_gm, s_mb,
    H, N_Q, N_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENS: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """One program per BLOCK_M queries of one (batch, head): dQ = scale · dS K, looping over the keys."""
    FULL_KV: tl.constexpr = EVEN_N and HEAD_DIM == BLOCK_D
    MASK_N: tl.constexpr = HAS_MASK or HAS_LENS or not EVEN_N
    num_m = (N_Q + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    bh = pid // num_m
    pid_m = pid % num_m
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :], mask=md_ok, other=0.0)
    do = tl.load(DO + b64 * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :], mask=md_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = bh.to(tl.int64) * N_Q + offs_m
    lse2 = tl.load(LSE + row, mask=m_ok, other=float("inf")) * 1.4426950408889634  # +inf: P = 0 past N_Q
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    k_ptrs = K + b64 * s_kb + h * s_kh + offs_n0[:, None] * s_kn + offs_d[None, :]
    v_ptrs = V + b64 * s_vb + h * s_vh + offs_n0[:, None] * s_vn + offs_d[None, :]
    if HAS_LENS:
        n_end = tl.minimum(tl.maximum(tl.load(LENS + b), 0), N_K)
    else:
        n_end = N_K

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + offs_n0
        if FULL_KV:
            k = tl.load(k_ptrs + start_n * s_kn)
            v = tl.load(v_ptrs + start_n * s_vn)
        else:
            nd_ok = (offs_n < N_K)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs + start_n * s_kn, mask=nd_ok, other=0.0)
            v = tl.load(v_ptrs + start_n * s_vn, mask=nd_ok, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASK_N:
            valid = offs_n < n_end
            if HAS_MASK:
                valid = valid & (tl.load(MASK + b64 * s_mb + offs_n, mask=offs_n < N_K, other=0) != 0)
            p = tl.where(valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    tl.store(DQ + b64 * s_gb + h * s_gh + offs_m[:, None] * s_gm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=md_ok)


# ------------------------------------------------------------------------------------------------ launchers
def _bnhd_empty(t: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, H, n, Dh) view of fresh (B, n, H, Dh) memory: the layout the model merges heads from for free."""
    B, H, _, Dh = t.shape
    return t.new_empty(B, n, H, Dh, dtype=dtype or t.dtype).transpose(1, 2)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_flags(q: torch.Tensor, mask, lens) -> dict:
    Dh = q.shape[-1]
    fp32_exact = q.dtype == torch.float32 and not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    dot_fp32 = INTERPRET and q.dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    return dict(
        HEAD_DIM=Dh, BLOCK_D=max(16, triton.next_power_of_2(Dh)), HAS_MASK=mask is not None,
        HAS_LENS=lens is not None, DOT_FP32=dot_fp32, PRECISION="ieee" if (fp32_exact or dot_fp32) else "tf32",
    )


def _mask_args(q: torch.Tensor, mask, lens):
    """Pointers for the optional mask / lengths (q stands in when absent: never read)."""
    m = q if mask is None else mask.contiguous().view(torch.uint8)
    n = q if lens is None else lens
    return m, n, (0 if mask is None else m.stride(0))


def _fwd_impl(q, k, v, key_padding_mask, kv_lens):
    B, H, Nq, Dh = q.shape
    Nk = k.shape[2]
    out = _bnhd_empty(q, Nq)
    lse = q.new_empty(B, H, Nq, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    if Nk == 0:
        return out.zero_(), lse.fill_(float("inf"))
    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    mask, lens, s_mb = _mask_args(q, key_padding_mask, kv_lens)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]) * B * H,)
    _attn_fwd[grid](
        q, k, v, out, lse, mask, lens,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), s_mb,
        H, Nq, Nk, LOG2E / math.sqrt(Dh), **_kernel_flags(q, key_padding_mask, kv_lens),
    )
    return out, lse


def _bwd_impl(dout, q, k, v, out, lse, key_padding_mask, kv_lens):
    B, H, Nq, Dh = q.shape
    Nk = k.shape[2]
    dq, dk, dv = _bnhd_empty(q, Nq), _bnhd_empty(k, Nk), _bnhd_empty(v, Nk)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v, out, dout = (_rows_contiguous(t) for t in (q, k, v, out, dout))
    flags = _kernel_flags(q, key_padding_mask, kv_lens)
    mask, lens, s_mb = _mask_args(q, key_padding_mask, kv_lens)
    delta = torch.empty_like(lse)
    bm = 64 if INTERPRET else 128
    _attn_bwd_delta[(triton.cdiv(Nq, bm) * B * H,)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), H, Nq, HEAD_DIM=Dh, BLOCK_D=flags["BLOCK_D"], BLOCK_M=bm, num_warps=4,
    )
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    scale = 1.0 / math.sqrt(Dh)
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]) * B * H,)](
        q, k, v, dout, lse, delta, dk, dv, mask, lens, *common, dk.stride(0), dk.stride(1), dk.stride(2), s_mb,
        H, Nq, Nk, LOG2E * scale, scale, **flags,
    )
    _attn_bwd_dq[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]) * B * H,)](
        q, k, v, dout, lse, delta, dq, mask, lens, *common, dq.stride(0), dq.stride(1), dq.stride(2), s_mb,
        H, Nq, Nk, LOG2E * scale, scale, **flags,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("tessera::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], kv_lens: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Nq, Dh), lse (B, H, Nq) fp32). Inputs already checked by attention_triton."""
    return _fwd_impl(q, k, v, key_padding_mask, kv_lens)


@flash_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, kv_lens):
    B, H, Nq, _ = q.shape
    return _bnhd_empty(q, Nq), q.new_empty(B, H, Nq, dtype=torch.float32)


@torch.library.custom_op("tessera::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], kv_lens: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) with the shapes and dtypes of q, k, v."""
    return _bwd_impl(dout, q, k, v, out, lse, key_padding_mask, kv_lens)


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, kv_lens):
    return _bnhd_empty(q, q.shape[2]), _bnhd_empty(k, k.shape[2]), _bnhd_empty(v, v.shape[2])


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, kv_lens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, kv_lens)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask, kv_lens = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(dout, q, k, v, out, lse, key_padding_mask, kv_lens)
    return dq, dk, dv, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public entry
def lens_from_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B,) int32: 1 + index of the last valid key (0 for a fully padded row), on the device, no sync."""
    Nk = key_padding_mask.shape[-1]
    pos = torch.arange(1, Nk + 1, device=key_padding_mask.device, dtype=torch.int32)
    if Nk == 0:
        return key_padding_mask.new_zeros(key_padding_mask.shape[0], dtype=torch.int32)
    return (key_padding_mask.to(torch.int32) * pos).amax(-1)


def _check(q, k, v, key_padding_mask, kv_lens) -> None:
    flag = "kernels.attention=triton"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{flag}: q, k, v must be (B, H, N, Dh); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{flag}: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{flag}: q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"{flag}: head dim {q.shape[3]} > {MAX_HEAD_DIM} is not supported")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{flag}: q, k, v on different devices")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{flag}: needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); got {q.device}")
    B, Nk = q.shape[0], k.shape[2]
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (B, Nk)):
        raise ValueError(f"{flag}: key_padding_mask must be bool (B, Nk) = ({B}, {Nk}); got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if kv_lens is not None and (kv_lens.shape != (B,) or kv_lens.is_floating_point()):
        raise ValueError(f"{flag}: kv_lens must be integer (B,) = ({B},); got "
                         f"{kv_lens.dtype} {tuple(kv_lens.shape)}")


def attention_triton(q, k, v, key_padding_mask=None, kv_lens=None):
    """softmax(q kᵀ / √Dh) v with our Triton FlashAttention-2 kernels; see the module header for shapes and limits."""
    _check(q, k, v, key_padding_mask, kv_lens)
    if kv_lens is not None:
        kv_lens = kv_lens.to(torch.int32)
    elif key_padding_mask is not None:
        kv_lens = lens_from_mask(key_padding_mask)  # loop bound: keys past the last valid one are skipped
    out, _ = flash_attention_fwd(q, k, v, key_padding_mask, kv_lens)
    return out
