"""Tests for engine/training/checkpoint.py: round trips, atomicity, pruning, RNG, phase init, FSDP2.

Run as a script under torchrun (``python tests/test_checkpoint.py train|resume|one_rank DIR``) it is
the two-rank FSDP2 worker that ``test_fsdp2_resume_matches_uninterrupted_run`` launches, or the one-rank
worker of ``test_a_one_process_group_checkpoints_without_collectives``.
"""
from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.training.checkpoint import Checkpointer, is_complete, load_model_weights


class Tiny(nn.Module):
    def __init__(self, tokens: int = 4, dim: int = 8, extra_layer: bool = False):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim))
        self.block = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        if extra_layer:
            self.head = nn.Linear(dim, dim)

    def forward(self, x):  # x: (B, tokens, dim)
        return self.block(x + self.pos_embed)


def _train(model, opt, steps):
    for _ in range(steps):
        loss = model(torch.randn(2, 4, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def _setup(seed, fused=False, lr=1e-2):
    torch.manual_seed(seed)
    model, ema = Tiny(), Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=fused)
    return model, ema, opt


def _assert_same_module(a, b):
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


@pytest.mark.parametrize("fused", [False, True])
def test_round_trip_is_bit_identical(tmp_path, fused):
    model, ema, opt = _setup(0, fused)
    _train(model, opt, 3)
    ckpt = Checkpointer(tmp_path, keep_last=3)
    extra = {"step": 3, "samples_seen": 6, "nonfinite_skipped": 1, "sched": {"last_epoch": 3}}
    path = ckpt.save(3, model=model, ema=ema, optimizer=opt, extra=extra)
    assert path == tmp_path / "step_00000003" and ckpt.latest() == path

    model2, ema2, opt2 = _setup(1, fused, lr=5e-3)  # fresh: other weights and lr, no Adam state
    got = ckpt.load(path, model=model2, ema=ema2, optimizer=opt2)
    assert got == extra
    _assert_same_module(model, model2)
    _assert_same_module(ema, ema2)
    sa, sb = opt.state_dict(), opt2.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)
    # the same batch must land identically: Adam moments and step count were restored
    torch.manual_seed(123)
    _train(model, opt, 1)
    torch.manual_seed(123)
    _train(model2, opt2, 1)
    _assert_same_module(model, model2)


def test_a_parameter_without_a_gradient_yet_resumes_without_optimizer_state(tmp_path):
    """A parameter no loss has reached before the save (a branch used later) has no Adam state in the checkpoint. The
    load must not ask for it (it did: "Missing key ... optim.state.head.weight.step") nor invent it: once the branch
    is used, the resumed run takes the same steps as the uninterrupted one."""
    def run_with_head(model, opt):
        torch.manual_seed(7)
        x = torch.randn(2, 4, 8)
        (model(x) + model.head(x)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    def setup(seed):
        torch.manual_seed(seed)
        model = Tiny(extra_layer=True)  # forward never calls the head
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    model, opt = setup(0)
    _train(model, opt, 2)
    path = Checkpointer(tmp_path).save(2, model=model, optimizer=opt)
    model2, opt2 = setup(1)
    Checkpointer(tmp_path).load(path, model=model2, optimizer=opt2)
    with_state = lambda m, o: sorted(n for n, p in m.named_parameters() if p in o.state)
    assert with_state(model2, opt2) == with_state(model, opt) == ["block.0.bias", "block.0.weight", "block.2.bias",
                                                                  "block.2.weight", "pos_embed"]
    run_with_head(model, opt)
    run_with_head(model2, opt2)
    _assert_same_module(model, model2)


def test_keep_last_prunes_oldest(tmp_path):
    model, _, opt = _setup(0)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in range(1, 6):
        ckpt.save(step, model=model, optimizer=opt, extra={"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
    assert ckpt.load(ckpt.latest(), model=model)["step"] == 5


def test_latest_ignores_incomplete_folders_and_save_cleans_tmp(tmp_path):
    model, _, _ = _setup(0)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest() is None
    good = ckpt.save(5, model=model)
    (tmp_path / "step_00000009.tmp").mkdir()
    (tmp_path / "step_00000009.tmp" / ".metadata").write_bytes(b"")
    (tmp_path / "step_00000010").mkdir()  # final name but no .metadata
    assert ckpt.latest() == good
    assert not is_complete(tmp_path / "step_00000010")
    with pytest.raises(ValueError, match="step_00000010"):
        ckpt.load(tmp_path / "step_00000010", model=model)
    with pytest.raises(FileNotFoundError, match="step_00000099"):
        ckpt.load(tmp_path / "step_00000099", model=model)
    ckpt.save(6, model=model)
    assert not (tmp_path / "step_00000009.tmp").exists()


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model, ema, opt = _setup(0)
    _train(model, opt, 2)
    ckpt = Checkpointer(tmp_path)
    good = ckpt.save(2, model=model, ema=ema, optimizer=opt, extra={"step": 2})
    expected = copy.deepcopy(model.state_dict())

    real_save = dcp.save

    def crashing_save(state, checkpoint_id, **options):
        real_save({"model": state["model"]}, checkpoint_id=checkpoint_id, **options)  # some shards land
        raise RuntimeError("node lost")

    monkeypatch.setattr(dcp, "save", crashing_save)
    _train(model, opt, 1)
    with pytest.raises(RuntimeError, match="node lost"):
        ckpt.save(3, model=model, ema=ema, optimizer=opt, extra={"step": 3})
    assert (tmp_path / "step_00000003.tmp").exists()
    assert ckpt.latest() == good

    fresh, fresh_ema, fresh_opt = _setup(7)
    assert ckpt.load(ckpt.latest(), model=fresh, ema=fresh_ema, optimizer=fresh_opt) == {"step": 2}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_every_file_is_fsynced_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    """A power loss after the rename must not leave a 'complete' checkpoint with files still in the page cache:
    each file of the folder (shards, .metadata, rng_rank*.pt) and the folder's entries are fsynced before it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    model, ema, opt = _setup(0)
    final = Checkpointer(tmp_path).save(4, model=model, ema=ema, optimizer=opt, extra={"step": 4})
    tmp = str(final) + ".tmp"
    publish = events.index(("replace", tmp, str(final)))
    synced = {path for kind, path, *_ in events[:publish] if kind == "fsync"}
    files = sorted(p.name for p in final.iterdir())
    assert "rng_rank0.pt" in files and ".metadata" in files
    unsynced = [f for f in files if f"{tmp}/{f}" not in synced and not (f == ".metadata" and f"{tmp}/.metadata.tmp"
                                                                        in synced)]  # DCP syncs it, then renames
    assert not unsynced and tmp in synced, (unsynced, synced)


def test_rng_streams_continue_identically(tmp_path):
    model, _, _ = _setup(0)
    ckpt = Checkpointer(tmp_path)
    torch.manual_seed(42), random.seed(42), np.random.seed(42)
    path = ckpt.save(1, model=model)
    want = (torch.rand(5), random.random(), np.random.rand(3))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ckpt.load(path, model=model)
    got = (torch.rand(5), random.random(), np.random.rand(3))
    assert torch.equal(want[0], got[0]) and want[1] == got[1] and np.array_equal(want[2], got[2])


def test_load_model_weights_skips_pos_embed_and_names_bad_keys(tmp_path):
    torch.manual_seed(0)
    src, src_ema = Tiny(tokens=4), Tiny(tokens=4)
    path = Checkpointer(tmp_path).save(1, model=src, ema=src_ema)

    dst, dst_ema = Tiny(tokens=16), Tiny(tokens=16)  # a later phase at higher resolution
    pos_before = dst.pos_embed.detach().clone()
    load_model_weights(path, dst, ema=dst_ema)
    assert torch.equal(dst.pos_embed, pos_before)
    assert torch.equal(dst.block[0].weight, src.block[0].weight)
    assert torch.equal(dst_ema.block[2].bias, src_ema.block[2].bias)

    with pytest.raises(ValueError, match=r"missing \['head.bias', 'head.weight'\]"):
        load_model_weights(path, Tiny(tokens=4, extra_layer=True))
    with pytest.raises(ValueError, match=r"pos_embed \(checkpoint \(1, 4, 8\), model \(1, 16, 8\)\)"):
        load_model_weights(path, Tiny(tokens=16), skip=())
    bare = Checkpointer(tmp_path / "bare").save(1, model=src)
    with pytest.raises(ValueError, match="no 'ema' state"):
        load_model_weights(bare, Tiny(), ema=Tiny())


# ---------------------------------------------------------------- two ranks, FSDP2 on CPU


def _fsdp_setup(seed):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(seed)  # same init on both ranks, as a trainer does
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    ema = copy.deepcopy(model)
    for m in (model, ema):
        for layer in (m[0], m[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(1000 + dist.get_rank())  # per-rank data stream
    return model, ema, opt


def _fsdp_step(model, opt):
    x = torch.randn(4, 8)
    loss = (model(x) - x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def _full(module):
    return {k: v.full_tensor() for k, v in module.state_dict().items()}


def _one_rank_worker(out: Path) -> None:
    """Save, resume and phase-init in a one-process gloo group, as `torchrun --nproc_per_node=1` trains; record the
    process's thread count before and after."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(50)])  # entries enough for DCP's plans to be a large object
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    before = len(os.listdir("/proc/self/task"))
    ckpt = Checkpointer(out / "ckpt")
    path = ckpt.save(1, model=model, ema=ema, optimizer=opt, extra={"step": 1})
    assert ckpt.load(path, model=model, ema=ema, optimizer=opt) == {"step": 1}
    load_model_weights(path, model, ema=ema)
    (out / "threads").write_text(f"{before} {len(os.listdir('/proc/self/task'))}")
    dist.destroy_process_group()


def _worker(mode: str, out: Path) -> None:
    import torch.distributed as dist

    if mode == "one_rank":
        return _one_rank_worker(out)
    ckpt = Checkpointer(out / "ckpt", keep_last=2)
    if mode == "train":
        model, ema, opt = _fsdp_setup(seed=0)
        for _ in range(3):
            _fsdp_step(model, opt)
        ckpt.save(3, model=model, ema=ema, optimizer=opt, extra={"step": 3})
        ref = {"params": _full(model), "ema": _full(ema), "loss": _fsdp_step(model, opt)}
        torch.save(ref, out / f"ref_rank{dist.get_rank()}.pt")
    else:
        model, ema, opt = _fsdp_setup(seed=99)
        extra = ckpt.resume(model=model, ema=ema, optimizer=opt)
        ref = torch.load(out / f"ref_rank{dist.get_rank()}.pt")
        assert extra == {"step": 3}, extra
        for name, module in (("params", model), ("ema", ema)):
            for k, v in _full(module).items():
                assert torch.equal(v, ref[name][k]), (name, k)
        loss = _fsdp_step(model, opt)
        assert torch.equal(loss, ref["loss"]), (loss, ref["loss"])
        (out / f"ok_rank{dist.get_rank()}").write_text("ok")
    dist.barrier()  # leave together: a rank tearing gloo down while the other still talks can abort
    dist.destroy_process_group()


def _launch(mode: str, out: Path, nproc: int, omp_threads: int) -> None:
    root = str(Path(__file__).resolve().parents[1])  # the workers import engine.training.checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": str(omp_threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, mode, str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, f"{mode} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_a_one_process_group_checkpoints_without_collectives(tmp_path):
    """In a group of one, DCP's collectives ran in gloo's worker thread and their first large copy started an OpenMP
    team there; with more OpenMP threads than CPUs libgomp stops spinning, and every later training step slowed
    (1.4-1.7x on 2 cores). Save, load and load_model_weights must leave the process with the threads it had."""
    _launch("one_rank", tmp_path, nproc=1, omp_threads=2)  # 2: a team of its own needs a thread to start
    before, after = map(int, (tmp_path / "threads").read_text().split())
    assert after == before, f"checkpointing started {after - before} thread(s)"


@pytest.mark.slow
def test_fsdp2_resume_matches_uninterrupted_run(tmp_path):
    for mode in ("train", "resume"):
        _launch(mode, tmp_path, nproc=2, omp_threads=1)
    assert (tmp_path / "ok_rank0").exists() and (tmp_path / "ok_rank1").exists()
    assert [p.name for p in Checkpointer(tmp_path / "ckpt").checkpoints()] == ["step_00000003"]
    assert {p.name for p in (tmp_path / "ckpt" / "step_00000003").glob("rng_rank*.pt")} == {
        "rng_rank0.pt", "rng_rank1.pt"}


if __name__ == "__main__":
    from engine.training.parallel import exit_skipping_finalization

    _worker(sys.argv[1], Path(sys.argv[2]))
    exit_skipping_finalization(0)  # as engine/train.py ends: gloo may abort a finished process while Python finalizes
