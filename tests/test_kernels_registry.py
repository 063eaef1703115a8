"""The op registry and the torch reference ops every faster backend will be compared against."""
import pytest
import torch
import torch.nn.functional as F

import tessera_kernels as kernels
from tessera_kernels.gather import gather_tokens_ref
from tessera_kernels.moe import expert_choice_ref
from tessera_kernels.norm import layernorm_modulate_ref


def test_auto_resolves_and_unknown_names_the_flag_and_choices():
    assert kernels.resolve_name("attention", "auto") == "sdpa"
    with pytest.raises(ValueError, match=r"kernels\.moe: unknown backend 'megablocks2'; choices: .*torch"):
        kernels.resolve("moe", "megablocks2")
    with pytest.raises(ValueError, match="unknown op"):
        kernels.resolve("conv", "torch")


@pytest.mark.parametrize("B,N,K,D", [(1, 1, 1, 1), (2, 64, 16, 33), (3, 17, 17, 8)])
def test_gather_forward_and_backward_scatter_into_zeros(B, N, K, D):
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(N)[:K] for _ in range(B)])
    out = gather_tokens_ref(x, idx)
    for b in range(B):
        assert torch.equal(out[b], x[b, idx[b]])
    g = torch.randn_like(out)
    out.backward(g)
    expected = torch.zeros(B, N, D, dtype=torch.float64)
    for b in range(B):
        expected[b, idx[b]] += g[b]
    assert torch.equal(x.grad, expected)


def naive_expert_choice(x, router_weight, w1, w2, k):
    """Per-sample, per-expert loop: the definition, with no batching tricks."""
    B, T, D = x.shape
    out = torch.zeros_like(x)
    probs = torch.softmax(x @ router_weight.T, dim=-1)  # (B, T, E)
    for b in range(B):
        for e in range(router_weight.shape[0]):
            gate, tok = torch.topk(probs[b, :, e], k)
            h = F.gelu(x[b, tok] @ w1[e]) @ w2[e]
            out[b].index_add_(0, tok, gate[:, None] * h)
    return out


@pytest.mark.parametrize("B,T,D,F_,E,k", [(1, 1, 4, 8, 1, 1), (2, 16, 12, 20, 4, 8), (3, 9, 5, 7, 3, 2), (2, 8, 6, 4, 8, 2)])
def test_expert_choice_matches_per_expert_loop_forward_and_backward(B, T, D, F_, E, k):
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in [(B, T, D), (E, D), (E, D, F_), (E, F_, D)]]
    out = expert_choice_ref(*args, k)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    ref = naive_expert_choice(*ref_args, k)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for a, r in zip(args, ref_args):  # router gradient included
        torch.testing.assert_close(a.grad, r.grad)


def test_every_expert_takes_exactly_k_tokens():
    """kernels.moe.route picks, per sample and expert, the k tokens with the highest router probability (softmax over
    experts), all distinct; combine_plan maps every slot back to its token exactly once."""
    from tessera_kernels.moe import combine_plan, route

    B, T, D, E, k = 2, 32, 8, 4, 16
    x, router = torch.randn(B, T, D), torch.randn(E, D)
    gate, token = route(x, router, k)
    assert gate.shape == token.shape == (B, E, k)
    probs = torch.softmax(x @ router.T, dim=-1)  # (B, T, E)
    for b in range(B):
        for e in range(E):
            assert token[b, e].unique().numel() == k  # k distinct tokens per expert
            chosen = set(token[b, e].tolist())
            worst_chosen = probs[b, token[b, e], e].min()
            others = [t for t in range(T) if t not in chosen]
            assert (probs[b, others, e] <= worst_chosen).all()  # no unchosen token beats a chosen one
            torch.testing.assert_close(gate[b, e], probs[b, token[b, e], e])
    dest, offsets, entries = combine_plan(token, T)
    assert dest.numel() == entries.numel() == E * B * k and sorted(entries.tolist()) == list(range(E * B * k))
    counts = offsets[1:] - offsets[:-1]  # experts per token
    assert counts.sum() == E * B * k and counts.max() <= E
    for t_global in range(B * T):  # each token's entries are exactly the slots whose destination is that token
        slots = entries[offsets[t_global]:offsets[t_global + 1]]
        assert (dest[slots] == t_global).all() and counts[t_global] == (dest == t_global).sum()


def test_expert_choice_rejects_impossible_k():
    with pytest.raises(ValueError, match="tokens per expert"):
        expert_choice_ref(torch.randn(1, 4, 2), torch.randn(2, 2), torch.randn(2, 2, 3), torch.randn(2, 3, 2), 5)


def test_layernorm_modulate_matches_definition():
    x, w = torch.randn(3, 7, 10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    shift, scale = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mu) / torch.sqrt(var + 1e-6) * w * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(layernorm_modulate_ref(x, w, shift, scale, 1e-6), expected)


@pytest.mark.parametrize("Nk", [1, 2, 5, 77])
def test_sdpa_backend_matches_math_reference_with_padding(Nk):
    attn_sdpa, attn_ref = kernels.resolve("attention", "sdpa"), kernels.resolve("attention", "torch")
    q, k, v = torch.randn(2, 3, 9, 16), torch.randn(2, 3, Nk, 16), torch.randn(2, 3, Nk, 16)
    valid = max(1, Nk // 2)  # keys of sample 1 from here on are padding (none when Nk = 1)
    mask = torch.arange(Nk)[None] < torch.tensor([[Nk], [valid]])
    torch.testing.assert_close(attn_sdpa(q, k, v, mask), attn_ref(q, k, v, mask), atol=1e-5, rtol=1e-4)
    if valid == Nk:
        return
    # padded keys really are ignored by both: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, :, valid:] = 100.0
    v2[1, :, valid:] = -100.0
    for attn in (attn_sdpa, attn_ref):
        torch.testing.assert_close(attn(q, k2, v2, mask), attn(q, k, v, mask), atol=1e-5, rtol=1e-4)
