"""kernels.gather: the Triton gather/scatter (TRITON_INTERPRET=1 on CPU) and the CUDA C++ backend (gpu) against the
torch reference. A gather is a copy, so forward and backward must be EXACT in every dtype."""
import pytest
import torch

import tessera_kernels as kernels
import tessera_kernels.gather as kg
from engine.diffusion.edm import EDM
from engine.diffusion.noise import draw_step_noise
from tessera_kernels.gather import (gather_tokens_pos_ref, gather_tokens_pos_triton, gather_tokens_ref,
                                    gather_tokens_triton, scatter_tokens_triton)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, N, K, D): degenerate sizes, K = 1, K = N, batch 1, D not a multiple of 16, N and B·K not multiples of a block
SHAPES = [(1, 1, 1, 1), (1, 7, 1, 5), (2, 64, 16, 33), (3, 17, 17, 8), (3, 300, 77, 24), (2, 50, 13, 130)]


def draw_idx(B, N, K, device=DEV):
    """Distinct kept indices per sample, unsorted (the kernels must not rely on order)."""
    return torch.stack([torch.randperm(N, device=device)[:K] for _ in range(B)])


def assert_distinct_per_row(idx):
    """The backward's assumption, checked on the test side only (never in the hot path: it would need a host sync)."""
    s = idx.sort(dim=1).values
    assert bool((s[:, 1:] != s[:, :-1]).all()), "kept indices must be distinct per sample"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K,D", SHAPES)
def test_triton_gather_forward_and_backward_are_exact(B, N, K, D, dtype):
    x = torch.randn(B, N, D, device=DEV).to(dtype).requires_grad_()
    idx = draw_idx(B, N, K)
    assert_distinct_per_row(idx)
    out = gather_tokens_triton(x, idx)
    assert out.dtype == dtype and out.shape == (B, K, D)
    x_ref = x.detach().float().requires_grad_()
    ref = gather_tokens_ref(x_ref, idx)
    assert torch.equal(out.float(), ref)
    g = torch.randn(B, K, D, device=DEV).to(dtype)
    out.backward(g)
    ref.backward(g.float())
    assert torch.equal(x.grad.float(), x_ref.grad)  # zeros where no index points, the gradient row elsewhere


@pytest.mark.parametrize("method", ["dense", "store"])
@pytest.mark.parametrize("B,N,K,D", [(1, 1, 1, 1), (2, 64, 16, 33), (3, 300, 77, 24)])
def test_both_backward_methods_scatter_into_zeros(B, N, K, D, method):
    g = torch.randn(B, K, D, device=DEV)
    idx = draw_idx(B, N, K).int()  # int32 indices work too
    dx = scatter_tokens_triton(g, idx, N, method)
    expected = torch.zeros(B, N, D, device=DEV)
    for b in range(B):
        expected[b, idx[b].long()] = g[b]
    assert torch.equal(dx, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_position_embedding_gather(dtype):
    B, N, K, D = 3, 37, 11, 45
    x = torch.randn(B, N, D, device=DEV).to(dtype).requires_grad_()
    pos = torch.randn(N, D, device=DEV).to(dtype).requires_grad_()
    idx = draw_idx(B, N, K)
    out = gather_tokens_pos_triton(x, pos, idx)
    ref32 = gather_tokens_pos_ref(x.detach().double(), pos.detach().double(), idx)
    ref_same = gather_tokens_pos_ref(x.detach(), pos.detach(), idx)
    err, base = (out.double() - ref32).abs(), (ref_same.double() - ref32).abs().max()
    # one rounding of the sum; the CPU interpreter truncates fp32->bf16 (GPU rounds to nearest): 1 ulp allowed there,
    # at most 2^-7 of the value (a fixed 1e-2 failed for sums above 4, whose ulp is 2^-5)
    slack = ref32.abs() * 2.0 ** -7 if dtype == torch.bfloat16 else 0
    assert (err <= 2 * base + slack).all(), (err - 2 * base - slack).max()
    g = torch.randn_like(out)
    out.backward(g)
    xr, pr = x.detach().clone().requires_grad_(), pos.detach().clone().requires_grad_()
    gather_tokens_pos_ref(xr, pr, idx).backward(g)
    assert torch.equal(x.grad, xr.grad)
    torch.testing.assert_close(pos.grad.float(), pr.grad.float(), rtol=1e-2, atol=1e-2)  # sums over B in dtype


def test_gradcheck_fp64():
    """The kernels copy bytes, so fp64 runs through them too (fast_mode: a few random directions, not every column)."""
    B, N, K, D = 2, 9, 4, 3
    x = torch.randn(B, N, D, device=DEV, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(N, D, device=DEV, dtype=torch.float64, requires_grad=True)
    idx = draw_idx(B, N, K)
    assert torch.autograd.gradcheck(lambda t: gather_tokens_triton(t, idx), (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda t: gather_tokens_triton(t, idx), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t, p: gather_tokens_pos_triton(t, p, idx), (x, pos), fast_mode=True)


def test_opcheck_custom_ops():
    x = torch.randn(2, 11, 7, device=DEV, requires_grad=True)
    pos = torch.randn(11, 7, device=DEV, requires_grad=True)
    idx = draw_idx(2, 11, 4)
    torch.library.opcheck(torch.ops.tessera.gather_tokens.default, (x, idx))
    torch.library.opcheck(torch.ops.tessera.gather_tokens_backward.default, (torch.randn(2, 4, 7, device=DEV), idx, 11))
    torch.library.opcheck(torch.ops.tessera.gather_tokens_pos.default, (x, pos, idx))


def test_launcher_rejects_bad_inputs():
    x, idx = torch.randn(2, 5, 4, device=DEV), draw_idx(2, 5, 3)
    with pytest.raises(ValueError, match="expected x"):
        kg.gather_tokens_launch(x[0], idx)
    with pytest.raises(TypeError, match="int64 or int32"):
        kg.gather_tokens_launch(x, idx.float())
    with pytest.raises(ValueError, match="contiguous"):
        kg.gather_tokens_launch(x.transpose(1, 2), idx)


def test_torch_fallback_when_triton_cannot_run_on_cpu(monkeypatch):
    """A CPU model on a CUDA machine (auto = triton there): the op computes the same values with torch."""
    monkeypatch.setattr(kg, "interpreted", lambda: False)
    x = torch.randn(2, 9, 5, requires_grad=True)
    idx = draw_idx(2, 9, 4, "cpu")
    out = gather_tokens_triton(x, idx)
    assert torch.equal(out, gather_tokens_ref(x, idx))
    out.sum().backward()
    assert torch.equal(x.grad.sum(1), torch.full((2, 5), 4.0))


def test_trainer_draws_distinct_kept_indices():
    """The assumption behind the atomics-free backward holds for the indices the trainer actually draws."""
    noise = draw_step_noise(EDM(), 0, 3, 8, (3, 32, 32), 64, 0.75, 0.1, torch.device("cpu"))
    assert noise.keep_idx.shape == (8, 16)
    assert_distinct_per_row(noise.keep_idx)


def test_registry_entries_and_reasons():
    assert {"torch", "triton", "cuda", "auto"} <= set(kernels.backends("gather"))
    assert kernels.resolve_name("gather", "auto") == "torch"  # on every device: the H200 benches (tessera_kernels/)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"kernels\.gather: backend 'cuda' is not usable here \((ext|no CUDA)"):
            kernels.resolve("gather", "cuda")
    assert kernels.resolve("gather", "triton") is gather_tokens_triton  # TRITON_INTERPRET=1 on CPU (root conftest)


# ---- CUDA C++ backend (csrc/) ---------------------------------------------------------------------------------------
def _csrc():
    from tessera_kernels.gather_cuda import cuda_unavailable

    reason = cuda_unavailable()
    if reason is not None:
        pytest.skip(f"kernels.gather=cuda: {reason}")
    import tessera_kernels.gather_cuda as gc

    return gc


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B,N,K,D", SHAPES + [(4, 256, 64, 768), (2, 1024, 256, 1024)])
def test_cuda_gather_forward_and_backward_are_exact(B, N, K, D, dtype):
    gc = _csrc()
    x = torch.randn(B, N, D, device="cuda").to(dtype).requires_grad_()
    idx = draw_idx(B, N, K, "cuda")
    out = gc.gather_tokens_cuda(x, idx)
    assert torch.equal(out, gather_tokens_ref(x.detach(), idx))
    g = torch.randn_like(out)
    out.backward(g)
    expected = torch.zeros_like(x).scatter_(1, idx.unsqueeze(-1).expand(-1, -1, D), g)
    assert torch.equal(x.grad, expected)
    assert torch.equal(gc.scatter_tokens_cuda(g, idx.int(), N), expected)  # int32 indices


@pytest.mark.gpu
def test_cuda_gather_opcheck_and_compile():
    gc = _csrc()
    x = torch.randn(2, 11, 7, device="cuda", requires_grad=True)
    idx = draw_idx(2, 11, 4, "cuda")
    torch.library.opcheck(torch.ops.tessera_csrc.gather_tokens_forward.default, (x, idx))
    f = torch.compile(gc.gather_tokens_cuda, fullgraph=True)
    assert torch.equal(f(x, idx), gather_tokens_ref(x, idx))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dense", "store"])
@pytest.mark.parametrize("B,N,K,D", [(256, 256, 64, 768), (256, 256, 64, 1024), (64, 1024, 256, 1024),
                                     (256, 256, 64, 16)])
def test_triton_gather_at_microdit_xl_shapes(B, N, K, D, method):
    """Real shapes on the GPU (masking at 256 and 512 px; D=16 is the loss-side gather of latent patch targets)."""
    x = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.rand(B, N, device="cuda").argsort(dim=1)[:, :K].sort(dim=1).values  # as the trainer draws them
    out = gather_tokens_triton(x, idx)
    assert torch.equal(out, gather_tokens_ref(x, idx))
    g = torch.randn_like(out)
    expected = torch.zeros_like(x).scatter_(1, idx.unsqueeze(-1).expand(-1, -1, D), g)
    assert torch.equal(scatter_tokens_triton(g, idx, N, method), expected)
