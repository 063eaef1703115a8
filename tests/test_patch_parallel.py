"""Patch-parallel sampling (engine/sampling/parallel_sample.py) in 2 gloo processes against one process.

One launch of tests/parallel_worker.py runs every sampling job on a random-weight model; the tests compare its images
with references computed here: `sample()` in one process, and an independent one-process simulation of displaced
patch parallelism (tests/test_patch_parallel_runs.py holds a trained model, the command line and failures).
"""
import types

import parallel_worker as pw
import pytest
import torch
import torch.nn.functional as F

from models.layers import SelfAttention, attend
from models.moe import ExpertChoiceMoE

WORLD = 2
# fp32 round-off of the same computation split differently: rounding (eps 1.2e-7) of matrix products over other
# batch and token counts, amplified by ~10 evaluations and guidance. Measured up to 9e-6 of the image's largest value.
ROUND_OFF = 2e-5
SOLVERS = {"heun": dict(solver="heun", nfe=7), "dpmpp": dict(solver="dpmpp", nfe=6),
           "unipc": dict(solver="unipc", nfe=6)}

pytestmark = pytest.mark.slow


def tolerance(ref: torch.Tensor) -> float:
    return ROUND_OFF * ref.abs().max().item()


# ---------------------------------------------------------------- the displaced schedule, simulated in one process


class Simulated:
    """DistriFusion simulated in one full-image forward, independently of engine/sampling/: the queries of band b see
    band b's fresh keys/values and the other bands' of the previous evaluation (all fresh in the first `warmup`
    evaluations; only band b's own with kv='none'); expert choice routes band b's tokens by top-k over fresh or stale
    scores as `routing` says. Entered, it replaces the forwards of the model's attention and MoE layers."""

    def __init__(self, model, bands: int, warmup: int, kv: str, routing: str):
        self.model, self.warmup, self.kv, self.routing = model, warmup, kv, routing
        n = model.cfg.num_patches // bands
        self.slices = [slice(b * n, (b + 1) * n) for b in range(bands)]
        self.evals, self.fresh, self.prev = 0, {}, {}

    def __enter__(self):
        self.hook = self.model.register_forward_pre_hook(lambda *_: self.next_eval())
        blocks = [*self.model.patch_mixer, *self.model.blocks]  # not the caption refiner: captions are not split
        self.layers = [m for b in blocks for m in (b.attn, b.mlp) if isinstance(m, (SelfAttention, ExpertChoiceMoE))]
        for i, m in enumerate(self.layers):
            fn = self.moe if isinstance(m, ExpertChoiceMoE) else self.attention
            m.forward = types.MethodType(lambda mod, x, fn=fn, i=i: fn(mod, x, i), m)
        if self.model.cfg.pixel_head and self.kv == "none":  # with no exchange, the head sees its band alone
            head = self.model.pixel_head
            self.layers.append(head)
            head.forward = types.MethodType(lambda mod, out, x, c: self.head_by_band(mod, out, x, c), head)
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        for m in self.layers:
            del m.forward

    def head_by_band(self, head, out, x, c):
        bands = len(self.slices)
        parts = [type(head).forward(head, o, xb, c) for o, xb in zip(out.chunk(bands, dim=2), x.chunk(bands, dim=2))]
        return torch.cat(parts, dim=2)

    def next_eval(self):
        self.evals, self.prev, self.fresh = self.evals + 1, self.fresh, {}

    def mixed(self, i, fresh, sl):
        """The whole image's tensor band `sl` sees: its own fresh part, the rest fresh or stale."""
        self.fresh[i] = fresh
        if self.evals <= self.warmup:
            return fresh
        out = self.prev[i].clone()
        out[:, sl] = fresh[:, sl]
        return out

    def attention(self, attn, x, i):
        q, k, v = attn.qkv(x).chunk(3, dim=-1)  # (B, T, hidden) each
        kv, outs = torch.cat([k, v], dim=-1), []
        for sl in self.slices:
            seen = kv[:, sl] if self.kv == "none" else self.mixed(i, kv, sl)
            outs.append(attend(attn, q[:, sl], *seen.chunk(2, dim=-1), None))
        return attn.proj(torch.cat(outs, dim=1))

    def moe(self, moe, x, i):
        probs = F.linear(x, moe.gate.weight).float().softmax(dim=-1)  # (B, T, E)
        out = torch.zeros_like(x)
        for sl in self.slices:
            if self.routing == "local":
                p, k, first = probs[:, sl], moe.tokens_per_expert(sl.stop - sl.start), sl.start
            else:
                p = probs if self.routing == "sync" else self.mixed(i, probs, sl)
                k, first = moe.tokens_per_expert(x.shape[1]), 0
            gate, token = torch.topk(p.transpose(1, 2), k, dim=-1)  # (B, E, k)
            xin = x[torch.arange(x.shape[0])[:, None, None], token + first]  # (B, E, k, D)
            h = torch.einsum("bekf,efd->bekd", F.gelu(torch.einsum("bekd,edf->bekf", xin, moe.w1)), moe.w2)
            full = torch.zeros_like(x).index_put_((torch.arange(x.shape[0])[:, None, None].expand_as(token),
                                                   token + first), h * gate[..., None], accumulate=True)
            out[:, sl] = full[:, sl]  # the band keeps what its experts gave its own tokens
        return out


# ---------------------------------------------------------------- one launch for the sampling tests

RANDOM = {"random": 0}
HEADED = {"random": 0, "pixel_head": 8}  # the same with a convolutional pixel head (cases named *_head)
# name -> (settings of the parallel run, what the one-process reference is)
CASES = {
    **{f"full_sync_{s}": (dict(parallel="full_sync", routing="displaced", **kw), "exact") for s, kw in SOLVERS.items()},
    **{f"cfg_split_{s}": (dict(parallel="cfg_split", **kw), "exact") for s, kw in SOLVERS.items()},
    "patch": (dict(parallel="patch", routing="displaced", nfe=9), ("displaced", "displaced", 1)),
    "patch_warmup3_dpmpp": (dict(parallel="patch", routing="displaced", warmup=3, **SOLVERS["dpmpp"]),
                            ("displaced", "displaced", 3)),
    "patch_moe_sync": (dict(parallel="patch", routing="sync", nfe=9), ("displaced", "sync", 1)),
    "patch_moe_local": (dict(parallel="patch", routing="local", nfe=9), ("displaced", "local", 1)),
    "naive_patch": (dict(parallel="naive_patch", routing="local", nfe=9), ("none", "local", 1)),
    "full_sync_heun_head": (dict(parallel="full_sync", routing="displaced", **SOLVERS["heun"]), "exact"),
    "patch_head": (dict(parallel="patch", routing="displaced", nfe=9), ("displaced", "displaced", 1)),
    "naive_patch_head": (dict(parallel="naive_patch", routing="local", nfe=9), ("none", "local", 1)),
}


def model_of(case: str):
    return pw.random_model(**({"pixel_head": HEADED["pixel_head"]} if case.endswith("_head") else {}))


def reference_kwargs(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k in ("solver", "nfe")}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    y, mask, noise = pw.inputs()
    jobs = {name: {"kind": "sample", "model": HEADED if name.endswith("_head") else RANDOM, "settings": kw,
                   "inputs": (y, mask, noise)} for name, (kw, _) in CASES.items()}
    jobs["exchange"] = {"kind": "exchange", "warmup": 2, "evals": 4}
    return pw.launch(tmp_path_factory.mktemp("pp"), jobs)


@pytest.mark.parametrize("case", [c for c, (_, ref) in CASES.items() if ref == "exact"])
def test_exact_modes_equal_one_process(results, case):
    """full_sync and cfg_split give the one-process image; with a pixel head too (it runs on the gathered bands)."""
    model, (y, mask, noise) = model_of(case), pw.inputs()
    ref = pw.one_process(model, pw.EDM_PIXELS, y, mask, noise, **reference_kwargs(CASES[case][0]))
    assert ref.abs().max() > 0.5  # the images carry signal at the tolerance's scale
    for rank in range(WORLD):  # every process ends with the whole image
        got = results[rank][case]["images"]
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= tolerance(ref), (case, rank)


@pytest.mark.parametrize("case", [c for c, (_, ref) in CASES.items() if ref != "exact"])
def test_band_modes_equal_the_simulated_schedule(results, case):
    """patch (displaced keys/values, each MoE routing, more warm-up) and naive_patch equal the one-process
    simulation of the same schedule, and differ from the exact image by far more than round-off. With a pixel head,
    patch runs it on the whole image, naive_patch on each band alone (the simulation does the same)."""
    kw, (kv, routing, warmup) = CASES[case]
    model, (y, mask, noise) = model_of(case), pw.inputs()
    with Simulated(model, WORLD, warmup, kv, routing):
        sim = pw.one_process(model, pw.EDM_PIXELS, y, mask, noise, **reference_kwargs(kw))
    exact = pw.one_process(model, pw.EDM_PIXELS, y, mask, noise, **reference_kwargs(kw))
    got = results[0][case]["images"]
    assert (got - sim).abs().max() <= tolerance(sim)
    assert (got - exact).abs().max() > 20 * tolerance(exact)  # the schedule shows: it is not the exact image
    assert torch.equal(results[1][case]["images"], got)


def test_caption_keys_values_are_computed_once_per_run(results):
    for case in ("patch", "full_sync_heun", "naive_patch"):
        assert results[0][case]["stats"]["evals"] == CASES[case][0].get("nfe", 7)
        assert results[0][case]["kv_calls"] == [1] * 6, case  # 2 mixer + 4 backbone blocks, one call each


def test_patch_overlaps_and_sends_less_synchronously(results):
    """patch sends the same keys/values as full_sync but, after the warm-up, in one asynchronous buffer per
    evaluation; naive_patch sends only the final bands."""
    naive = results[0]["naive_patch"]["stats"]["sent_bytes"]
    assert naive == 2 * 3 * 16 * 32 * 4  # the band of the final image: (B, C, 16 rows, 32) fp32
    assert results[0]["patch"]["stats"]["sent_bytes"] > 50 * naive
    assert results[0]["naive_patch_head"]["stats"]["sent_bytes"] == naive  # the head alone on its band
    # the gathered head input, (2B guided, 2C, 16 rows, 32) fp32, in each of 9 evaluations, on top of the keys/values
    head = results[0]["patch_head"]["stats"]["sent_bytes"] - results[0]["patch"]["stats"]["sent_bytes"]
    assert head == 9 * (2 * 2) * (2 * 3) * 16 * 32 * 4


def test_exchange_packs_mixed_dtypes_and_serves_the_previous_evaluation(results):
    warmup = 2
    for rank in range(WORLD):
        for e, seen in enumerate(results[rank]["exchange"], start=1):
            for key, got in seen.items():
                parts = [pw.exchange_value(key, j, e if (j == rank or e <= warmup) else e - 1) for j in range(WORLD)]
                assert got.dtype == parts[0].dtype and torch.equal(got, torch.cat(parts, dim=1)), (rank, e, key)
