"""Process group, device, precision and FSDP2 sharding. All parallelism lives here, none in models/."""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_joined_gloo = False  # whether init_distributed joined a launcher's gloo group here (see exit_skipping_finalization)


def init_distributed() -> Dist:
    """Join the torchrun process group (nccl on GPU, gloo on CPU). Without torchrun, a one-process group is made,
    so the same sharded code path runs under plain `python engine/train.py`."""
    alone = "RANK" not in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    global _joined_gloo
    _joined_gloo = _joined_gloo or (backend == "gloo" and not alone)
    if not dist.is_initialized():
        device_id = device if device.type == "cuda" else None
        if alone:  # an in-memory store: no TCP port to pick, so no race with other processes for it
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
        else:
            dist.init_process_group(backend, device_id=device_id)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def joined_gloo() -> bool:
    """Whether init_distributed joined a gloo group of a launcher (torchrun) in this process; it may have been
    destroyed since. The one-process group made without a launcher does not count."""
    return _joined_gloo


def exit_skipping_finalization(status: int) -> NoReturn:
    """End the process with `status` after flushing stdout, stderr and logging, without finalizing the interpreter.

    For processes that ran backward passes under a gloo group, once the group is destroyed and everything written is
    closed. gloo's worker threads release finished collectives on their own schedule, and one launched during a
    backward pass holds a Python object (the context autograd stashes in thread-local state). Released while the
    interpreter finalizes, it needs the GIL, its thread is killed, and C++ aborts the finished process: SIGABRT, which
    torchrun reports as a failure (exit -6). Seen in 2-4% of 2-process CPU launches with torch 2.13."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to lose
            pass
    os._exit(status)


def param_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype of the parameters inside forward/backward (master weights stay fp32)."""
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("train.precision=bf16 but this GPU does not support bfloat16")
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def blocks_of(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every transformer block: the unit of sharding, checkpointing and compilation."""
    return [(container, i) for container in model.block_containers() for i in range(len(container))]


def parallelize(
    model: nn.Module, device: torch.device, dtype: torch.dtype, activation_checkpointing: bool = False,
    compile: bool = False, reshard_after_forward: bool = True, reduce_dtype: torch.dtype = torch.float32,
    compile_backend: str = "inductor", shard: bool = True,
) -> nn.Module:
    """FSDP2 `fully_shard` per block and at the root: parameters in `dtype` inside forward/backward, gradients reduced
    in `reduce_dtype`. reshard_after_forward=False keeps each block's gathered weights from its forward to its
    backward (FSDP1's SHARD_GRAD_OP), saving the all-gather that backward would repeat. compile: torch.compile each
    block whole (fullgraph: a graph break is an error, not a silent slowdown) with `compile_backend`.
    shard=False (one fp32 process: nothing to shard or cast) applies checkpointing and compilation only."""
    if not shard and (dist.get_world_size() > 1 or dtype != torch.float32):
        raise ValueError("parallelize(shard=False) is for one process in fp32: other runs need FSDP2")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The root returns the final linear's output, a view; nothing modifies it in place, so FSDP's warning is moot.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype)
    if compile:
        allow_block_recompiles(sum(1 for _ in blocks_of(model)))
    for container, i in blocks_of(model):
        block = container[i]
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            block = checkpoint_wrapper(block)
        if compile:  # static shapes: each block width gets its own graph, not one dynamic-shape graph for all
            block.compile(backend=compile_backend, fullgraph=True, dynamic=False)
        if shard:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        container[i] = block
    if not shard:
        return model
    # The root keeps its inputs as given: c_noise = log(sigma)/4 rounded to bf16 would merge nearby noise levels
    # (steps of 1.6-3% in sigma); the model casts x and y to the compute dtype itself.
    root_mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)
    return model


def allow_block_recompiles(n_blocks: int) -> None:
    """Every block runs one forward code object, so Dynamo counts each block of another width or kind (layer-wise
    scaling, MoE in every other block), and each grad mode (no-grad sampling), as a recompile of that one object. Its
    default limit (8) is below MicroDiT_XL_2's 32 blocks, and with fullgraph the excess is an error: the limit must
    cover the blocks x two grad modes."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 2 * n_blocks)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * n_blocks)


def local_tensors(params) -> list[torch.Tensor]:
    """This process's shard of each parameter (plain tensors pass through)."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters left behind by a no-grad forward (FSDP2 reshards the root only in backward).
    Needed before touching shards directly, as the EMA update does."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
