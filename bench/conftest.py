"""Benchmarks run in one process with a one-rank process group, through the same FSDP2 path as training."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


@pytest.fixture(scope="session")
def dist_env():
    import torch.distributed as dist

    from engine.parallel import init_distributed

    d = init_distributed()
    yield d
    dist.destroy_process_group()
