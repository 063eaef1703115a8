"""End to end through torchrun: the tiny job trains, 2 processes match 1, a killed run resumes exactly, sampling works.

One short baseline run (module-scoped) serves several tests; all runs share one caption-embedding cache."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY = 24, 3
COMMON = [
    f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}", "train.ckpt_every=8", "train.progress_bar=false",
    "data.num_samples=512", "sample.steps=3", "sample.per_prompt=1", "train.keep_checkpoints=2",
    "train.global_batch=16", "train.micro_batch=8",  # one process accumulates two micro-batches, two processes one each
]

NO_CHECK = ["sample.final_eval_images=0"]  # for runs whose closing check the baseline's already covers
pytestmark = pytest.mark.slow


def torchrun(out_dir: Path, name: str, nproc: int = 1, extra=(), wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "engine" / "train.py"), "--config", str(ROOT / "configs" / "tiny_32px.yaml"),
           f"run.out_dir={out_dir}", f"run.name={name}", *COMMON, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc)), "HF_HUB_OFFLINE": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out_dir / name


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts each worker in a session of its own: killing the launcher's
    process group would leave the worker training)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    return tree


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def baseline(out_dir):
    return torchrun(out_dir, "baseline")


def test_run_folder_has_every_artifact_and_loss_falls(baseline):
    for name in ["config.yaml", "metrics.jsonl", "loss_curve.png", f"samples/step_{STEPS:08d}.png"]:
        assert (baseline / name).is_file(), name
    assert list((baseline / "tb").glob("events.out.tfevents.*"))
    assert (baseline / "checkpoints" / f"step_{STEPS:08d}" / ".metadata").is_file()
    assert len(list((baseline / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints
    rec = json.loads((baseline / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ["images_per_sec", "tokens_per_sec", "tflops_per_sec_per_device", "gpu_hours", "cost_usd",
                "projected_total_cost_usd", "data_wait_frac", "peak_mem_gib", "grad_norm", "lr"]:
        assert rec[key] is not None, key
    assert rec["mfu"] is None  # CPU: no peak to compare against
    loss = list(losses(baseline).values())
    first, last = sum(loss[:4]) / 4, sum(loss[-4:]) / 4
    assert last < 0.8 * first, (first, last)


def test_two_processes_match_one(out_dir, baseline):
    two = torchrun(out_dir, "two_procs", nproc=2)
    one, both = losses(baseline), losses(two)
    assert one.keys() == both.keys()
    for step in one:
        assert both[step] == pytest.approx(one[step], rel=2e-3, abs=1e-4), step


def test_killed_run_resumes_on_the_same_trajectory(out_dir, baseline):
    run = out_dir / "killed"
    proc = torchrun(out_dir, "killed", extra=NO_CHECK, wait=False)
    deadline = time.time() + 300
    # kill -9 mid-run, once a checkpoint exists and training is past it. Checkpoints (every 8 steps) fall inside
    # logging windows (every 3): the first line after the resume must average the same steps as the baseline's.
    while time.time() < deadline:
        ckpts = list((run / "checkpoints").glob("step_*[0-9]")) if run.exists() else []
        if ckpts and (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    tree = process_tree(proc.pid)
    assert len(tree) >= 2, "no worker process under torchrun"
    for pid in tree:  # kill -9 the launcher and its worker at once, as a lost node would
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
               for pid in tree), "a training process survived kill -9"
    killed_at = max(losses(run))
    assert killed_at < STEPS, "the run finished before it could be killed"
    time.sleep(3)
    assert max(losses(run)) == killed_at, "the killed run went on writing"
    torchrun(out_dir, "killed", extra=NO_CHECK)
    assert losses(run) == losses(baseline)  # bit-identical on CPU
    # Both process starts are billed, the killed one's work after its last checkpoint included.
    first, second = json.loads((run / "billing.json").read_text())["processes"]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert first["setup_s"] > 0 and second["setup_s"] > 0
    assert last["gpu_hours"] * 3600 > first["gpu_s"] + second["setup_s"]


def test_sample_cli_writes_finite_images(baseline, tmp_path):
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, str(ROOT / "engine" / "sample.py"), "--run", str(baseline), "--prompt",
                           "a red circle", "--prompt", "two blue squares", "--num", "2", "--steps", "4",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]  # the CLI refuses non-finite samples (a PNG would hide NaN)
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] > 0 and img.shape[1] > 0 and img.std() > 5  # pictures, not a constant (e.g. black) canvas


def test_sample_cli_refuses_non_finite_samples(baseline, tmp_path, monkeypatch):
    import engine.sample as sample_cli

    monkeypatch.setattr(sample_cli, "sample", lambda *a, **k: torch.full((2, 3, 32, 32), float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite"):
        sample_cli.main(["--run", str(baseline), "--prompt", "a red circle", "--num", "2", "--steps", "2",
                         "--out", str(tmp_path / "grid.png")])
    assert not (tmp_path / "grid.png").exists()


def test_sampler_gives_finite_images_of_the_right_shape():
    from engine.diffusion.edm import EDM
    from engine.sampling.sampler import sample
    from models.sizes import build_model, model_config

    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    y, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    images = sample(model, EDM(), y, mask, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 32, 32) and torch.isfinite(images).all()


def test_next_phase_starts_from_earlier_checkpoint_at_twice_the_resolution(out_dir, baseline):
    """Phase change: 32 -> 64 px input (4x the tokens), position embeddings rebuilt with interpolation scale 2."""
    ckpt = baseline / "checkpoints" / f"step_{STEPS:08d}"
    run = torchrun(out_dir, "phase2", extra=["data.image_size=64", "model.pos_interp_scale=2.0", "train.steps=2",
                                             f"train.init_from={ckpt}", "train.global_batch=8", "train.micro_batch=8",
                                             *NO_CHECK])
    assert (run / "checkpoints" / "step_00000002").is_dir()
    from engine.training.run_folder import load_run_model
    from models.layers import sincos_pos_embed_2d

    _, before, _ = load_run_model(baseline, None, use_ema=False)
    cfg, after, _ = load_run_model(run, None, use_ema=False)
    # two AdamW steps at lr <= 2e-3 (warmup) move no weight by more than ~2·lr: phase 2 started from phase 1's weights
    lr = cfg.optim.lr
    for (name, a), b in zip(after.named_parameters(), before.parameters()):
        assert (a - b).abs().max() <= 3 * lr, name
    assert after.pos_embed.shape[1] == 4 * before.pos_embed.shape[1]
    torch.testing.assert_close(after.pos_embed[0], sincos_pos_embed_2d(after.cfg.dim, 16, 2.0).to(after.pos_embed))


def test_nonfinite_streak_stops_the_run_with_a_clear_error(out_dir):
    cmd_extra = ["optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0", "train.max_nonfinite_steps=3",
                 "train.ckpt_every=1000"]
    with pytest.raises(AssertionError, match="consecutive steps had a non-finite loss or gradient"):
        torchrun(out_dir, "diverges", extra=cmd_extra)


def test_resuming_with_another_global_batch_is_refused_before_anything_is_written(out_dir, baseline):
    config_before = (baseline / "config.yaml").read_text()
    with pytest.raises(AssertionError, match="train.global_batch=32 but .* was trained at 16"):
        torchrun(out_dir, "baseline", extra=["train.global_batch=32"])
    assert (baseline / "config.yaml").read_text() == config_before
