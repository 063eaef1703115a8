"""Attention backends side by side at MicroDiT shapes: TFLOP/s and % of the device's bf16 peak, forward and
forward+backward, with the kernel SDPA actually dispatched to.

GPU (bf16, head dim 64, 16 heads): self-attention over the kept tokens, B=256 with N=64 and N=256, B=64 with N=1024;
cross-attention from 256 image tokens to 77 caption tokens with padded captions (random lengths 8..77), B=256.
CPU (fp32): the same cases at tiny sizes so `pytest bench --benchmark-only` stays quick; triton runs in the
interpreter there, so CPU numbers only show that every backend runs, not how fast it is.

FLOPs: forward 4·B·H·Nq·Nk·Dh (QKᵀ and PV, a multiply-add counted as 2); forward+backward 3.5x that (backward
recomputes QKᵀ and adds dV, dP, dQ, dK), FlashAttention's convention. Padded caption keys are counted (nominal Nk).
"""
from __future__ import annotations

import pytest
import torch

import tessera_kernels as kernels
from engine.training.metrics import peak_flops
from tessera_kernels.attention import sdpa_backend_used

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
HEAD_DIM = 64
# case -> (B, heads, Nq, Nk, padded keys?) on GPU / on CPU
CASES = {
    "self_64": ((256, 16, 64, 64, False), (2, 2, 64, 64, False)),
    "self_256": ((256, 16, 256, 256, False), (1, 2, 128, 128, False)),
    "self_1024": ((64, 16, 1024, 1024, False), (1, 1, 256, 256, False)),
    "cross_77": ((256, 16, 256, 77, True), (2, 2, 64, 77, True)),
}
BACKENDS = [b for b in kernels.backends("attention") if b != "auto"]  # auto = sdpa (tessera_kernels/__init__.py)


def inputs(B, H, Nq, Nk, padded):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    make = lambda n: torch.randn(B, H, n, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_()
    q, k, v = make(Nq), make(Nk), make(Nk)
    mask = None
    if padded:  # caption lengths 8..Nk, as padded text-encoder outputs
        lens = torch.randint(8, Nk + 1, (B,), device=DEVICE, generator=gen)
        mask = torch.arange(Nk, device=DEVICE)[None] < lens[:, None]
    return q, k, v, mask, torch.randn_like(q)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention(benchmark, backend, case, mode):
    try:
        fn = kernels.resolve("attention", backend)
    except ValueError as e:
        pytest.skip(str(e))
    if backend == "flash_attn" and DTYPE not in (torch.float16, torch.bfloat16):
        pytest.skip("flash_attn needs fp16/bf16")
    B, H, Nq, Nk, padded = CASES[case][0 if GPU else 1]
    q, k, v, mask, grad = inputs(B, H, Nq, Nk, padded)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v, mask)
        else:
            torch.autograd.grad(fn(q, k, v, mask), (q, k, v), grad)
        if GPU:
            torch.cuda.synchronize()

    rounds, warmup = (20, 3) if GPU else ((2, 1) if backend == "triton" else (5, 1))
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)

    seconds = benchmark.stats.stats.median
    flops = 4 * B * H * Nq * Nk * HEAD_DIM * (3.5 if mode == "fwd_bwd" else 1.0)
    peak = peak_flops(DEVICE)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(DEVICE) if GPU else "cpu", "torch": torch.__version__,
        "backend": backend, "case": case, "mode": mode, "dtype": str(DTYPE).removeprefix("torch."),
        "B": B, "heads": H, "Nq": Nq, "Nk": Nk, "head_dim": HEAD_DIM, "padded_keys": padded,
        "median_ms": seconds * 1e3, "tflops_per_sec": flops / seconds / 1e12,
        "pct_of_bf16_peak": None if peak is None else 100 * flops / seconds / peak,
        "sdpa_kernel": sdpa_backend_used(q, k, v, mask) if backend == "sdpa" else None,
    })
