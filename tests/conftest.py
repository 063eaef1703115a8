"""Fixtures shared by several test files: a test attribute net, concurrent runs of short training jobs, and three
short runs that the evaluation tests read."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def attribute_net_file(tmp_path_factory):
    """A 32-px attribute net trained briefly (the real one trains 800 steps on 12K images; this one 150 on 4K, in
    about 12 s: its features order real < wrong colours < noise as far apart as after 250 steps, FD ratios 0.22 and
    0.19). install_attribute_net puts it where evaluations in tests look, so they do not train their own."""
    from engine.eval.attribute_net import train_attribute_net

    with torch.random.fork_rng():
        net = train_attribute_net(32, seed=0, num_images=4096, steps=150)
    path = tmp_path_factory.mktemp("attribute_net") / "net.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def install_attribute_net(attribute_net_file):
    """Put the test attribute net where evaluations of runs under `out_dir` look for it (its .cache), so they do not
    train their own (about a minute each)."""
    import shutil
    from pathlib import Path

    from engine.eval.attribute_net import cache_path

    def install(out_dir: Path) -> None:
        target = cache_path(32, Path(out_dir) / ".cache")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(attribute_net_file, target)

    return install


@pytest.fixture(scope="session")
def run_concurrently():
    """Run several commands at once and assert that each ends with status 0, showing the tail of a failure's output.
    For short training runs whose time is mostly start-up (imports, the text encoder): one core each."""
    import os
    import subprocess
    import tempfile

    def run(cmds: list[list[str]], cwd, timeout: float = 600) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        logs = [tempfile.TemporaryFile() for _ in cmds]
        procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
                 for cmd, log in zip(cmds, logs)]
        try:
            for proc in procs:
                proc.wait(timeout=timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:  # a timeout: stop the others too
                    proc.kill()
        for cmd, proc, log in zip(cmds, procs, logs):
            log.seek(0)
            assert proc.returncode == 0, f"{cmd}:\n" + log.read().decode(errors="replace")[-3000:]

    return run


@pytest.fixture(scope="session")
def short_runs(tmp_path_factory, install_attribute_net, run_concurrently):
    """Two 2-step runs (seeds 0 and 1) at 32 px and one at 16 px, with the test attribute net in their cache, for the
    tests that evaluate a real run folder (evaluate.py's protocol, compare, bad input, every metric end to end)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("runs")
    install_attribute_net(out)
    common = ["train.steps=2", "train.ckpt_every=2", "train.progress_bar=false", "data.num_samples=64",
              "sample.steps=2", "sample.per_prompt=1", f"run.out_dir={out}"]
    train = [sys.executable, str(root / "engine" / "train.py"), "--config", str(root / "configs" / "tiny_32px.yaml")]
    run_concurrently([[*train, f"run.name={name}", *common, *extra]
                      for name, extra in (("a", []), ("b", ["run.seed=1"]), ("small", ["data.image_size=16"]))], root)
    return out


@pytest.fixture
def solver_spy(monkeypatch):
    """spy(name) replaces solver `name` for this test by one that records its start state and noise levels (in the
    dict it returns, keys "x" and "sigmas") and returns the state unchanged: what a start hands the solver."""
    from engine.sampling.solvers import SOLVERS, Solver

    def spy(name: str) -> dict:
        seen = {}

        def record(denoise, x, sigmas, orders, variant):
            seen["x"], seen["sigmas"] = x, sigmas
            return x

        monkeypatch.setitem(SOLVERS, name, Solver(record, SOLVERS[name].multistep, SOLVERS[name].max_order))
        return seen

    return spy
