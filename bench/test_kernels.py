"""Kernel benchmarks: masked-token gather/scatter, fused LayerNorm + adaLN modulate (alone and with the gated residual
add before it), expert-choice MoE, across every
backend of each op (`kernels.<op>: ...`), at MicroDiT_XL_2 shapes on a GPU and tiny shapes on the CPU.

    pytest bench/test_kernels.py --benchmark-only [--benchmark-json out.json]

Each result's extra_info states device, dtype, shapes, backend, pass (fwd | fwd+bwd), the time per call (median),
and for memory-bound ops the achieved GB/s over the op's minimal bytes (each input read once, each output written
once) with its % of the device-to-device copy bandwidth measured in this file (`copy_bandwidth`, bytes read +
written); for the MoE the TFLOP/s of its useful math (2 expert GEMMs, + router; backward 2x) and % of the bf16 peak
in engine.metrics. pytest-benchmark's own columns time one round = `reps` calls + one device synchronize
(reps is chosen so a round lasts ~10 ms on a GPU; extra_info divides it out).

GPU shapes (issue 3): masking at 256 px B=256, N=256, K=64, D=768 / 1024, at 512 px N=1024, K=256; norm on the
mixer (D=768, all tokens) and the backbone (D=1024, kept tokens); MoE with 8 experts, capacity 2, D=1024, T=64 kept
tokens (k=16), hidden 1024 and 4096, against the official code's one-hot einsum formulation at equal math (the
one-hot in the activations' dtype; the official code runs it under bf16 autocast). megablocks appears as a skipped
row with its reason: it offers token-choice dMoE only, not expert choice. Inputs larger than ~L2 are rotated
(several input sets) so repeated calls do not time the cache. CPU: tiny shapes, fp32, Triton through the interpreter
(its times say nothing about GPU speed), the whole file in well under 30 s.
"""
from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

import tessera_kernels as kernels
from engine.training.metrics import peak_flops
from tessera_kernels.gather import gather_tokens_ref, scatter_tokens_triton
from tessera_kernels.moe import expert_choice_ref

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
ROTATE_BYTES = 256 * 2**20  # rotate input sets until one pass touches this much memory (> 50-60 MB of H100/H200 L2)

GATHER_SHAPES = [(256, 256, 64, 768), (256, 256, 64, 1024), (256, 1024, 256, 1024)] if GPU else [(2, 16, 4, 32)]
NORM_SHAPES = [(256, 256, 768), (256, 64, 1024), (256, 1024, 768), (256, 256, 1024)] if GPU else [(2, 16, 32)]
MOE_SHAPES = [(256, 64, 1024, 1024, 8, 2.0), (256, 64, 1024, 4096, 8, 2.0)] if GPU else [(2, 16, 32, 64, 4, 2.0)]


# ---- timing ----------------------------------------------------------------------------------------------------------
def sync():
    if GPU:
        torch.cuda.synchronize()


def per_call_reps(fn) -> int:
    """Calls per timed round: ~10 ms of work on a GPU (after a warm-up call), 1 on the CPU."""
    fn()
    sync()
    if not GPU:
        return 1
    t = time.perf_counter()
    fn()
    sync()
    return int(min(200, max(1, math.ceil(0.01 / max(time.perf_counter() - t, 1e-6)))))


def run_bench(benchmark, fn) -> float:
    """Median seconds per call of fn (rounds of `reps` calls + one synchronize)."""
    reps = per_call_reps(fn)

    def round_():
        for _ in range(reps):
            fn()
        sync()

    benchmark.pedantic(round_, rounds=10 if GPU else 3, warmup_rounds=2 if GPU else 1, iterations=1)
    benchmark.extra_info["reps_per_round"] = reps
    return benchmark.stats.stats.median / reps


def rotation(bytes_per_set: int) -> int:
    return max(1, min(8, math.ceil(ROTATE_BYTES / max(bytes_per_set, 1)))) if GPU else 1


def cycle(sets):
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]
    return nxt


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write), measured here: 1 GiB on a GPU, 64 MiB on the CPU."""
    n = (2**30 if GPU else 2**26) // 4
    src = torch.randn(n, device=DEV)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    times = []
    for _ in range(10 if GPU else 5):
        if GPU:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * n * 4 / sorted(times)[len(times) // 2]


def record(benchmark, seconds, *, op, backend, shapes, pass_, bytes_=None, flops=None, bandwidth=None, **extra):
    info = {
        "device": torch.cuda.get_device_name() if GPU else "cpu (Triton via TRITON_INTERPRET=1)",
        "dtype": str(DTYPE).replace("torch.", ""), "op": op, "backend": backend, "pass": pass_, "shapes": shapes,
        "time_ms": seconds * 1e3, **extra,
    }
    if bytes_ is not None:
        info["gb_per_s"] = bytes_ / seconds / 1e9
        info["copy_gb_per_s"] = bandwidth / 1e9
        info["pct_of_copy_bw"] = 100 * bytes_ / seconds / bandwidth
    if flops is not None:
        info["tflops_per_s"] = flops / seconds / 1e12
        peak = peak_flops(DEV)
        info["pct_of_peak"] = None if peak is None else 100 * flops / seconds / peak
    benchmark.extra_info.update(info)


def backend_or_skip(op: str, name: str):
    try:
        return kernels.resolve(op, name)
    except ValueError as e:
        pytest.skip(str(e))


def grad_call(fn, inputs, g):
    """fwd+bwd through torch.autograd.grad (no .grad accumulation to time)."""
    def call():
        out = fn()
        torch.autograd.grad(out, inputs, g)
    return call


# ---- masked-token gather ---------------------------------------------------------------------------------------------
GATHER_BACKENDS = ["torch", "triton", "triton-store", "cuda"]  # triton-store: zeros + scatter-store backward


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", GATHER_BACKENDS)
@pytest.mark.parametrize("B,N,K,D", GATHER_SHAPES)
def test_gather(benchmark, copy_bandwidth, B, N, K, D, backend, pass_):
    if backend == "triton-store" and pass_ == "fwd":
        pytest.skip("same forward as triton")
    fn = backend_or_skip("gather", backend.split("-")[0])
    es = torch.finfo(DTYPE).bits // 8
    sets = []
    for _ in range(rotation(B * N * D * es)):
        x = torch.randn(B, N, D, device=DEV, dtype=DTYPE, requires_grad=pass_ != "fwd")
        idx = torch.rand(B, N, device=DEV).argsort(dim=1)[:, :K].sort(dim=1).values  # as the trainer draws them
        sets.append((x, idx))
    x, idx = sets[0]
    assert torch.equal(fn(x, idx), gather_tokens_ref(x, idx))  # right at this shape before it is timed
    nxt = cycle(sets)
    g = torch.randn(B, K, D, device=DEV, dtype=DTYPE)
    fwd_bytes = 2 * B * K * D * es + B * K * 8
    bwd_bytes = B * N * D * es + B * K * D * es + B * K * 8  # write all of dx, read the K gradient rows
    if pass_ == "fwd":
        call, nbytes = (lambda: fn(*nxt())), fwd_bytes
    elif backend == "triton-store":
        call, nbytes = (lambda: (fn(*nxt()), scatter_tokens_triton(g, idx, N, "store"))), fwd_bytes + bwd_bytes
    else:
        def call():
            x_, i_ = nxt()
            torch.autograd.grad(fn(x_, i_), (x_,), g)
        nbytes = fwd_bytes + bwd_bytes
    t = run_bench(benchmark, call)
    record(benchmark, t, op="gather", backend=backend, shapes=f"x ({B},{N},{D}) idx ({B},{K})", pass_=pass_,
           bytes_=nbytes, bandwidth=copy_bandwidth)


# ---- fused LayerNorm + adaLN modulate --------------------------------------------------------------------------------
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B,N,D", NORM_SHAPES)
def test_norm(benchmark, copy_bandwidth, B, N, D, backend, pass_):
    fn = backend_or_skip("norm", backend)
    es = torch.finfo(DTYPE).bits // 8
    grad = pass_ != "fwd"
    sets = []
    for _ in range(rotation(2 * B * N * D * es)):
        x = torch.randn(B, N, D, device=DEV, dtype=DTYPE, requires_grad=grad)
        w = (1 + 0.1 * torch.randn(D, device=DEV, dtype=DTYPE)).requires_grad_(grad)
        mod = torch.randn(B, 6 * D, device=DEV, dtype=DTYPE, requires_grad=grad)
        sets.append((x, w, mod))
    x, w, mod = sets[0]
    ref = kernels.resolve("norm", "torch")(x.float(), w.float(), *mod.float().chunk(6, -1)[:2], 1e-6)
    err = (fn(x, w, *mod.chunk(6, -1)[:2], 1e-6).float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, f"relative error {err:.2e}"
    nxt = cycle(sets)
    g = torch.randn(B, N, D, device=DEV, dtype=DTYPE)

    def fwd(s):
        x_, w_, mod_ = s
        shift, scale = mod_.chunk(6, dim=-1)[:2]  # strided views, as the model passes them
        return fn(x_, w_, shift, scale, 1e-6)

    if pass_ == "fwd":
        call, nbytes = (lambda: fwd(nxt())), 2 * B * N * D * es
    else:
        def call():
            s = nxt()
            torch.autograd.grad(fwd(s), s, g)
        nbytes = 2 * B * N * D * es + 3 * B * N * D * es  # fwd: x, out; bwd: x, dy, dx
    t = run_bench(benchmark, call)
    record(benchmark, t, op="norm", backend=backend, shapes=f"x ({B},{N},{D}) weight ({D},) shift/scale ({B},{D})",
           pass_=pass_, bytes_=nbytes, bandwidth=copy_bandwidth)


# ---- gated residual add fused with the next norm (kernels.residual_norm, follows kernels.norm) ------------------------
def _unfused_triton_norm(x, y, gate, weight, shift, scale, eps):
    """What the block ran before the fusion: a torch residual add, then the Triton LayerNorm + adaLN modulate."""
    h = x + (y if gate is None else gate.unsqueeze(1) * y)
    return h, kernels.resolve("norm", "triton")(h, weight, shift, scale, eps)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["torch", "triton", "triton-unfused"])
@pytest.mark.parametrize("use", ["pre-xattn", "pre-mlp"])  # x + gate·attn -> LN; x + xattn -> adaLN-modulated LN
@pytest.mark.parametrize("B,N,D", NORM_SHAPES)
def test_residual_norm(benchmark, copy_bandwidth, B, N, D, use, backend, pass_):
    if backend == "triton-unfused" and use == "pre-xattn":
        pytest.skip("no unfused Triton plain LayerNorm: same as torch")
    backend_or_skip("norm", backend.split("-")[0])
    fn = _unfused_triton_norm if backend == "triton-unfused" else kernels.resolve("residual_norm", backend)
    es = torch.finfo(DTYPE).bits // 8
    grad = pass_ != "fwd"
    sets = []
    for _ in range(rotation(4 * B * N * D * es)):
        x, y = (torch.randn(B, N, D, device=DEV, dtype=DTYPE, requires_grad=grad) for _ in range(2))
        w = (1 + 0.1 * torch.randn(D, device=DEV, dtype=DTYPE)).requires_grad_(grad)
        mod = torch.randn(B, 6 * D, device=DEV, dtype=DTYPE, requires_grad=grad)
        sets.append((x, y, w, mod))

    def fwd(s, f=fn):
        x_, y_, w_, mod_ = s
        shift, scale, gate = mod_.chunk(6, dim=-1)[:3]  # strided views, as the model passes them
        if use == "pre-xattn":
            return f(x_, y_, gate, w_, None, None, 1e-6)
        return f(x_, y_, None, w_, shift, scale, 1e-6)

    want = fwd([t.detach().float() for t in sets[0]], kernels.resolve("residual_norm", "torch"))
    for name, got, ref in zip(("h", "out"), fwd(sets[0]), want):  # right at this shape before it is timed
        err = (got.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, f"{name}: relative error {err:.2e}"
    nxt = cycle(sets)
    gh, go = torch.randn(B, N, D, device=DEV, dtype=DTYPE), torch.randn(B, N, D, device=DEV, dtype=DTYPE)
    if pass_ == "fwd":
        call, nbytes = (lambda: fwd(nxt())), 4 * B * N * D * es  # read x, y; write h, out
    else:
        def call():
            s = nxt()
            torch.autograd.grad(fwd(s), s, (gh, go), allow_unused=True)
        nbytes = 10 * B * N * D * es  # + bwd: read dout, dh, h, y; write dx, dy
    t = run_bench(benchmark, call)
    record(benchmark, t, op="residual_norm", backend=backend, use=use, pass_=pass_, bytes_=nbytes,
           bandwidth=copy_bandwidth, shapes=f"x, y ({B},{N},{D}) weight ({D},) gate/shift/scale ({B},{D})")


# ---- expert-choice MoE -----------------------------------------------------------------------------------------------
def expert_choice_onehot_einsum(x, router_weight, w1, w2, k):
    """The official MicroDiT formulation (FeedForwardECMoe): dense one-hot dispatch/combine einsums; same function as
    kernels.moe (fp32 routing, exact GELU), the one-hot in the activations' dtype."""
    T = x.shape[1]
    probs = F.linear(x, router_weight).float().softmax(dim=-1)  # (B, T, E)
    g, m = torch.topk(probs.permute(0, 2, 1), k, dim=-1)  # (B, E, k)
    p = F.one_hot(m, num_classes=T).to(x.dtype)  # (B, E, k, T)
    xin = torch.einsum("bekt,btd->bekd", p, x)
    h = F.gelu(torch.einsum("bekd,edf->bekf", xin, w1))
    h = torch.einsum("bekf,efd->bekd", h, w2)
    return torch.einsum("bekt,bekd->btd", p, g.unsqueeze(-1).to(h.dtype) * h)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["torch", "triton", "megablocks", "onehot_einsum"])
@pytest.mark.parametrize("B,T,D,F_,E,capacity", MOE_SHAPES)
def test_moe(benchmark, B, T, D, F_, E, capacity, backend, pass_):
    fn = expert_choice_onehot_einsum if backend == "onehot_einsum" else backend_or_skip("moe", backend)
    k = int(capacity * T / E)
    grad = pass_ != "fwd"
    x = torch.randn(B, T, D, device=DEV, dtype=DTYPE, requires_grad=grad)
    params = [(torch.randn(*s, device=DEV) * sd).to(DTYPE).requires_grad_(grad)
              for s, sd in (((E, D), 0.02), ((E, D, F_), D**-0.5), ((E, F_, D), F_**-0.5))]
    # Reference at the inputs' dtype: every backend routes on the same bf16 router logits. An fp32 reference routes on
    # fp32 logits, and near-ties among a sample's 64 tokens then flip top-k picks: on an H200 that put every backend,
    # the reference's own bf16 run included, 22-29% off at the flipped tokens.
    ref = expert_choice_ref(x, *params, k).float()
    err = (fn(x, *params, k).float() - ref).abs().max() / ref.abs().max()
    assert err < 5e-2, f"relative error {err:.2e}"
    flops = 2 * B * T * D * E + 2 * 2 * E * B * k * D * F_  # router + two expert GEMMs (multiply-add = 2)
    if pass_ == "fwd":
        call = lambda: fn(x, *params, k)  # noqa: E731
    else:
        call = grad_call(lambda: fn(x, *params, k), (x, *params), torch.randn(B, T, D, device=DEV, dtype=DTYPE))
        flops *= 3
    t = run_bench(benchmark, call)
    record(benchmark, t, op="moe", backend=backend, pass_=pass_, flops=flops,
           shapes=f"x ({B},{T},{D}) E={E} k={k} F={F_}",
           note="megablocks: token-choice dMoE only" if backend == "megablocks" else "")
