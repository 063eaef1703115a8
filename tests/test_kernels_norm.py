"""kernels.norm: the Triton fused LayerNorm + adaLN modulate (TRITON_INTERPRET=1 on CPU) against the torch reference.

Tolerance (docs/DESIGN.md convention 2): error vs the reference in fp64 at most 2x the error of PyTorch in the same dtype,
plus a small dtype atol (relative to the largest reference value)."""
import pytest
import torch

import tessera_kernels as kernels
import tessera_kernels.norm as kn
from tessera_kernels.norm import layernorm_modulate_ref, layernorm_modulate_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (B, N, D): batch 1, one token, D = 1, D not a multiple of 16, N not a multiple of the row block, MicroDiT widths
SHAPES = [(1, 1, 1), (1, 5, 7), (2, 37, 45), (3, 130, 96), (2, 9, 1152)]


def close_as_torch(mine, same_dtype_torch, ref, dtype, what):
    err = (mine.double() - ref).abs().max().item()
    base = (same_dtype_torch.double() - ref).abs().max().item()
    bound = 2 * base + ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (torch {dtype} error {base:.3e})"


def make_inputs(B, N, D, dtype, with_weight):
    """x, weight, and shift/scale as the model passes them: strided chunks of one (B, 6·D) modulation tensor."""
    x = (torch.randn(B, N, D, device=DEV) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(D, device=DEV)).to(dtype) if with_weight else None
    mod = torch.randn(B, 6 * D, device=DEV).to(dtype)
    shift, scale = mod.chunk(6, dim=-1)[:2]  # (B, D) each, row stride 6·D
    return x, w, shift, scale


def run(fn, args, g):
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    out = fn(*leaves, 1e-6)
    out.backward(g.to(out.dtype))
    return out, [None if a is None else a.grad for a in leaves]


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,D", SHAPES)
def test_forward_and_backward_match_reference(B, N, D, dtype, with_weight):
    args = make_inputs(B, N, D, dtype, with_weight)
    g = torch.randn(B, N, D, device=DEV)
    out, grads = run(layernorm_modulate_triton, args, g)
    assert out.dtype == dtype and out.shape == (B, N, D)
    ref, ref_grads = run(layernorm_modulate_ref, [None if a is None else a.double() for a in args], g.double())
    same, same_grads = run(layernorm_modulate_ref, args, g)
    close_as_torch(out, same, ref, dtype, "out")
    for name, mine, t, r in zip(("dx", "dweight", "dshift", "dscale"), grads, same_grads, ref_grads):
        if r is not None:
            assert mine.dtype == dtype
            close_as_torch(mine, t, r, dtype, name)


def test_gradcheck_fp64():
    """fp64 inputs run the kernels with fp64 statistics, so finite differences check every gradient."""
    x, w, shift, scale = (a.double() for a in make_inputs(2, 5, 6, torch.float32, True))
    args = tuple(a.detach().requires_grad_() for a in (x, w, shift, scale))
    assert torch.autograd.gradcheck(lambda *a: layernorm_modulate_triton(*a, 1e-5), args, fast_mode=True)
    assert torch.autograd.gradcheck(lambda x_, s, c: layernorm_modulate_triton(x_, None, s, c, 1e-5),
                                    (args[0], args[2], args[3]), fast_mode=True)


def test_opcheck_custom_ops():
    x, w, shift, scale = make_inputs(2, 7, 10, torch.float32, True)
    shift, scale = shift.contiguous(), scale.contiguous()
    args = (x.requires_grad_(), w.requires_grad_(), shift.requires_grad_(), scale.requires_grad_(), 1e-6)
    torch.library.opcheck(torch.ops.tessera.layernorm_modulate.default, args)
    torch.library.opcheck(torch.ops.tessera.layernorm_modulate.default, (x, None, shift, scale, 1e-6))
    torch.library.opcheck(torch.ops.tessera.layernorm_modulate_backward.default,
                          (torch.randn_like(x), x.detach(), w.detach(), scale.detach(), 1e-6))


@pytest.mark.gpu  # the interpreter runs programs one by one: on CPU this could not fail
def test_deterministic_backward():
    """Fixed-order partial sums, no atomics. Only a GPU can break this (concurrent programs),
    so it runs only there: bench/gpu_session.sh's check step."""
    args = make_inputs(3, 50, 45, torch.float32, True)
    g = torch.randn(3, 50, 45, device=DEV)
    (o1, g1), (o2, g2) = run(layernorm_modulate_triton, args, g), run(layernorm_modulate_triton, args, g)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def several_programs_per_sample(monkeypatch):
    """On CPU the launcher gives each sample one program; force 2-row tiles and 4 rows per program (the GPU's
    layout: S programs per sample, a ragged last one, partial sums reduced over S) so that path is tested here."""
    import triton

    def tiles(B, N, D, device, backward):
        S = triton.cdiv(max(N, 1), 4)
        return 2, triton.next_power_of_2(max(D, 1)), 4, S, 1

    monkeypatch.setattr(kn, "_tiles", tiles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_programs_per_sample(monkeypatch, dtype):
    several_programs_per_sample(monkeypatch)
    args = make_inputs(3, 13, 45, dtype, True)
    g = torch.randn(3, 13, 45, device=DEV)
    out, grads = run(layernorm_modulate_triton, args, g)
    same, same_grads = run(layernorm_modulate_ref, args, g)
    ref, ref_grads = run(layernorm_modulate_ref, [a.double() for a in args], g.double())
    close_as_torch(out, same, ref, dtype, "out")
    for name, mine, t, r in zip(("dx", "dweight", "dshift", "dscale"), grads, same_grads, ref_grads):
        close_as_torch(mine, t, r, dtype, name)


def test_launcher_rejects_bad_inputs():
    x, w, shift, scale = make_inputs(2, 3, 8, torch.float32, True)
    with pytest.raises(ValueError, match="shift must be"):
        kn.layernorm_modulate_launch(x, w, shift[:1], scale, 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        kn.layernorm_modulate_launch(torch.randn(2, 8, 3, device=DEV).transpose(1, 2), w, shift, scale, 1e-6)
    with pytest.raises(ValueError, match="D=9000"):
        kn.layernorm_modulate_launch(torch.randn(1, 1, 9000), None, torch.randn(1, 9000), torch.randn(1, 9000), 1e-6)


def test_torch_fallback_when_triton_cannot_run_on_cpu(monkeypatch):
    """A CPU model on a CUDA machine (auto = triton there): the op computes the same values with torch."""
    monkeypatch.setattr(kn, "_use_triton", lambda t: False)
    args = [a if a is None else a.cpu() for a in make_inputs(2, 7, 10, torch.float32, True)]
    g = torch.randn(2, 7, 10)
    out, grads = run(layernorm_modulate_triton, args, g)
    ref, ref_grads = run(layernorm_modulate_ref, args, g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_registry_entries():
    assert {"torch", "triton", "auto"} <= set(kernels.backends("norm"))
    # auto = torch on every device: the H200 benches (bench/results/*_H200_kernels.json) time Triton slower fwd+bwd
    assert kernels.resolve_name("norm", "auto") == "torch"
    assert kernels.resolve("norm", "triton") is layernorm_modulate_triton


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,D", [(256, 256, 768), (256, 64, 1024), (64, 1024, 768), (8, 256, 1152)])
def test_triton_norm_at_microdit_xl_shapes(B, N, D):
    """Real shapes on the GPU in bf16: mixer (D=768, all tokens), backbone (D=1024, kept tokens), DiT-XL (1152)."""
    args = make_inputs(B, N, D, torch.bfloat16, True)
    g = torch.randn(B, N, D, device=DEV)
    out, grads = run(layernorm_modulate_triton, args, g)
    same, same_grads = run(layernorm_modulate_ref, args, g)
    ref, ref_grads = run(layernorm_modulate_ref, [a.double() for a in args], g.double())
    close_as_torch(out, same, ref, torch.bfloat16, "out")
    for name, mine, t, r in zip(("dx", "dweight", "dshift", "dscale"), grads, same_grads, ref_grads):
        close_as_torch(mine, t, r, torch.bfloat16, name)
