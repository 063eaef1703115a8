"""Bad user input ends an entry point with one line naming the key or file, exit status 2 and no traceback; under
torchrun the launcher's failure summary names that line as the root cause."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "engine" / "train.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["train.micro_batch=0"], "error: config: train.micro_batch=0 must be >= 1"),
    (["--config", "{tmp}/bad.yaml"], "error: config file {tmp}/bad.yaml: not UTF-8 text (byte 0xff at offset 13)"),
    (["data.text_encoder={tmp}/no_such_encoder"],  # raised inside transformers before
     "error: config: data.text_encoder='{tmp}/no_such_encoder' cannot be loaded: text encoder"),
])
def test_one_process_prints_one_line_and_exits_2(tmp_path, args, message):
    (tmp_path / "bad.yaml").write_bytes(b"run:\n  name: \xff\n")
    args = [a.format(tmp=tmp_path) for a in args]
    proc = run([sys.executable, TRAIN, f"run.out_dir={tmp_path / 'runs'}", *args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message.format(tmp=tmp_path)), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_torchrun_names_our_message_as_the_root_cause(tmp_path):
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", TRAIN,
                "train.global_batch=-32"], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    root = out[out.index("Root Cause"):]
    assert "exitcode  : 2" in root and "traceback : config: train.global_batch=-32 must be >= 1" in root, out
    assert "To enable traceback" not in out and 'File "' + str(ROOT) not in out, out  # no frame of our code


@pytest.mark.parametrize("entry,args,message", [
    ("convert.py", ["{tmp}/missing.pt", "{tmp}/out"], "error: checkpoint file not found: {tmp}/missing.pt"),
    ("precompute.py", ["--source", "{tmp}/nope", "--out", "{tmp}/out", "--vae", "{tmp}/vae"],
     "error: --source not found or empty: {tmp}/nope"),
    ("debias.py", ["sample", "--run", "{tmp}/out", "--prompt", "a circle", "--target", "red=0.7"],
     "error: --target 'red=0.7': the weights sum to 0.7, not 1"),
    ("debias.py", ["train-predictor", "--run", "{tmp}/out"], "error: --run {tmp}/out: no config.yaml there"),
    ("fewshot.py", ["--run", "{tmp}/out", "--shots", "1", "32"], "error: --shots 32: a task has 16 shots per class"),
    ("fewshot.py", ["--run", "{tmp}/out", "--rank", "0"], "error: --rank 0: LoRA rank must be >= 1"),
])
def test_the_other_entry_points_end_bad_input_the_same_way(tmp_path, entry, args, message):
    proc = run([sys.executable, str(ROOT / "engine" / entry), *[a.format(tmp=tmp_path) for a in args]], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message.format(tmp=tmp_path)), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
