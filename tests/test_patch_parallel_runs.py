"""Patch-parallel sampling on a trained run: displaced keys/values beat no exchange, `engine/sample.py` works through
torchrun as users type it, a process that dies does not leave the others hanging, bad launches end in one line."""
import os
import subprocess
import sys
import time
from pathlib import Path

import parallel_worker as pw
import pytest
import torch

from engine.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three white circles"]

pytestmark = pytest.mark.slow


def train_briefly(out: Path, name: str, steps: int, *keys: str, config: str = "tiny") -> Path:
    """engine/train.py on configs/<config>.yaml for `steps` steps at batch 16, in a subprocess alone on both cores;
    the run folder."""
    cmd = [sys.executable, str(ROOT / "engine" / "train.py"), "--config", str(ROOT / "configs" / f"{config}.yaml"),
           f"run.out_dir={out}", f"run.name={name}",
           f"train.steps={steps}", f"train.ckpt_every={steps}", "train.global_batch=16", "train.micro_batch=16",
           "sample.final_eval_images=0", "sample.steps=2", "sample.per_prompt=1", "train.progress_bar=false", *keys]
    proc = subprocess.run(cmd, env={**ENV, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The 32-px tiny recipe (unmasked) trained briefly (~30 s): enough for its attention to carry the image's layout.
    Without the recipe's pixel head, which runs on the whole gathered image in every process: with it, this run's patch
    mode came 1.5e-4 RMS from the one-process image, too close for the test to see stale keys/values at all."""
    return train_briefly(tmp_path_factory.mktemp("runs"), "t", 150, "data.num_samples=512", "model.pixel_head=0",
                         config="tiny_32px")


def test_patch_beats_naive_patch_on_a_trained_model(trained, tmp_path):
    from engine.diffusion.edm import EDM
    from engine.training.run_folder import embed_captions, load_run_model

    cfg, model, _ = load_run_model(trained, None)
    y, mask = embed_captions(cfg, PROMPTS, "cpu")
    noise = torch.randn(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    heun20 = dict(nfe=39, cfg_scale=3.0)  # 20 steps: the target starts there
    jobs = {mode: {"kind": "sample", "model": {"run": str(trained)}, "inputs": (y, mask, noise),
                   "settings": dict(parallel=mode, routing=routing, **heun20)}
            for mode, routing in (("patch", "displaced"), ("naive_patch", "local"))}
    got = pw.launch(tmp_path, jobs)[0]
    ref = pw.one_process(model, EDM.from_config(cfg.diffusion), y, mask, noise, base=cfg, **heun20)
    rms = {mode: (got[mode]["images"] - ref).pow(2).mean().sqrt().item() for mode in jobs}
    assert rms["patch"] > 1e-3  # differs from the one-process image (stale keys/values) ...
    assert rms["patch"] < 0.8 * rms["naive_patch"], rms  # ... by less than bands that never exchange


def test_sample_cli_through_torchrun_as_users_type_it(trained, tmp_path):
    common = ["--run-dir", str(trained), "--prompt", "a red circle", "--prompt", "two blue squares",
              "--per-prompt", "2", "--steps", "6", "--cfg", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "engine" / "sample.py"), *common, "--parallel", "full_sync", "--out", str(tmp_path / "pp.png")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "full_sync on 2 processes" in proc.stdout and proc.stdout.count("wrote ") == 1, proc.stdout  # process 0
    from engine.sample import main

    main([*common, "--out", str(tmp_path / "one.png")])
    a, b = (read_png(tmp_path / f"{n}.png") for n in ("pp", "one"))
    assert a.shape == b.shape and (a - b).abs().max() <= 1  # the same images, up to rounding to 8 bits


@pytest.fixture(scope="module")
def trained_default(tmp_path_factory) -> Path:
    """The default recipe (configs/tiny.yaml: trained on 16-px images, 4 token rows) briefly trained (~15 s)."""
    return train_briefly(tmp_path_factory.mktemp("runs16"), "t16", 60, "data.num_samples=256")


def test_the_16px_default_samples_across_processes(trained_default, tmp_path):
    """The default samples at 16 px: full_sync on 2 processes gives the one-process images, and patch splits its 4
    token rows over 4 processes (one row each) into images of the same size and place."""
    common = ["--run-dir", str(trained_default), "--prompt", "a red circle", "--prompt", "two blue squares",
              "--per-prompt", "1", "--steps", "6", "--cfg", "3"]
    for mode, world in (("full_sync", 2), ("patch", 4)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(ROOT / "engine" / "sample.py"), *common, "--parallel", mode, "--out", str(tmp_path / f"{mode}.png")]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from engine.sample import main

    main([*common, "--out", str(tmp_path / "one.png")])
    one, sync, patch = (read_png(tmp_path / f"{n}.png") for n in ("one", "full_sync", "patch"))
    assert sync.shape == one.shape == patch.shape and (sync - one).abs().max() <= 1
    # Stale keys/values barely matter after 60 steps (measured: 0.002 of 255 in the mean); a band drawn in the wrong
    # place or at the wrong size would differ by tens.
    assert (patch - one).abs().float().mean() < 2


def read_png(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path))).int()


def test_a_killed_process_does_not_leave_the_other_waiting(tmp_path):
    y, mask, noise = pw.inputs()
    job = {"kind": "sample", "model": {"random": 0}, "inputs": (y, mask, noise), "kill_at": 5,
           "settings": dict(parallel="patch", nfe=199)}
    spec, procs = pw.launch(tmp_path, {"long": job}, wait=False)
    start = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=120)
        procs[1].wait(timeout=10)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -9  # process 1 died in the middle of sampling ...
    assert procs[0].returncode not in (0, None) and time.monotonic() - start < 120, err[-2000:]  # ... 0 stopped
    assert not Path(f"{spec}.rank0.pt").exists()


@pytest.mark.parametrize("mode,world,cfg_scale,message", [
    ("patch", 3, 3.0, "--parallel (sample.parallel): 3 processes cannot split the 8 token rows of a 32-pixel input "
                      "with patch 4 into equal bands; launch a number of processes that divides 8: 1, 2, 4, 8"),
    ("naive_patch", 16, 3.0, "16 processes cannot split the 8 token rows"),
    ("cfg_split", 4, 3.0, "--parallel cfg_split (sample.parallel) puts the conditional and unconditional halves on 2 "
                          "processes; launched with 4"),
    ("cfg_split", 2, 1.0, "needs guidance; --cfg 1"),
    ("none", 2, 3.0, "launched with 2 processes but --parallel none"),
])
def test_launches_that_cannot_work_are_refused(mode, world, cfg_scale, message):
    from engine.sampling.parallel_sample import check_parallel

    model_cfg = pw.random_model().cfg
    with pytest.raises(ConfigError) as e:
        check_parallel(mode, model_cfg, world, "edm", cfg_scale)
    assert message in str(e.value)
    check_parallel(mode, model_cfg, 2 if mode != "none" else 1, "edm", 3.0)  # the same mode where it fits


def test_a_bad_world_size_stops_the_launch_with_one_line_before_loading(tmp_path):
    run = tmp_path / "run"  # a config alone: the check comes before any checkpoint is read
    run.mkdir()
    from engine.config import load_config, save_config

    save_config(load_config(ROOT / "configs" / "tiny_32px.yaml"), run / "config.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
           str(ROOT / "engine" / "sample.py"), "--run-dir", str(run), "--prompt", "a red circle", "--parallel", "patch"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    message = "--parallel (sample.parallel): 3 processes cannot split the 8 token rows"
    assert proc.returncode != 0 and f"error: {message}" in proc.stderr, out[-3000:]
    root = out[out.index("Root Cause"):]  # torchrun's summary (it stops the processes still running)
    assert "exitcode  : 2" in root and f"traceback : {message}" in root, out[-3000:]
    assert 'File "' + str(ROOT) not in out, out[-3000:]  # no frame of our code: one line, not a traceback


@pytest.mark.parametrize("flags,message", [
    (["--parallel", "naive_patch"],
     "config: sample.moe_routing='displaced' needs the exchange of sample.parallel=patch or full_sync; naive_patch "
     "exchanges nothing: use local (no exchange at all) or sync; given: --parallel (sample.parallel)"),
    (["--parallel", "patch", "--warmup-evals", "0"], "config: sample.warmup_evals=0 must be >= 1"),
])
def test_parallel_flags_are_checked_with_the_config_rules(flags, message):
    from engine.config import load_config
    from engine.sample import parse_args
    from engine.sampling.settings import SamplerSettings

    args = parse_args(["--run-dir", "r", "--prompt", "p", *flags])
    with pytest.raises(ConfigError) as e:
        SamplerSettings.from_args(args, load_config(ROOT / "configs" / "tiny_32px.yaml"))
    assert str(e.value).startswith(message)
    args = parse_args(["--run-dir", "r", "--prompt", "p", *flags, "--moe-routing", "local", "--warmup-evals", "2"])
    assert SamplerSettings.from_args(args, load_config(ROOT / "configs" / "tiny_32px.yaml")).sample.parallel == flags[1]
