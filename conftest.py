"""Shared by tests/ and bench/: offline Hugging Face, skipping `gpu` tests without CUDA, a one-process group, and
the test suite spread over the machine's cores when pytest-xdist is installed."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

MAX_TEST_WORKERS = 4  # each worker builds its own session fixtures (a test attribute net, short runs): bound that cost


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS reports one: Linux; else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # an xdist worker: its share of the cores, for it and its subprocesses
    _share = max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))  # a user's own setting wins, here and in torch alike
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # Subprocesses that train "alone on both cores" (OMP_NUM_THREADS=2) share them with the other workers, and an
    # OpenMP thread spins while it waits, holding a core that the process it waits on needs: two such runs at once took
    # 73 s instead of 34. Passive waiting puts idle threads to sleep. (Until 2026-12-04 a run's first checkpoint put
    # libgomp into a sleeping wait by accident: engine/training/checkpoint.py, _no_collectives.)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """With pytest-xdist installed and no -n given, run the test suite (not the benchmarks, which must run alone) on
    one worker per core, a whole file per worker so module fixtures are built once. Most of the suite is
    single-threaded (the Triton interpreter, process start-up, the text encoder), so it gains from a second core even
    where torch would use both. `pytest -n 0` runs it in one process. Registered after xdist, this runs before xdist
    reads -n."""
    if not config.pluginmanager.hasplugin("xdist") or "PYTEST_XDIST_WORKER" in os.environ:
        return
    if config.option.numprocesses is not None or config.getoption("benchmark_only", False) or config.option.usepdb:
        return
    bench = Path(__file__).resolve().parent / "bench"
    if any(Path(arg.split("::")[0]).resolve().is_relative_to(bench) for arg in config.args):
        return
    workers = min(usable_cores(), MAX_TEST_WORKERS)
    if workers > 1:
        config.option.numprocesses = workers
        config.option.dist = "loadfile" if config.option.dist == "no" else config.option.dist
        config.option.benchmark_disable = True  # tests/ times nothing; this silences pytest-benchmark's xdist warning


def pytest_configure(config):
    if "PYTEST_XDIST_WORKER" in os.environ:  # each worker would repeat the controller's warning; nothing here is timed
        config.option.benchmark_disable = True


def pytest_runtest_logreport(report):
    """With TESSERA_FAILURES_LOG set, append each failure's traceback to that file as it happens: a device run cut off
    by its time limit ends before pytest's summary, and its failures would otherwise come back as bare names."""
    path = os.environ.get("TESSERA_FAILURES_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:  # the xdist controller writes, once
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def dist_env():
    """A one-process group (gloo on CPU, nccl on GPU) for code that runs the FSDP2 path in-process."""
    import torch.distributed as dist

    from engine.training.parallel import init_distributed

    d = init_distributed()
    yield d
    dist.destroy_process_group()
