"""Multi-head attention with an optional key padding mask (non-causal), behind the `kernels.attention` flag.

    q: (B, H, Nq, Dh)   k, v: (B, H, Nk, Dh)
    key_padding_mask: (B, Nk) bool, True = attend to this key; None = all keys valid
    out: (B, H, Nq, Dh), q's dtype

Backends (registered in tessera_kernels/__init__.py):
    torch       attention_ref          plain PyTorch in fp32: the reference every backend is tested against
    sdpa        attention_sdpa         torch scaled_dot_product_attention; on GPU torch picks flash / cuDNN /
                                       memory-efficient (sdpa_backend_used() says which, for the benchmark table)
    flash_attn  attention_flash_attn   flash_attn_func; varlen with cu_seqlens for padded keys; fp16/bf16 only
    xformers    attention_xformers     memory_efficient_attention with a tensor attn_bias for padding
    triton      tessera_kernels/attention_triton.py: our FlashAttention-2 kernels (forward + backward, custom op)

A query row whose keys are all padded gets zeros (and zero, finite gradients) in every backend. The wrappers here
do it without a host sync: such rows attend to all keys (finite math), then torch.where zeroes them.
Host syncs: none (`# NOTE: host sync` marks any that get added). flash-attn and xformers are imported on first
use only; their *_unavailable() functions give the reason they cannot run here (None when they can).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os

import torch
import torch.nn.functional as F


def _bias_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)


def _safe_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """The mask with fully padded rows opened up (so no softmax sees only -inf); those rows are zeroed after."""
    return key_padding_mask | ~key_padding_mask.any(-1, keepdim=True)


def _zero_empty_rows(out: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """out (B, H, Nq, Dh) with rows of batches that have no valid key set to 0 (gradient 0 there too)."""
    if key_padding_mask is None:
        return out
    has_key = key_padding_mask.any(-1)[:, None, None, None]  # (B, 1, 1, 1)
    return torch.where(has_key, out, out.new_zeros(()))


def attention(q, k, v, key_padding_mask=None, backend: str = "auto"):
    """Attention with the backend named as in the config flag `kernels.attention` (default: the best here)."""
    import tessera_kernels as kernels

    return kernels.resolve("attention", backend)(q, k, v, key_padding_mask)


# ------------------------------------------------------------------------------------------------ torch
def attention_ref(q, k, v, key_padding_mask=None):
    """Plain PyTorch reference: softmax(q kᵀ / sqrt(Dh)) v, computed in float32."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(~_bias_mask(_safe_mask(key_padding_mask)), float("-inf"))
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.float())
    return _zero_empty_rows(out, key_padding_mask).to(q.dtype)


# ------------------------------------------------------------------------------------------------ sdpa
def attention_sdpa(q, k, v, key_padding_mask=None):
    """torch scaled_dot_product_attention: picks flash / cuDNN / memory-efficient kernels on GPU."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_bias_mask(_safe_mask(key_padding_mask)))
    return _zero_empty_rows(out, key_padding_mask)


# torch's SDPBackend values (torch.nn.attention.SDPBackend) -> names in the benchmark table
_SDPA_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def _sdpa_signature(q, k, v, key_padding_mask) -> tuple:
    t = lambda x: (tuple(x.shape), tuple(x.stride()), x.requires_grad)
    return (q.device.type, q.dtype, t(q), t(k), t(v), key_padding_mask is None)


_SDPA_CHOICES: dict[tuple, str] = {}  # signature -> kernel name

def sdpa_backend_used(q, k, v, key_padding_mask=None) -> str:
    """Which kernel torch's SDPA runs for these inputs, as attention_sdpa calls it: "flash", "cudnn", "efficient" or
    "math" on GPU; on CPU "cpu-flash" (torch's CPU flash kernel) or "math". Cached per shape/stride/dtype signature.

    Asks torch's own dispatcher (torch._fused_sdp_choice) where it exists; otherwise tries sdpa_kernel([backend])
    contexts in torch's priority order and reports the first that runs. For tables, not for the hot path."""
    mask = None if key_padding_mask is None else _bias_mask(_safe_mask(key_padding_mask))

    def choose() -> str:
        name = None
        if hasattr(torch, "_fused_sdp_choice"):
            try:
                name = _SDPA_NAMES.get(int(torch._fused_sdp_choice(q, k, v, mask)))
            except (RuntimeError, TypeError):
                name = None
        if name is None:
            name = _probe_sdpa(q, k, v, mask)
        return name if q.device.type == "cuda" or name == "math" else f"{q.device.type}-{name}"

    signature = _sdpa_signature(q, k, v, key_padding_mask)
    if signature not in _SDPA_CHOICES:
        _SDPA_CHOICES[signature] = choose()
    return _SDPA_CHOICES[signature]


def _probe_sdpa(q, k, v, mask) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = getattr(torch._C, "_get_sdp_priority_order", lambda: [1, 3, 2, 0])()
    for value in order:
        name = _SDPA_NAMES.get(int(value))
        backend = getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                       "cudnn": "CUDNN_ATTENTION", "math": "MATH"}.get(name, ""), None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]), torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return name
        except RuntimeError:
            continue
    return "math"


# ------------------------------------------------------------------------------------------------ availability
def _package_reason(package: str, pip_name: str) -> str | None:
    if importlib.util.find_spec(package) is None:
        return f"{pip_name} not installed"
    if not torch.cuda.is_available():
        return f"{pip_name} needs CUDA"
    return None


@functools.lru_cache(maxsize=None)
def flash_attn_unavailable() -> str | None:
    """None when the flash_attn backend can run here, else why not."""
    reason = _package_reason("flash_attn", "flash-attn")
    if reason is None and torch.cuda.get_device_capability()[0] < 8:
        reason = "flash-attn needs an Ampere or newer GPU"
    if reason is None:
        try:
            importlib.import_module("flash_attn")
        except Exception as e:  # a wheel built for another torch/CUDA fails here, not at find_spec
            reason = f"flash-attn fails to import: {e}"
    return reason


@functools.lru_cache(maxsize=None)
def xformers_unavailable() -> str | None:
    """None when the xformers backend can run here, else why not."""
    reason = _package_reason("xformers", "xformers")
    if reason is None:
        try:
            importlib.import_module("xformers.ops")
        except Exception as e:
            reason = f"xformers fails to import: {e}"
    return reason


def triton_unavailable() -> str | None:
    """None when our Triton kernel can run here: CUDA, or CPU under TRITON_INTERPRET=1 (slow; for tests)."""
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return "triton needs CUDA (or TRITON_INTERPRET=1 on CPU)"


# ------------------------------------------------------------------------------------------------ flash-attn
def packed_key_index(key_padding_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(B·Nk,) rows of [k.reshape(B·Nk, ...); one zero row] that pack the valid keys batch after batch (slot j of
    batch b's run is its j-th valid key); slots past the last valid key point at the zero row. Fixed size, so it
    needs no host sync (unlike k[mask]); varlen kernels read only up to cu_seqlens[-1]."""
    B, Nk = key_padding_mask.shape
    total = B * Nk
    rank = key_padding_mask.cumsum(-1) - 1  # (B, Nk): index among its batch's valid keys
    dest = torch.where(key_padding_mask, cu_seqlens[:-1, None].long() + rank, total).flatten()
    src = torch.full((total + 1,), total, dtype=torch.long, device=key_padding_mask.device)
    src.scatter_(0, dest, torch.arange(total, device=key_padding_mask.device))  # padded keys land in slot `total`
    return src[:total]


def attention_flash_attn(q, k, v, key_padding_mask=None):
    """flash-attn 2: flash_attn_func, or flash_attn_varlen_func over the packed valid keys when there is a mask."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"kernels.attention=flash_attn needs fp16 or bf16 inputs, got {q.dtype}; "
                        f"train in bf16 or pick kernels.attention=sdpa/triton")
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, H, Dh): flash-attn's layout
    if key_padding_mask is None:
        return flash_attn_func(qt, kt, vt).transpose(1, 2)
    B, Nq, H, Dh = qt.shape
    Nk = kt.shape[1]
    lens = key_padding_mask.sum(-1, dtype=torch.int32)  # (B,)
    cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
    cu_q = torch.arange(0, (B + 1) * Nq, Nq, device=q.device, dtype=torch.int32)
    src = packed_key_index(key_padding_mask, cu_k)

    def pack(t):  # (B, Nk, H, Dh) -> (B·Nk, H, Dh), valid keys first; gradients flow back through index_select
        return torch.cat([t.reshape(B * Nk, H, Dh), t.new_zeros(1, H, Dh)]).index_select(0, src)

    # max_seqlen_k = Nk is an upper bound, so no host sync for the true maximum
    out = flash_attn_varlen_func(qt.reshape(B * Nq, H, Dh), pack(kt), pack(vt), cu_q, cu_k, Nq, Nk)
    return _zero_empty_rows(out.view(B, Nq, H, Dh).transpose(1, 2), key_padding_mask)


# ------------------------------------------------------------------------------------------------ xformers
def attention_xformers(q, k, v, key_padding_mask=None):
    """xformers memory_efficient_attention; padding as an additive bias (B, 1, 1, Nk) broadcast over heads/queries,
    stored with its key dim padded to a multiple of 8 (xformers' alignment rule)."""
    import xformers.ops as xops

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, H, Dh)
    if key_padding_mask is None:
        return xops.memory_efficient_attention(qt, kt, vt).transpose(1, 2)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    buf = torch.zeros(B, 1, 1, -(-Nk // 8) * 8, dtype=q.dtype, device=q.device)
    buf[..., :Nk].masked_fill_(~_bias_mask(_safe_mask(key_padding_mask)), float("-inf"))
    bias = buf[..., :Nk].expand(B, H, Nq, Nk)
    out = xops.memory_efficient_attention(qt, kt, vt, attn_bias=bias).transpose(1, 2)
    return _zero_empty_rows(out, key_padding_mask)
