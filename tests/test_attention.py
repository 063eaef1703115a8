"""Attention backends (kernels.attention) against the fp32 reference: forward and backward over shape tables.

Pass rule (docs/DESIGN.md convention 2): a backend's max error against the fp32 reference is at most 2x the error of plain
PyTorch in the same dtype, plus a small dtype atol. Triton runs through TRITON_INTERPRET=1 here (root conftest);
shapes are small and each program gets 64x64 tiles so the whole file stays quick on 2 CPU cores.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn as nn

import tessera_kernels as kernels
from tessera_kernels.attention import (
    attention_flash_attn, attention_ref, attention_sdpa, attention_xformers, packed_key_index, sdpa_backend_used,
)
from tessera_kernels.attention_triton import attention_triton, flash_attention_bwd, flash_attention_fwd

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
BACKENDS = {"triton": attention_triton, "sdpa": attention_sdpa}


# ------------------------------------------------------------------------------------------------ helpers
def make_mask(kind: str, B: int, Nk: int, gen: torch.Generator) -> torch.Tensor | None:
    """none | all (every key valid) | lens (random per-batch lengths) | one (all but one key padded) | holes."""
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(B, Nk, dtype=torch.bool)
    if kind == "lens":
        lens = torch.randint(1, Nk + 1, (B,), generator=gen)
        lens[0] = max(1, Nk - 1) if Nk > 1 else 1  # at least one batch with a ragged tail
        return torch.arange(Nk)[None] < lens[:, None]
    if kind == "one":
        mask = torch.zeros(B, Nk, dtype=torch.bool)
        mask[torch.arange(B), torch.randint(0, Nk, (B,), generator=gen)] = True
        return mask
    if kind == "holes":
        mask = torch.rand(B, Nk, generator=gen) < 0.6
        mask[:, 0] = True
        return mask
    raise ValueError(kind)


def make_inputs(B, H, Nq, Nk, D, dtype, seed=0):
    """Fresh random q, k, v (leaves, requiring grad) and an upstream gradient; never zeros."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for n in (Nq, Nk, Nk))
    grad = torch.randn(B, H, Nq, D, generator=gen)
    cast = lambda t: t.to(DEVICE, dtype).requires_grad_()
    return cast(q), cast(k), cast(v), grad.to(DEVICE, dtype), gen


def attention_same_dtype(q, k, v, key_padding_mask=None):
    """Plain PyTorch in the inputs' own dtype: what 'the same-dtype PyTorch error' is measured on."""
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if key_padding_mask is not None:
        safe = key_padding_mask | ~key_padding_mask.any(-1, keepdim=True)
        s = s.masked_fill(~safe[:, None, None, :], float("-inf"))
    out = s.softmax(-1) @ v
    if key_padding_mask is not None:
        out = torch.where(key_padding_mask.any(-1)[:, None, None, None], out, out.new_zeros(()))
    return out


def run(fn, q, k, v, mask, grad, **kw):
    """(out, dq, dk, dv) of fn on fresh leaf copies of q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, mask, **kw)
    return (out, *torch.autograd.grad(out, leaves, grad.to(out.dtype)))


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against_reference(fn, q, k, v, mask, grad, factor=2.0, **kw):
    """Forward and the three gradients of `fn` within `factor` x the same-dtype PyTorch error (+ atol) of fp32 math."""
    up = lambda t: t.detach().float()
    ref = run(attention_ref, up(q), up(k), up(v), mask, grad.float())
    base = run(attention_same_dtype, q, k, v, mask, grad)
    got = run(fn, q, k, v, mask, grad, **kw)
    for name, g, b, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        assert g.shape == r.shape and g.dtype == q.dtype, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        bound = factor * max_err(b, r) + ATOL[q.dtype]
        assert max_err(g, r) <= bound, f"{name}: error {max_err(g, r):.3g} > {bound:.3g} (torch {max_err(b, r):.3g})"
    return got


# ------------------------------------------------------------------------------------------------ shape table
# (B, H, Nq, Nk, Dh): every Nq/Nk in {1, 7, 64, 77, 130}, head dims 32/64/128, batch 1 and 2, 1-3 heads.
SHAPES = [
    (1, 1, 1, 1, 32), (2, 3, 7, 77, 64), (1, 2, 64, 64, 128), (2, 1, 77, 130, 32), (2, 2, 130, 7, 64),
    (1, 1, 130, 130, 128), (2, 1, 1, 64, 64), (1, 3, 64, 1, 32), (2, 2, 77, 77, 32), (1, 2, 7, 130, 128),
]
MASKS = ["none", "all", "lens", "one"]
# each shape runs in fp32 with one mask kind and in fp16 with another, so that every kind meets both dtypes
CASES = [
    pytest.param(*shape, dtype, kind, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{kind}")
    for i, shape in enumerate(SHAPES) for j, dtype in ((0, torch.float32), (2, torch.float16))
    for kind in [MASKS[(i + j) % 4]]
]


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("B,H,Nq,Nk,D,dtype,mask_kind", CASES)
def test_forward_backward_match_fp32_reference(backend, B, H, Nq, Nk, D, dtype, mask_kind):
    q, k, v, grad, gen = make_inputs(B, H, Nq, Nk, D, dtype, seed=Nq * 1000 + Nk + D)
    mask = make_mask(mask_kind, B, Nk, gen)
    # CPU SDPA's own fp16 backward rounds a little more than plain fp16 autograd (measured up to 3x on dV): it is
    # torch's numerics, not the wrapper's, so it gets a looser factor; the wrapper's masking is what is tested.
    factor = 4.0 if backend == "sdpa" and DEVICE.type == "cpu" else 2.0
    check_against_reference(BACKENDS[backend], q, k, v, None if mask is None else mask.to(DEVICE), grad, factor)


@pytest.mark.parametrize("B,H,Nq,Nk,D,mask_kind", [(2, 2, 77, 77, 64, "lens"), (1, 1, 130, 7, 32, "one"),
                                                   (2, 1, 7, 130, 128, "none")])
def test_bf16(B, H, Nq, Nk, D, mask_kind):
    """bf16 in, fp32 accumulation (the interpreter does bf16 dots in fp32: its bf16 tl.dot is wrong)."""
    q, k, v, grad, gen = make_inputs(B, H, Nq, Nk, D, torch.bfloat16, seed=7)
    mask = make_mask(mask_kind, B, Nk, gen)
    check_against_reference(attention_triton, q, k, v, None if mask is None else mask.to(DEVICE), grad)


@pytest.mark.parametrize("D", [16, 48, 72])
def test_head_dims_that_are_not_32_64_128(D):
    """Any Dh <= 128 works (tiles pad to the next power of two); 72 is DiT-XL/2's head dim."""
    q, k, v, grad, gen = make_inputs(2, 1, 65, 33, D, torch.float16, seed=D)
    check_against_reference(attention_triton, q, k, v, make_mask("holes", 2, 33, gen).to(DEVICE), grad)


def test_scattered_mask_and_kv_lens_and_model_layout():
    """A mask with holes (not a prefix), per-batch lengths instead of a mask, and q/k/v as the model passes them:
    head-split views of (B, N, H, Dh) memory, not contiguous."""
    B, H, N, L, D = 2, 2, 70, 20, 32
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, N, 3, H, D, generator=gen).to(DEVICE)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, D) views, stride(2) = 3·H·D
    grad = torch.randn(B, H, N, D, generator=gen).to(DEVICE)
    assert not q.is_contiguous()
    check_against_reference(attention_triton, q, k, v, make_mask("holes", B, N, gen).to(DEVICE), grad)
    out = attention_triton(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # merging heads afterwards is a free view

    lens = torch.tensor([L - 3, L], device=DEVICE)
    kq, kk, kv, g, _ = make_inputs(B, H, N, L, D, torch.float32, seed=4)
    by_mask = run(attention_triton, kq, kk, kv, torch.arange(L, device=DEVICE)[None] < lens[:, None], g)
    by_lens = run(lambda *a: attention_triton(*a[:3], kv_lens=lens), kq, kk, kv, None, g)
    for a, b in zip(by_mask, by_lens):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_padded_rows_give_zeros_and_finite_grads(backend, dtype):
    fn = {**BACKENDS, "torch": attention_ref}[backend]
    B, H, Nq, Nk, D = 3, 2, 9, 77, 32
    q, k, v, grad, _ = make_inputs(B, H, Nq, Nk, D, dtype, seed=11)
    mask = torch.ones(B, Nk, dtype=torch.bool, device=DEVICE)
    mask[1] = False  # batch 1: every key padded
    mask[2, 5:] = False
    out, dq, dk, dv = run(fn, q, k, v, mask, grad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dk[2, :, 5:] == 0).all() and (dv[2, :, 5:] == 0).all()  # padded keys get no gradient
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0


def test_degenerate_sizes():
    """No keys at all gives zeros; an empty batch gives an empty result."""
    q, k, v, grad, _ = make_inputs(2, 1, 5, 0, 32, torch.float32)
    out, dq, dk, dv = run(attention_triton, q, k, v, None, grad)
    assert out.shape == (2, 1, 5, 32) and (out == 0).all() and (dq == 0).all() and dk.shape == (2, 1, 0, 32)
    q, k, v, grad, _ = make_inputs(0, 2, 5, 3, 32, torch.float32)
    assert attention_triton(q, k, v).shape == (0, 2, 5, 32)


def test_triton_rejects_bad_inputs_with_clear_errors():
    q = torch.randn(1, 2, 4, 32, device=DEVICE)
    with pytest.raises(TypeError, match="kernels.attention=triton.*fp32/fp16/bf16"):
        attention_triton(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="head dim 256 > 128"):
        big = torch.randn(1, 1, 4, 256, device=DEVICE)
        attention_triton(big, big, big)
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        attention_triton(q, q, q, torch.ones(1, 4, device=DEVICE))
    with pytest.raises(ValueError, match="shapes do not match"):
        attention_triton(q, q[:, :1], q[:, :1])


# ------------------------------------------------------------------------------------------------ torch.library
def test_custom_op_passes_opcheck():
    q, k, v, grad, gen = make_inputs(2, 1, 9, 13, 32, torch.float32, seed=5)
    mask = make_mask("holes", 2, 13, gen).to(DEVICE)
    lens = torch.tensor([13, 9], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(flash_attention_fwd, (q, k, v, mask, lens))
    out, lse = flash_attention_fwd(q.detach(), k.detach(), v.detach(), mask, lens)
    torch.library.opcheck(flash_attention_bwd, (grad, q.detach(), k.detach(), v.detach(), out, lse, mask, lens))


class TinyAttention(nn.Module):
    """qkv projection -> heads -> attention_triton -> merge -> projection: what torch.compile must trace whole."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, mask):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).unbind(2)  # (B, N, heads, Dh) each
        out = attention_triton(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # (B, heads, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def test_torch_compile_fullgraph_traces_through_the_custom_op():
    torch.manual_seed(0)
    m = TinyAttention().to(DEVICE)
    x = torch.randn(2, 20, 64, device=DEVICE)
    mask = torch.arange(20, device=DEVICE)[None] < torch.tensor([[20], [11]], device=DEVICE)
    eager = m(x, mask)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(m.parameters()))
    torch._dynamo.reset()
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"  # CPU: skip C++ codegen, still fake + AOT autograd
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    out = compiled(x, mask)
    grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ whole model
def test_tiny_microdit_same_output_and_grads_with_triton_attention():
    from models.sizes import build_model, model_config

    cfg = model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8)
    torch.manual_seed(0)
    ref = build_model(cfg, {"attention": "torch"}).to(DEVICE)
    tri = build_model(cfg, {"attention": "triton"}).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    for p in ref.parameters():  # adaLN-Zero starts at zero: perturb so every attention path carries signal
        p.data.add_(0.05 * torch.randn_like(p))
    tri.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    B, L = 2, 6
    x = torch.randn(B, 3, cfg.input_size, cfg.input_size, generator=gen).to(DEVICE)
    t, y = torch.randn(B, generator=gen).to(DEVICE), torch.randn(B, L, 8, generator=gen).to(DEVICE)
    y_mask = (torch.arange(L)[None] < torch.tensor([[L], [3]])).to(DEVICE)
    keep = torch.stack([torch.randperm(cfg.num_patches, generator=gen)[: cfg.num_patches // 2] for _ in range(B)])
    outs, grads = [], []
    for m in (ref, tri):
        out = m(x, t, y, y_mask, keep.to(DEVICE))
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().mean(), list(m.parameters()), allow_unused=True))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    for (name, _), a, b in zip(ref.named_parameters(), grads[1], grads[0]):
        if b is None:
            assert a is None, name
            continue
        # relative to each parameter's own gradient scale: the q/k weights' gradients are tiny (near-uniform
        # softmax), and a fixed atol would let a broken dQ/dK pass
        scale = max(b.abs().max().item(), 1e-12)
        torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=1e-3, msg=lambda s: f"{name}: {s}")


# ------------------------------------------------------------------------------------------------ registry, sdpa
def test_registry_names_every_backend_and_auto_stays_sdpa():
    assert set(kernels.backends("attention")) == {"auto", "sdpa", "flash_attn", "xformers", "triton", "torch"}
    assert kernels.resolve_name("attention", "auto") == "sdpa"
    assert "triton" in kernels.available_backends("attention")  # CUDA, or TRITON_INTERPRET=1 (conftest on CPU)
    for name, package in (("flash_attn", "flash_attn"), ("xformers", "xformers")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ValueError, match=rf"kernels\.attention: backend '{name}' is not usable here \(.*not "
                                                 rf"installed\); available: .*sdpa"):
                kernels.resolve("attention", name)


def test_flash_attn_wants_half_precision():
    q = torch.randn(1, 1, 4, 32)
    with pytest.raises(TypeError, match="flash_attn needs fp16 or bf16"):
        attention_flash_attn(q, q, q)


def test_packed_key_index_packs_valid_keys_without_a_sync():
    gen = torch.Generator().manual_seed(2)
    B, Nk = 4, 9
    mask = make_mask("holes", B, Nk, gen)
    mask[2] = False
    k = torch.randn(B, Nk, 3, generator=gen)
    cu = torch.nn.functional.pad(mask.sum(-1).cumsum(0), (1, 0))
    packed = torch.cat([k.reshape(B * Nk, 3), k.new_zeros(1, 3)]).index_select(0, packed_key_index(mask, cu))
    total = int(cu[-1])
    assert torch.equal(packed[:total], k[mask]) and (packed[total:] == 0).all()


def test_sdpa_reports_the_kernel_it_uses_once_per_signature():
    import tessera_kernels.attention as ka

    q, k, v, _, gen = make_inputs(2, 2, 16, 8, 32, torch.float32)
    mask = make_mask("lens", 2, 8, gen).to(DEVICE)
    ka._SDPA_CHOICES.clear()
    asked = []
    real = torch._fused_sdp_choice
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "_fused_sdp_choice", lambda *a, **kw: asked.append(1) or real(*a, **kw))
        name = sdpa_backend_used(q, k, v, mask)
        valid = {"flash", "cudnn", "efficient", "math"} if DEVICE.type == "cuda" else {"cpu-flash", "math"}
        assert name in valid
        assert sdpa_backend_used(q, k, v, mask) == name and len(asked) == 1  # the second call reads the cache
        sdpa_backend_used(q[:, :, :5], k, v, mask)  # another signature asks torch again
        assert len(asked) == 2


# ------------------------------------------------------------------------------------------------ GPU-only backends
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
@pytest.mark.parametrize("B,H,Nq,Nk,D,mask_kind", [(2, 3, 77, 130, 64, "lens"), (1, 2, 64, 64, 128, "none"),
                                                   (2, 1, 130, 7, 32, "one"), (2, 2, 7, 77, 64, "all")])
def test_gpu_backends_match_reference(backend, B, H, Nq, Nk, D, mask_kind):
    pytest.importorskip("flash_attn" if backend == "flash_attn" else "xformers")
    fn = {"flash_attn": attention_flash_attn, "xformers": attention_xformers}[backend]
    q, k, v, grad, gen = make_inputs(B, H, Nq, Nk, D, torch.bfloat16, seed=21)
    mask = make_mask(mask_kind, B, Nk, gen)
    check_against_reference(fn, q, k, v, None if mask is None else mask.to(DEVICE), grad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_gpu_backends_fully_padded_rows(backend):
    pytest.importorskip("flash_attn" if backend == "flash_attn" else "xformers")
    fn = {"flash_attn": attention_flash_attn, "xformers": attention_xformers}[backend]
    q, k, v, grad, _ = make_inputs(2, 2, 9, 16, 64, torch.bfloat16, seed=3)
    mask = torch.ones(2, 16, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out, dq, dk, dv = run(fn, q, k, v, mask, grad)
    assert (out[1] == 0).all() and all(torch.isfinite(g).all() for g in (out, dq, dk, dv))
