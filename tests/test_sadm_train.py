"""SADM through the training loop: a run killed after a checkpoint resumes bit-identically (denoiser, discriminator
and its optimizer, metrics), and 2 processes equal 1 (the structure is per micro-batch, so the world size does not
change which samples are compared).

The single-process runs go through engine.training.loop.train in this process (a one-process group), the 2-process
run through torchrun as tests/test_train_e2e.py does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "train.steps=8", "train.log_every=3", "train.ckpt_every=4", "train.progress_bar=false", "data.num_samples=256",
    "train.global_batch=16", "train.micro_batch=8",
    "sample.steps=2", "sample.per_prompt=1", "sample.final_eval_images=0", "train.keep_checkpoints=2",
    "sadm.enabled=true", "sadm.weight=0.5", "sadm.sigma_max=0", "sadm.disc_lr=1e-3",
]
KEYS = ("loss", "grad_norm", "sadm_loss", "sadm_disc_grad_norm")

pytestmark = pytest.mark.slow


def train_here(dist_env, out: Path, name: str, extra=()) -> Path:
    from engine.training.loop import train

    cfg = load_config(ROOT / "configs" / "tiny_32px.yaml", [f"run.out_dir={out}", f"run.name={name}", *COMMON, *extra])
    return train(cfg, dist_env)


def records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: {k: r.get(k) for k in KEYS} for r in map(json.loads, lines)}


def tensors(checkpoint: Path, tmp: Path) -> dict:
    """Every tensor of a checkpoint (model, EMA, optimizer, discriminator and its optimizer) by flat name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, tmp / f"{checkpoint.parent.parent.name}.pt")
    state = torch.load(tmp / f"{checkpoint.parent.parent.name}.pt", weights_only=False)
    flat = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        elif isinstance(v, torch.Tensor):
            flat[prefix] = v
    walk("", {k: v for k, v in state.items() if k != "extra"})
    return flat


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sadm_runs")


@pytest.fixture(scope="module")
def uninterrupted(dist_env, out_dir):
    return train_here(dist_env, out_dir, "whole")


def test_metrics_report_the_structure_loss_and_the_discriminator(uninterrupted):
    recs = records(uninterrupted)
    assert sorted(recs) == [3, 6, 8]
    assert all(r["sadm_loss"] > 0 and r["sadm_disc_grad_norm"] > 0 for r in recs.values())


def test_killed_run_resumes_bit_identically_with_sadm(dist_env, out_dir, uninterrupted, monkeypatch, tmp_path):
    import engine.training.loop as loop

    real_step = loop.train_step

    def dies_at_step_7(*args, step, **kw):
        if step == 6:  # in its 7th step, after the checkpoint of step 4 (inside the logging window 4-6)
            raise KeyboardInterrupt("killed")
        return real_step(*args, step=step, **kw)

    monkeypatch.setattr(loop, "train_step", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_here(dist_env, out_dir, "killed")
    run = out_dir / "killed"
    assert max(records(run)) == 6 and (run / "checkpoints" / "step_00000004").is_dir()
    monkeypatch.setattr(loop, "train_step", real_step)
    train_here(dist_env, out_dir, "killed")
    assert records(run) == records(uninterrupted)  # exact floats
    a = tensors(uninterrupted / "checkpoints" / "step_00000008", tmp_path)
    b = tensors(run / "checkpoints" / "step_00000008", tmp_path)
    assert a.keys() == b.keys() and any(k.startswith(".sadm_disc_optim") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_resuming_a_run_without_sadm_with_sadm_on_is_refused(dist_env, out_dir):
    train_here(dist_env, out_dir, "plain", ["sadm.enabled=false", "train.steps=2", "train.ckpt_every=2"])
    with pytest.raises(ConfigError, match="sadm.enabled=True but .* was trained without SADM"):
        train_here(dist_env, out_dir, "plain", ["train.steps=4"])


def test_two_processes_match_one(out_dir, uninterrupted):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "engine" / "train.py"), "--config", str(ROOT / "configs" / "tiny_32px.yaml"),
           f"run.out_dir={out_dir}", "run.name=two_procs", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = records(uninterrupted), records(out_dir / "two_procs")
    assert one.keys() == two.keys()
    for step in one:
        for key in KEYS:
            assert two[step][key] == pytest.approx(one[step][key], rel=2e-3, abs=1e-4), (step, key)
