"""train.init_resize_patches: a patch-4 network at 16 px loaded into a patch-8 network at 32 px (the same token grid)
starts as the old network on the 2x2-pooled image, its output upsampled by pixel replication."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.training.checkpoint import Checkpointer, load_model_weights
from engine.training.patch_resize import grow, growth_factor
from models.sizes import build_model, model_config


def _net(patch: int, side: int, seed: int | None = None):
    cfg = model_config("MicroDiT_Nano_4", input_size=side, patch_size=patch, in_channels=3, caption_channels=32,
                       pos_interp_scale=0.5, pixel_head=0)  # a 4x4 grid at every size here
    if seed is not None:
        torch.manual_seed(seed)
    net = build_model(cfg)
    if seed is not None:  # adaLN-Zero starts every block and the output at zero: draw every weight so all of it counts
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
    return net.eval()


def test_grown_network_is_the_old_one_on_the_pooled_image(tmp_path):
    old, old_ema = _net(4, 16, seed=0), _net(4, 16, seed=1)
    path = Checkpointer(tmp_path).save(1, model=old, ema=old_ema)
    new, new_ema = _net(8, 32, seed=2), _net(8, 32, seed=3)
    load_model_weights(path, new, ema=new_ema, resize_patches=True)

    torch.manual_seed(4)
    x, c_noise, y = torch.randn(3, 3, 32, 32), torch.randn(3), torch.randn(3, 5, 32)
    for a, b in ((old, new), (old_ema, new_ema)):
        with torch.no_grad():
            want = F.interpolate(a.unpatchify(a(F.avg_pool2d(x, 2), c_noise, y)), scale_factor=2, mode="nearest")
            got = b.unpatchify(b(x, c_noise, y))
        assert want.abs().mean() > 0.1  # a network that outputs zeros would pass trivially
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_without_the_flag_or_with_a_non_multiple_the_load_is_refused(tmp_path):
    path = Checkpointer(tmp_path).save(1, model=_net(4, 16, seed=0))
    with pytest.raises(ValueError, match=r"x_embedder\.proj\.weight \(checkpoint \(128, 3, 4, 4\), model \(128, 3, 8, 8\)"
                       r".*train\.init_resize_patches=true grows them"):
        load_model_weights(path, _net(8, 32))
    with pytest.raises(ValueError, match="integer multiple") as refused:
        load_model_weights(path, _net(6, 24), resize_patches=True)
    with pytest.raises(ValueError, match="wrong shape") as narrower:  # patch 8 into patch 4: nothing to grow
        load_model_weights(Checkpointer(tmp_path / "p8").save(1, model=_net(8, 32, seed=0)), _net(4, 16))
    assert "grows them" not in str(refused.value) + str(narrower.value)


def test_grow_orders_output_rows_as_patchify():
    # output rows of a 2x2 patch of 3 channels, values = (row, column, channel) codes
    p, c = 2, 3
    rows = torch.tensor([[100 * i + 10 * j + ch] for i in range(p) for j in range(p) for ch in range(c)],
                        dtype=torch.float)
    grown = grow("final_layer.linear.weight", rows, p, 2).reshape(4, 4, c)
    for i in range(4):
        for j in range(4):
            assert grown[i, j].tolist() == [100 * (i // 2) + 10 * (j // 2) + ch for ch in range(c)]
    assert growth_factor((8, 3, 4, 4), (8, 3, 12, 12)) == 3


# ---------------------------------------------------------------- two ranks, FSDP2 on CPU


def _fsdp_worker(out: Path) -> None:
    """Grow the saved patch-4 checkpoint into an FSDP2-sharded patch-8 network; write each full tensor from rank 0."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    net, ema = _net(8, 32, seed=5), _net(8, 32, seed=6)
    mesh = init_device_mesh("cpu", (2,))
    for m in (net, ema):
        for block in m.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(m, mesh=mesh)
    load_model_weights(out / "ckpt", net, ema=ema, resize_patches=True)
    full = {name: {k: getattr(v, "full_tensor", lambda v=v: v)() for k, v in m.state_dict().items()}
            for name, m in (("model", net), ("ema", ema))}
    if dist.get_rank() == 0:
        torch.save(full, out / "grown.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_shards_load_the_grown_tensors(tmp_path):
    """Under FSDP2 every parameter is a DTensor shard: the grown patch tensors are placed as the model's are, and the
    sharded model equals the one-process load."""
    old, old_ema = _net(4, 16, seed=0), _net(4, 16, seed=1)
    Checkpointer(tmp_path).save(1, model=old, ema=old_ema).rename(tmp_path / "ckpt")
    want, want_ema = _net(8, 32, seed=2), _net(8, 32, seed=3)
    load_model_weights(tmp_path / "ckpt", want, ema=want_ema, resize_patches=True)

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    got = torch.load(tmp_path / "grown.pt")
    for name, module in (("model", want), ("ema", want_ema)):
        for k, v in module.state_dict().items():
            if k != "pos_embed":
                assert torch.equal(got[name][k], v), (name, k)


if __name__ == "__main__":
    from engine.training.parallel import exit_skipping_finalization

    _fsdp_worker(Path(sys.argv[1]))
    exit_skipping_finalization(0)
