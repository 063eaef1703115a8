"""Fixtures shared by the evaluation tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def attribute_net_file(tmp_path_factory):
    """A 32-px attribute net trained briefly (the real one trains 800 steps on 12K images; this one 250 on 4K: enough
    for its features to order real < wrong colours < noise, in a fraction of the time). Copy it into a run's cache
    (engine.eval.attribute_net.cache_path) so evaluations in tests do not train their own."""
    from engine.eval.attribute_net import train_attribute_net

    with torch.random.fork_rng():
        net = train_attribute_net(32, seed=0, num_images=4096, steps=250)
    path = tmp_path_factory.mktemp("attribute_net") / "net.pt"
    torch.save(net.state_dict(), path)
    return path
