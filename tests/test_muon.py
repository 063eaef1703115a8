"""Tests for engine/training/muon.py and the optimizer choice in engine/training/optim.py: Muon steps against
torch.optim.Muon, AdamW steps against torch.optim.AdamW, batched expert banks, the device-side skip, the split of a
MicroDiT's parameters, checkpoint resume, and FSDP2-sharded matrices with the Newton-Schulz work split over two ranks.

Run as a script under torchrun (``python tests/test_muon.py DIR``) it is the two-rank worker of
``test_sharded_matrices_take_the_same_steps_and_resume``."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import OptimConfig, load_config
from engine.training import muon
from engine.training.muon import MuonAdamW, newton_schulz
from engine.training.optim import build_optimizer, takes_muon


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def test_newton_schulz_gives_nearly_orthogonal_matrices():
    torch.manual_seed(0)
    g = torch.randn(48, 20, dtype=torch.float64) @ torch.diag(torch.logspace(-1.5, 1, 20, dtype=torch.float64))
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 100
    s = torch.linalg.svdvals(newton_schulz(g).double())
    # five quintic steps push every singular value into a band around 1, not onto it (Jordan's "US'V^T")
    assert s.min() > 0.5 and s.max() < 1.5, s


def test_matrices_of_one_shape_are_orthogonalised_together_as_each_alone():
    torch.manual_seed(0)
    # two wide and one tall matrix of one shape, a stack of that shape, a shape of its own, a square pair
    mats = [torch.randn(6, 10), torch.randn(10, 6), torch.randn(6, 10), torch.randn(3, 6, 10), torch.randn(5, 7),
            torch.randn(4, 4), torch.randn(4, 4)]
    together = muon.orthogonalise(mats, steps=5)
    for m, t in zip(mats, together):
        assert t.shape == m.shape
        torch.testing.assert_close(t, newton_schulz(m), rtol=0, atol=1e-6)


def test_newton_schulz_in_fp32_follows_the_exact_iteration_closer_than_bf16():
    torch.manual_seed(0)
    g = torch.randn(3, 32, 48)
    exact = newton_schulz(g.double(), dtype=torch.float64)
    err = {dt: (newton_schulz(g, dtype=dt).double() - exact).abs().max().item() for dt in (torch.float32, torch.bfloat16)}
    assert err[torch.float32] < 1e-4 < err[torch.bfloat16], err


def test_auto_runs_newton_schulz_in_fp32_on_a_cpu_and_in_bf16_on_a_gpu():
    assert muon.ns_dtype("auto", torch.device("cpu")) == torch.float32
    assert muon.ns_dtype("auto", torch.device("cuda")) == torch.bfloat16
    torch.manual_seed(0)
    start, grads = torch.randn(24, 40), [torch.randn(24, 40) for _ in range(3)]
    weights = {}
    for name in ("auto", "fp32", "bf16"):
        w = start.clone().requires_grad_()
        opt = MuonAdamW([{"params": [w], "muon": True}], lr=0.02, ns_dtype=name)
        for g in grads:
            _step(opt, [w], [g])
        weights[name] = w.detach()
    assert torch.equal(weights["auto"], weights["fp32"])
    assert not torch.equal(weights["auto"], weights["bf16"])
    with pytest.raises(ValueError, match="ns_dtype 'fp16'"):
        MuonAdamW([{"params": [start.clone().requires_grad_()], "muon": True}], lr=0.02, ns_dtype="fp16")


def test_matrix_steps_match_torch_muon():
    torch.manual_seed(0)
    w = torch.randn(40, 24, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    ours = MuonAdamW([{"params": [w], "muon": True, "weight_decay": 0.1}], lr=0.02, momentum=0.9, ns_dtype="bf16")
    ref = torch.optim.Muon([w_ref], lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    start = w.detach().clone()
    for _ in range(4):
        g = torch.randn(40, 24)
        _step(ours, [w], [g])
        _step(ref, [w_ref], [g])
    assert (w_ref.detach() - start).abs().max() > 0.01
    # the same bf16 Newton-Schulz arithmetic: equal up to fp32 rounding of the parameter update
    torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=0, atol=1e-6)


def test_fewer_newton_schulz_iterations_match_torch_muon_and_cost_in_proportion():
    torch.manual_seed(1)
    w = torch.randn(40, 24, requires_grad=True)
    w_ref, w_five = (w.detach().clone().requires_grad_() for _ in range(2))
    three = MuonAdamW([{"params": [w], "muon": True}], lr=0.02, ns_steps=3, ns_dtype="bf16")
    five = MuonAdamW([{"params": [w_five], "muon": True}], lr=0.02, ns_dtype="bf16")
    ref = torch.optim.Muon([w_ref], lr=0.02, weight_decay=0.0, ns_steps=3, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(40, 24)
        for opt, p in ((three, w), (five, w_five), (ref, w_ref)):
            _step(opt, [p], [g])
    torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=0, atol=1e-6)
    assert (w.detach() - w_five.detach()).abs().max() > 1e-3  # three iterations are not five
    assert three.newton_schulz_flops() * 5 == five.newton_schulz_flops() * 3


def test_the_configured_iteration_count_reaches_every_muon_group():
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/tiny_reference_16px.yaml", ["optim.muon_ns_steps=3"])
    from engine.training.network import build_run_network

    opt = build_optimizer(build_run_network(cfg, asdict(cfg.kernels)), cfg.optim)
    steps = {g["ns_steps"] for g in opt.param_groups if g["muon"]}
    assert steps == {3}


def test_other_parameters_take_torch_adamw_steps():
    torch.manual_seed(0)
    b, v = torch.randn(16, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    b_ref, v_ref = (t.detach().clone().requires_grad_() for t in (b, v))
    ours = MuonAdamW([{"params": [v], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1e-2,
                     betas=(0.8, 0.99), eps=1e-6)
    ref = torch.optim.AdamW([{"params": [v_ref], "weight_decay": 0.1}, {"params": [b_ref], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    for _ in range(5):
        grads = [torch.randn(5, 7), torch.randn(16)]
        _step(ours, [v, b], grads)
        _step(ref, [v_ref, b_ref], grads)
    torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-6)


def test_an_expert_bank_is_orthogonalised_one_expert_at_a_time():
    torch.manual_seed(0)
    bank = torch.randn(3, 12, 20, requires_grad=True)
    singles = [bank[e].detach().clone().requires_grad_() for e in range(3)]
    batched = MuonAdamW([{"params": [bank], "muon": True, "batched": True}], lr=0.01)
    one_by_one = MuonAdamW([{"params": singles, "muon": True}], lr=0.01)
    for _ in range(3):
        g = torch.randn(3, 12, 20)
        g[1] *= 100  # one expert's gradient far larger: a shared normalisation would shrink the others' steps
        _step(batched, [bank], [g])
        _step(one_by_one, singles, list(g))
    torch.testing.assert_close(bank.detach(), torch.stack([s.detach() for s in singles]), rtol=0, atol=1e-6)


def test_a_skipped_step_changes_nothing_and_the_next_step_is_as_if_it_never_came():
    torch.manual_seed(0)
    w, b = torch.randn(10, 6, requires_grad=True), torch.randn(6, requires_grad=True)
    w2, b2 = (t.detach().clone().requires_grad_() for t in (w, b))
    groups = lambda w, b: [{"params": [w], "muon": True, "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.1}]
    skipping, plain = MuonAdamW(groups(w, b), lr=0.01), MuonAdamW(groups(w2, b2), lr=0.01)
    g1, g2 = [torch.randn(10, 6), torch.randn(6)], [torch.randn(10, 6), torch.randn(6)]
    skipping.found_inf = torch.tensor(0.0)
    _step(skipping, [w, b], g1)
    _step(plain, [w2, b2], g1)
    before = [w.detach().clone(), b.detach().clone()]
    skipping.found_inf = torch.tensor(1.0)
    _step(skipping, [w, b], [torch.full((10, 6), float("nan")), torch.full((6,), float("inf"))])
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    skipping.found_inf = torch.tensor(0.0)
    _step(skipping, [w, b], g2)
    _step(plain, [w2, b2], g2)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_a_skipped_first_step_leaves_adamw_finite():
    b = torch.zeros(4, requires_grad=True)
    opt = MuonAdamW([{"params": [b]}], lr=0.1)
    opt.found_inf = torch.tensor(1.0)
    _step(opt, [b], [torch.full((4,), float("nan"))])
    opt.found_inf = torch.tensor(0.0)
    _step(opt, [b], [torch.ones(4)])
    torch.testing.assert_close(b.detach(), torch.full((4,), -0.1))  # Adam's first step: lr * sign(g)


def test_the_added_flops_are_those_torch_counts():
    from torch.utils.flop_counter import FlopCounterMode

    params = [torch.randn(30, 12, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True),
              torch.randn(2, 5, 9, requires_grad=True)]
    opt = MuonAdamW([{"params": params[:2], "muon": True}, {"params": params[2:], "muon": True, "batched": True}],
                    lr=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    with FlopCounterMode(display=False) as counter:
        opt.step()
    assert counter.get_total_flops() == opt.newton_schulz_flops() > 0


def test_muon_groups_hold_matrices_only():
    with pytest.raises(ValueError, match="matrices only"):
        MuonAdamW([{"params": [torch.zeros(4, requires_grad=True)], "muon": True}], lr=0.1)


def test_microdit_split_keeps_input_output_and_routers_on_adamw():
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/tiny_reference_16px.yaml", ["optim.optimizer=muon"])
    from engine.training.network import build_run_network

    model = build_run_network(cfg, asdict(cfg.kernels))
    opt = build_optimizer(model, cfg.optim)
    kind = {}
    for group in opt.param_groups:
        for p in group["params"]:
            kind[id(p)] = ("batched" if group["batched"] else "muon") if group["muon"] else "adamw"
    named = dict(model.named_parameters())
    assert len(kind) == len(named)  # every trained parameter is in exactly one group
    assert kind[id(named["blocks.0.attn.qkv.weight"])] == "muon"
    assert kind[id(named["blocks.0.adaLN_modulation.1.weight"])] == "muon"
    assert kind[id(named["pixel_head.blocks.0.conv1.weight"])] == "muon"
    assert kind[id(named["blocks.1.mlp.w1"])] == "batched"
    for adamw in ("x_embedder.proj.weight", "final_layer.linear.weight", "blocks.1.mlp.gate.weight",
                  "pixel_head.conv_in.weight", "pixel_head.conv_out.weight", "blocks.0.norm1.weight",
                  "blocks.0.adaLN_modulation.1.bias"):
        assert kind[id(named[adamw])] == "adamw", adamw
    assert not takes_muon("final_layer.linear.weight", torch.zeros(2, 2))


def test_adamw_stays_the_default():
    model = nn.Linear(4, 4)
    assert isinstance(build_optimizer(model, OptimConfig()), torch.optim.AdamW)
    assert isinstance(build_optimizer(model, OptimConfig(optimizer="muon")), MuonAdamW)


class Net(nn.Module):
    """Two hidden matrices, one with 33 rows (uneven shards over two ranks), an expert bank of three experts (two on
    one rank, one on the other) and an output layer."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 33)
        self.mid = nn.Linear(33, 33)
        self.experts = nn.Parameter(torch.randn(3, 33, 8) * 0.1)
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.inner(x))))
        return self.final_layer.linear(torch.einsum("bd,edh->bh", h, self.experts))


def _train(model, opt, steps, seed):
    torch.manual_seed(seed)  # the same data on every rank: the sharded run's gradient equals the single one's
    for _ in range(steps):
        x = torch.randn(6, 8)
        (model(x) - x).pow(2).mean().backward()
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        opt.zero_grad()


def test_checkpoint_resume_takes_the_same_step(tmp_path):
    from engine.training.checkpoint import Checkpointer

    cfg = OptimConfig(optimizer="muon", lr=0.01)
    torch.manual_seed(0)
    model = Net()
    opt = build_optimizer(model, cfg)
    _train(model, opt, 3, seed=1)
    path = Checkpointer(tmp_path).save(3, model=model, optimizer=opt)
    torch.manual_seed(5)
    model2 = Net()
    opt2 = build_optimizer(model2, cfg)
    Checkpointer(tmp_path).load(path, model=model2, optimizer=opt2)
    _train(model, opt, 1, seed=2)
    _train(model2, opt2, 1, seed=2)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from engine.training.checkpoint import Checkpointer

    dist.init_process_group("gloo")
    cfg = OptimConfig(optimizer="muon", lr=0.01)
    torch.manual_seed(0)
    single = Net()
    sharded = copy.deepcopy(single)
    fully_shard(sharded.inner)
    fully_shard(sharded)
    opt_single, opt_sharded = build_optimizer(single, cfg), build_optimizer(sharded, cfg)
    _train(single, opt_single, 3, seed=1)
    done = []  # the FLOPs of the Newton-Schulz iterations this process runs
    run_ns, gather_everywhere = muon.newton_schulz, muon._gather_everywhere
    muon.newton_schulz = lambda g, steps, dtype: done.append(muon._ns_flops(g.shape, steps)) or run_ns(g, steps, dtype=dtype)
    muon._gather_everywhere = None  # FSDP2's row shards go to their owner alone, never to every process
    _train(sharded, opt_sharded, 3, seed=1)
    muon.newton_schulz, muon._gather_everywhere = run_ns, gather_everywhere
    # the owner alone receives a matrix of uneven row shards (33 rows: 17 and 16), whole and in order
    mid = sharded.mid.weight
    whole = mid.full_tensor()
    for owner in range(2):
        parts, work = muon._gather_to_owner(mid.to_local() + 1, mid, owner)
        work.wait()
        if dist.get_rank() == owner:
            assert torch.equal(muon._joined(parts, mid), whole + 1)
        else:
            assert parts is None
    # the iterations are split: each process runs its share, the shares add up to one process's whole
    share = opt_sharded.newton_schulz_flops()
    assert sum(done) == 3 * share
    shares = [torch.tensor(0) for _ in range(2)]
    dist.all_gather(shares, torch.tensor(share))
    assert sum(s.item() for s in shares) == opt_single.newton_schulz_flops()
    assert all(0 < s.item() < opt_single.newton_schulz_flops() for s in shares)
    full = {n: p.full_tensor() for n, p in sharded.named_parameters()}
    for n, p in single.named_parameters():
        torch.testing.assert_close(full[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
    # a sharded resume continues exactly
    path = Checkpointer(out / "ckpt").save(3, model=sharded, optimizer=opt_sharded)
    torch.manual_seed(9)
    fresh = Net()
    fully_shard(fresh.inner)
    fully_shard(fresh)
    opt_fresh = build_optimizer(fresh, cfg)
    Checkpointer(out / "ckpt").load(path, model=fresh, optimizer=opt_fresh)
    _train(sharded, opt_sharded, 1, seed=2)
    _train(fresh, opt_fresh, 1, seed=2)
    for (n, a), b in zip(sharded.named_parameters(), fresh.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), n
    (out / f"ok_rank{dist.get_rank()}").write_text("ok")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_matrices_take_the_same_steps_and_resume(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    assert (tmp_path / "ok_rank0").exists() and (tmp_path / "ok_rank1").exists()


if __name__ == "__main__":
    from engine.training.parallel import exit_skipping_finalization

    _worker(Path(sys.argv[1]))
    exit_skipping_finalization(0)
