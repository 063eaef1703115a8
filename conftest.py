"""Shared by tests/ and bench/: offline Hugging Face, skipping `gpu` tests without CUDA, a one-process group."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


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
