"""kernels.moe: the Triton expert-choice MoE (TRITON_INTERPRET=1 on CPU) against the torch reference, its determinism
and custom ops; and a whole tiny MicroDiT with every Triton backend against the same model with torch backends.

Tolerance (docs/DESIGN.md convention 2): error vs the reference in fp64 at most 2x the error of PyTorch in the same dtype,
plus a small dtype atol (relative to the largest reference value). Both backends route with the same torch ops, so a
near-tie that flips a token choice in one dtype flips it in the other as well."""
import pytest
import torch

import tessera_kernels as kernels
import tessera_kernels.moe as km
from engine.diffusion.edm import EDM
from engine.diffusion.noise import draw_step_noise
from tessera_kernels.moe import combine_plan, expert_choice_ref, expert_choice_triton, route
from models.sizes import build_model, model_config

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (B, T, D, F, E, k): E = 1, k = 1, k = T, batch 1, D not a multiple of 16, capacity 2 (k = 2T/E), 8 experts
# The last one spans several combine programs (B·T > BLOCK_M rows) and several D chunks (768 = 3 × 256), as XL does.
SHAPES = [(1, 1, 4, 8, 1, 1), (2, 16, 12, 20, 4, 8), (3, 9, 5, 7, 3, 2), (2, 8, 6, 4, 8, 2), (1, 10, 33, 40, 1, 10),
          (2, 64, 24, 48, 8, 16), (2, 300, 768, 32, 4, 150)]


def make_args(B, T, D, F_, E, dtype=torch.float32):
    shapes = [(B, T, D), (E, D), (E, D, F_), (E, F_, D)]
    return [(torch.randn(*s, device=DEV) / (s[-2] ** 0.5 if len(s) == 3 and s != (B, T, D) else 1)).to(dtype)
            for s in shapes]


def run(fn, args, k, g):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*leaves, k)
    out.backward(g.to(out.dtype))
    return out, [a.grad for a in leaves]


def close_as_torch(mine, same_dtype_torch, ref, dtype, what):
    err = (mine.double() - ref).abs().max().item()
    base = (same_dtype_torch.double() - ref).abs().max().item()
    bound = 2 * base + ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (torch {dtype} error {base:.3e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,D,F_,E,k", SHAPES)
def test_forward_and_backward_match_reference(B, T, D, F_, E, k, dtype):
    args = make_args(B, T, D, F_, E, dtype)
    g = torch.randn(B, T, D, device=DEV)
    out, grads = run(expert_choice_triton, args, k, g)
    assert out.dtype == dtype and out.shape == (B, T, D)
    same, same_grads = run(expert_choice_ref, args, k, g)
    ref, ref_grads = run(expert_choice_ref, [a.double() for a in args], k, g.double())
    close_as_torch(out, same, ref, dtype, "out")
    for name, mine, t, r in zip(("dx", "drouter", "dw1", "dw2"), grads, same_grads, ref_grads):  # router included
        assert mine.dtype == dtype
        close_as_torch(mine, t, r, dtype, name)


def test_gradcheck_fp64():
    """fp64 runs the Triton dispatch/combine with fp64 accumulation: finite differences check x, router, w1, w2."""
    args = tuple(a.double().requires_grad_() for a in make_args(2, 6, 4, 5, 3))
    assert torch.autograd.gradcheck(lambda *a: expert_choice_triton(*a, 3), args, fast_mode=True)


@pytest.mark.gpu  # the interpreter runs programs one by one: on CPU this could not fail
def test_combine_is_deterministic_bit_for_bit():
    """No atomics: two runs give identical outputs and gradients. Only a GPU can break this (its programs run
    concurrently), so it runs only there: bench/gpu_session.sh's check step."""
    args = make_args(3, 64, 40, 24, 8)
    g = torch.randn(3, 64, 40, device=DEV)
    (o1, g1), (o2, g2) = run(expert_choice_triton, args, 16, g), run(expert_choice_triton, args, 16, g)
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("B,T,E,k", [(1, 1, 1, 1), (2, 16, 4, 8), (3, 9, 8, 9)])
def test_combine_plan_is_the_inverse_map(B, T, E, k):
    x, router = torch.randn(B, T, 5, device=DEV), torch.randn(E, 5, device=DEV)
    _, token = route(x, router, k)  # (B, E, k)
    dest, offsets, entries = combine_plan(token, T)
    assert dest.shape == entries.shape == (E * B * k,) and offsets.shape == (B * T + 1,)
    assert offsets[0] == 0 and offsets[-1] == E * B * k and bool((offsets[1:] >= offsets[:-1]).all())
    assert int((offsets[1:] - offsets[:-1]).max()) <= E  # an expert takes a token at most once
    for t in range(B * T):
        slots = entries[offsets[t]:offsets[t + 1]]
        assert bool((dest[slots] == t).all()) and bool((slots[1:] > slots[:-1]).all())  # fixed order: by slot
    b, e, j = 1 % B, E - 1, k - 1  # slot r = e·B·k + b·k + j holds token b·T + token[b, e, j]
    assert dest[e * B * k + b * k + j] == b * T + token[b, e, j]


def test_opcheck_custom_ops():
    B, T, D, E, k = 2, 6, 5, 3, 4
    x = torch.randn(B, T, D, device=DEV, requires_grad=True)
    _, token = route(x.detach(), torch.randn(E, D, device=DEV), k)
    dest, offsets, entries = combine_plan(token, T)
    y = torch.randn(E, B * k, D, device=DEV, requires_grad=True)
    gate = torch.rand(E, B * k, device=DEV, requires_grad=True)
    ops = torch.ops.tessera
    torch.library.opcheck(ops.moe_dispatch.default, (x, dest, offsets, entries, E))
    torch.library.opcheck(ops.moe_combine.default, (y, gate, dest, offsets, entries, B, T))
    torch.library.opcheck(ops.moe_combine.default, (y, None, dest, offsets, entries, B, T))
    torch.library.opcheck(ops.moe_combine_backward.default, (torch.randn(B, T, D, device=DEV), y.detach(),
                                                             gate.detach(), dest))


def test_torch_fallback_when_triton_cannot_run_on_cpu(monkeypatch):
    """A CPU model on a CUDA machine (auto = triton there): the ops compute the same values with torch."""
    monkeypatch.setattr(km, "use_triton", lambda t: False)
    args = [a.cpu() for a in make_args(2, 16, 12, 20, 4)]
    g = torch.randn(2, 16, 12)
    out, grads = run(expert_choice_triton, args, 8, g)
    ref, ref_grads = run(expert_choice_ref, args, 8, g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_registry_entries_and_megablocks_reason():
    assert {"torch", "triton", "megablocks", "auto"} <= set(kernels.backends("moe"))
    assert kernels.resolve_name("moe", "auto") == "torch"  # on every device: the H200 benches (tessera_kernels/)
    with pytest.raises(ValueError, match=r"kernels\.moe: backend 'megablocks' is not usable here \(megablocks"):
        kernels.resolve("moe", "megablocks")
    assert kernels.resolve("moe", "triton") is expert_choice_triton


# ---- whole model ---------------------------------------------------------------------------------------------------
TORCH = {"gather": "torch", "moe": "torch", "norm": "torch", "attention": "torch"}
TRITON = {"gather": "triton", "moe": "triton", "norm": "triton", "attention": "triton"}


def nano_models(**overrides):
    """MicroDiT_Nano_4 with torch and with triton backends, same weights, moved off the zero init."""
    cfg = model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8, **overrides)
    torch.manual_seed(0)
    ref = build_model(cfg, TORCH).to(DEV)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fast = build_model(cfg, TRITON).to(DEV)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def loss_and_grads(model, batch):
    x0, y, mask, noise = batch
    model.zero_grad(set_to_none=True)
    loss = EDM(sigma_data=0.5).loss(model, x0, y, mask, noise)  # masked forward + loss-side gather of targets
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def nano_batch(model, B=2, L=5):
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).to(DEV)
    y = torch.randn(B, L, cfg.caption_channels, generator=gen).to(DEV)
    mask = (torch.arange(L)[None] < torch.tensor([[L], [2]])).to(DEV)
    noise = draw_step_noise(EDM(), 0, 0, B, (cfg.in_channels, cfg.input_size, cfg.input_size), cfg.num_patches,
                            0.75, 0.0, torch.device(DEV))
    return x0, y, mask, noise


def test_microdit_nano_with_triton_backends_matches_torch_backends():
    ref, fast = nano_models()
    batch = nano_batch(ref)
    assert fast.gather_fn is kernels.resolve("gather", "triton")
    loss_r, grads_r = loss_and_grads(ref, batch)
    loss_f, grads_f = loss_and_grads(fast, batch)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    for name, g in grads_r.items():
        assert grads_f[name] is not None, name
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().max().item()), msg=name)


def test_microdit_nano_with_triton_backends_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the model through the custom ops (fake + autograd registrations);
    aot_eager runs the traced forward and backward graphs without code generation, so this stays fast on CPU."""
    _, fast = nano_models(depth=3)  # a shorter backbone (tracing time is per block), still with an MoE block
    assert any(hasattr(b.mlp, "gate") for b in fast.blocks)
    x0, y, mask, noise = nano_batch(fast)
    x_noisy = x0 + noise.noise * noise.sigma.view(-1, 1, 1, 1)
    c_noise = noise.sigma.log() / 4
    eager = fast(x_noisy, c_noise, y, mask, noise.keep_idx)
    params = [p for p in fast.parameters() if p.requires_grad]
    eager_grads = torch.autograd.grad(eager.square().mean(), params)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    out = compiled(x_noisy, c_noise, y, mask, noise.keep_idx)
    torch.testing.assert_close(out, eager)
    for g, want in zip(torch.autograd.grad(out.square().mean(), params), eager_grads):  # the traced backward, too
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6 * max(1.0, want.abs().max().item()))


@pytest.mark.gpu
@pytest.mark.parametrize("D,F_", [(1024, 1024), (1024, 4096), (768, 1536)])
def test_triton_moe_at_microdit_xl_shapes(D, F_):
    """8 experts, capacity 2, backbone D=1024 (64 kept tokens, k=16) and mixer D=768 on the GPU in bf16, forward and
    backward; deterministic."""
    B, T, E, k = 32, 64, 8, 16
    args = make_args(B, T, D, F_, E, torch.bfloat16)
    g = torch.randn(B, T, D, device=DEV)
    out, grads = run(expert_choice_triton, args, k, g)
    same, same_grads = run(expert_choice_ref, args, k, g)
    ref, ref_grads = run(expert_choice_ref, [a.double() for a in args], k, g.double())
    close_as_torch(out, same, ref, torch.bfloat16, "out")
    for name, mine, t, r in zip(("dx", "drouter", "dw1", "dw2"), grads, same_grads, ref_grads):
        close_as_torch(mine, t, r, torch.bfloat16, name)
    out2, grads2 = run(expert_choice_triton, args, k, g)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
