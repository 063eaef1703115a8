"""kernels.residual_norm: the Triton gated residual add + LayerNorm (+ adaLN modulate) against the torch reference
(TRITON_INTERPRET=1 on CPU). Same tolerance rule as tests/test_kernels_norm.py."""
import pytest
import torch

import tessera_kernels as kernels
import tessera_kernels.norm as kn
from tessera_kernels.residual_norm import (add_layernorm_modulate_launch, add_layernorm_modulate_ref,
                                   add_layernorm_modulate_triton)
from test_kernels_norm import DEV, SHAPES, close_as_torch, several_programs_per_sample

# (gate, modulation): the block's two uses (gated + plain LN before cross-attention; ungated + adaLN before the MLP)
# and the other two combinations.
VARIANTS = [(True, False), (False, True), (True, True), (False, False)]
NAMES = ("dx", "dy", "dgate", "dweight", "dshift", "dscale")


def make_inputs(B, N, D, dtype, gate, mod, weight=True):
    """x, y, and gate/shift/scale as the model passes them: strided chunks of one (B, 6·D) modulation tensor."""
    x = (torch.randn(B, N, D, device=DEV) * 2 + 0.5).to(dtype)
    y = torch.randn(B, N, D, device=DEV).to(dtype)
    w = (1 + 0.5 * torch.randn(D, device=DEV)).to(dtype) if weight else None
    shift, scale, g = torch.randn(B, 6 * D, device=DEV).to(dtype).chunk(6, dim=-1)[:3]  # (B, D), row stride 6·D
    return [x, y, g if gate else None, w, shift if mod else None, scale if mod else None]


def run(fn, args, gh, go):
    """Both outputs feed the loss, as in the block (h continues the residual stream, out feeds the next branch)."""
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    h, out = fn(*leaves, 1e-6)
    ((h * gh.to(h.dtype)).sum() + (out * go.to(out.dtype)).sum()).backward()
    return (h, out), [None if a is None else a.grad for a in leaves]


def check_against_reference(B, N, D, dtype, gate, mod):
    """Triton vs the fp64 reference for (h, out) and every gradient, with the same-dtype torch error as the yardstick."""
    args = make_inputs(B, N, D, dtype, gate, mod)
    gh, go = torch.randn(B, N, D, device=DEV), torch.randn(B, N, D, device=DEV)
    outs, grads = run(add_layernorm_modulate_triton, args, gh, go)
    ref_outs, ref_grads = run(add_layernorm_modulate_ref, [None if a is None else a.double() for a in args],
                              gh.double(), go.double())
    same_outs, same_grads = run(add_layernorm_modulate_ref, args, gh, go)
    for name, mine, same, ref in zip(("h", "out") + NAMES, outs + tuple(grads), same_outs + tuple(same_grads),
                                     ref_outs + tuple(ref_grads)):
        assert (mine is None) == (ref is None), name
        if ref is not None:
            assert mine.dtype == dtype and mine.shape == ref.shape, name
            close_as_torch(mine, same, ref, dtype, name)


@pytest.mark.parametrize("gate,mod", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,D", SHAPES)
def test_forward_and_backward_match_reference(B, N, D, dtype, gate, mod):
    check_against_reference(B, N, D, dtype, gate, mod)


@pytest.mark.parametrize("gate,mod", [(True, False), (False, True)])
def test_several_programs_per_sample(monkeypatch, gate, mod):
    several_programs_per_sample(monkeypatch)
    check_against_reference(3, 13, 45, torch.float32, gate, mod)


def test_without_weight():
    args = make_inputs(2, 9, 20, torch.float32, True, True, weight=False)
    gh, go = torch.randn(2, 9, 20, device=DEV), torch.randn(2, 9, 20, device=DEV)
    outs, grads = run(add_layernorm_modulate_triton, args, gh, go)
    ref_outs, ref_grads = run(add_layernorm_modulate_ref, args, gh, go)
    for mine, ref in zip(outs + tuple(grads), ref_outs + tuple(ref_grads)):
        if ref is not None:
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate,mod", VARIANTS)
def test_gradcheck_fp64(gate, mod):
    """fp64 inputs run the kernels with fp64 arithmetic, so finite differences check every gradient."""
    args = [None if a is None else a.double().requires_grad_() for a in make_inputs(2, 5, 6, torch.float32, gate, mod)]
    live = [i for i, a in enumerate(args) if a is not None]

    def fn(*tensors):
        full = list(args)
        for i, t in zip(live, tensors):
            full[i] = t
        return add_layernorm_modulate_triton(*full, 1e-5)

    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in live), fast_mode=True)


def test_opcheck_custom_ops():
    x, y, g, w, shift, scale = make_inputs(2, 7, 10, torch.float32, True, True)
    g, shift, scale = g.contiguous(), shift.contiguous(), scale.contiguous()
    args = tuple(t.requires_grad_() for t in (x, y, g, w, shift, scale)) + (1e-6,)
    torch.library.opcheck(torch.ops.tessera.add_layernorm_modulate.default, args)
    torch.library.opcheck(torch.ops.tessera.add_layernorm_modulate.default, (x, y, None, w, None, None, 1e-6))
    d = torch.randn_like(x)
    torch.library.opcheck(torch.ops.tessera.add_layernorm_modulate_backward.default,
                          (d, d.clone(), x.detach(), y.detach(), g.detach(), w.detach(), scale.detach(), True, 1e-6))


@pytest.mark.gpu  # the interpreter runs programs one by one: on CPU this could not fail
def test_deterministic_backward():
    """Fixed-order partial sums, no atomics. Only a GPU can break this (concurrent programs),
    so it runs only there: bench/gpu_session.sh's check step."""
    args = make_inputs(3, 50, 45, torch.float32, True, True)
    gh, go = torch.randn(3, 50, 45, device=DEV), torch.randn(3, 50, 45, device=DEV)
    (o1, g1), (o2, g2) = run(add_layernorm_modulate_triton, args, gh, go), run(add_layernorm_modulate_triton, args, gh, go)
    assert all(torch.equal(a, b) for a, b in zip(o1 + tuple(g1), o2 + tuple(g2)))


def test_launcher_rejects_bad_inputs():
    x, y, g, w, shift, scale = make_inputs(2, 3, 8, torch.float32, True, True)
    with pytest.raises(ValueError, match="both shift and scale"):
        add_layernorm_modulate_launch(x, y, g, w, shift, None, 1e-6)
    with pytest.raises(ValueError, match="y must be"):
        add_layernorm_modulate_launch(x, y.half(), g, w, shift, scale, 1e-6)
    with pytest.raises(ValueError, match="gate must be"):
        add_layernorm_modulate_launch(x, y, g[:1], w, shift, scale, 1e-6)


def test_torch_fallback_when_triton_cannot_run_on_cpu(monkeypatch):
    """A CPU model on a CUDA machine (auto = triton there): the op computes the same values with torch."""
    monkeypatch.setattr(kn, "_use_triton", lambda t: False)
    for gate, mod in VARIANTS:
        args = [a if a is None else a.cpu() for a in make_inputs(2, 7, 10, torch.float32, gate, mod)]
        gh, go = torch.randn(2, 7, 10), torch.randn(2, 7, 10)
        outs, grads = run(add_layernorm_modulate_triton, args, gh, go)
        ref_outs, ref_grads = run(add_layernorm_modulate_ref, args, gh, go)
        for mine, ref in zip(outs + tuple(grads), ref_outs + tuple(ref_grads)):
            assert (mine is None) == (ref is None)
            if ref is not None:
                torch.testing.assert_close(mine, ref)


def test_registry_follows_the_norm_flag():
    assert "residual_norm" not in kernels.ops()  # no config key of its own
    assert kernels.flag_backends({"norm": "triton"})["residual_norm"] == "triton"
    assert kernels.resolve("residual_norm", "triton") is add_layernorm_modulate_triton
    assert kernels.resolve_name("residual_norm", "auto") == kernels.resolve_name("norm", "auto")
    with pytest.raises(ValueError, match="kernels.norm: unknown backend 'fast'"):
        kernels.resolve("residual_norm", "fast")


@pytest.mark.gpu
@pytest.mark.parametrize("gate,mod", [(True, False), (False, True)])
@pytest.mark.parametrize("B,N,D", [(256, 256, 768), (256, 64, 1024), (8, 256, 1152)])
def test_triton_residual_norm_at_microdit_xl_shapes(B, N, D, gate, mod):
    check_against_reference(B, N, D, torch.bfloat16, gate, mod)
