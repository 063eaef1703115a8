"""global_batch_indices / rank_slice: exact epochs, boundary-spanning steps, purity, any process split."""
import pytest
import torch

from engine.data.sampler import epoch_permutation, global_batch_indices, rank_slice


def stream(steps, batch, n, seed):
    return torch.cat([global_batch_indices(s, batch, n, seed) for s in range(steps)])


def test_every_sample_exactly_once_per_epoch():
    n, batch = 60, 12  # 5 steps per epoch, no boundary crossing
    s = stream(15, batch, n, seed=4)
    epochs = s.view(3, n)
    for e in epochs:
        assert torch.equal(e.sort().values, torch.arange(n))
    assert not torch.equal(epochs[0], epochs[1])  # each epoch is reshuffled
    assert not torch.equal(epochs[0], torch.arange(n))


def test_steps_spanning_epoch_boundaries():
    n, batch = 10, 4  # step 2 takes positions 8..11: last 2 of epoch 0, first 2 of epoch 1
    e0, e1 = epoch_permutation(n, 7, 0), epoch_permutation(n, 7, 1)
    assert torch.equal(global_batch_indices(2, batch, n, 7), torch.cat([e0[8:], e1[:2]]))
    s = stream(10, batch, n, seed=7)  # 40 positions = 4 whole epochs
    for e in s.view(4, n):
        assert torch.equal(e.sort().values, torch.arange(n))


def test_batch_larger_than_dataset_spans_several_epochs():
    n, batch = 3, 8
    idx = global_batch_indices(1, batch, n, seed=0)  # positions 8..15: epochs 2 (part), 3, 4, 5 (part)
    expected = torch.cat([epoch_permutation(n, 0, e) for e in range(2, 6)])[2:10]
    assert idx.shape == (8,) and idx.dtype == torch.long and torch.equal(idx, expected)


def test_pure_function_of_arguments():
    a = global_batch_indices(123, 16, 1000, seed=1)
    for s in (5, 0, 999):  # unrelated calls in between: no hidden state
        global_batch_indices(s, 16, 1000, seed=1)
    b = global_batch_indices(123, 16, 1000, seed=1)
    assert torch.equal(a, b)
    b[:] = -1  # the result is not a view of any cached permutation
    assert torch.equal(global_batch_indices(123, 16, 1000, seed=1), a)
    assert not torch.equal(a, global_batch_indices(123, 16, 1000, seed=2))
    assert (a >= 0).all() and (a < 1000).all()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6])
def test_any_process_split_sees_the_same_global_batch(world_size):
    for step in (0, 4, 9):
        g = global_batch_indices(step, 12, 50, seed=3)
        parts = [rank_slice(g, r, world_size) for r in range(world_size)]
        assert all(len(p) == 12 // world_size for p in parts)
        assert torch.equal(torch.cat(parts), g)


def test_divisibility_and_argument_errors():
    g = global_batch_indices(0, 10, 100, seed=0)
    with pytest.raises(ValueError, match=r"global_batch \(10\) must be divisible by world_size \(4\)"):
        rank_slice(g, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        rank_slice(g, 2, 2)
    for args, name in [((-1, 4, 10, 0), "step"), ((0, 0, 10, 0), "global_batch"),
                       ((0, 4, 0, 0), "num_samples"), ((0, 4, 10, -1), "seed")]:
        with pytest.raises(ValueError, match=name):
            global_batch_indices(*args)
