"""Muon for the hidden matrices, AdamW for the rest, in one optimizer (one state dict, one checkpoint entry).

Muon (Jordan et al. 2024; the RMS-matched step of Liu et al. 2025, "Muon is scalable for LLM training") replaces a
matrix's momentum by the nearest semi-orthogonal matrix (five quintic Newton-Schulz iterations) and scales it so that
its RMS matches an AdamW step, which lets it share AdamW's learning rate and weight decay. torch.optim.Muon does the
2-D case; this class exists because the engine also needs:
  - batched expert weights (E, d, h): each expert's matrix is orthogonalised on its own, and convolution kernels
    (out, in, k, k) as (out, in*k*k) matrices; torch's Muon refuses both;
  - one optimizer for both kinds of parameters, so that checkpoints, the lr schedule and the loss-spike skip see
    one object (its AdamW groups step through torch's fused AdamW kernel, as build_optimizer's AdamW does);
  - the loss-spike skip on the device (``found_inf``, as fused AdamW does): a skipped step leaves parameters and
    state as they were, without a host sync;
  - FSDP2-sharded parameters, with the Newton-Schulz work split over the processes: an expert bank sharded by
    expert is orthogonalised where it lies (each process holds whole experts), and every other matrix is gathered to
    one owning process (owners balanced by FLOPs; the rows go to the owner alone), orthogonalised there and its rows
    scattered back. Gathering first and scattering after all owners have finished lets the owners work at the same
    time, so a step pays about 1/world of the iterations instead of all of them.
tests/test_muon.py checks the 2-D steps against torch.optim.Muon and the others against torch.optim.AdamW."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.adam import adam

# Keller Jordan's quintic coefficients (also torch.optim.Muon's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the Newton-Schulz products: 'bf16', 'fp32', or 'auto' = bf16 on a GPU (tensor cores; the
    reference implementations' choice) and fp32 elsewhere. A CPU without bf16 matrix units (AMX) emulates bf16
    products: on this project's 2-core machine they ran 3-4x slower than fp32 ones (docs/results/cpu_models.md:
    Muon)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return NS_DTYPES[name]


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximately U V^T of each matrix in g (..., m, n), by default in bf16 like the reference implementations:
    the iteration only pushes the singular values into a band around 1 (about 0.5 to 1.5), and bf16 halves its cost
    on a GPU."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = g.size(-2) <= g.size(-1)
    if not wide:
        x = x.mT
    norm = x.norm() if x.dim() == 2 else x.norm(dim=(-2, -1), keepdim=True)
    x = x / norm.clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    mm = torch.addmm if x.dim() == 2 else torch.baddbmm  # fused as torch.optim.Muon does: the same bf16 rounding
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return (x if wide else x.mT).to(g.dtype)


def orthogonalise(mats: list[Tensor], steps: int, dtype: torch.dtype = torch.bfloat16) -> list[Tensor]:
    """newton_schulz of each (..., m, n) stack in `mats`, with one call per matrix shape (a tall matrix as its
    transpose): the CPU reference's 73 Muon matrices take 15 calls, fewer and larger products (a few percent of its
    step on a 2-core CPU, docs/results/cpu_models.md). Each matrix is still normalised and iterated on its own, so the
    result is that of one call per matrix."""
    wide = [m if m.size(-2) <= m.size(-1) else m.mT for m in mats]
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, w in enumerate(wide):
        by_shape.setdefault(tuple(w.shape[-2:]), []).append(i)
    out: list[Tensor] = [None] * len(mats)
    for shape, members in by_shape.items():
        flat = [wide[i].reshape(-1, *shape) for i in members]
        # a shape of its own stays as it is (a 2-D matrix takes torch.optim.Muon's addmm path)
        result = newton_schulz(wide[members[0]] if len(members) == 1 else torch.cat(flat), steps, dtype=dtype)
        for i, part in zip(members, result.reshape(-1, *shape).split([f.size(0) for f in flat])):
            part = part.reshape(wide[i].shape)
            out[i] = part if wide[i] is mats[i] else part.mT
    return out


def as_matrices(t: Tensor, batched: bool) -> Tensor:
    """The matrices Muon orthogonalises: an expert bank (E, d, h) stays batched, a conv kernel becomes (out, rest)."""
    return t if batched or t.dim() == 2 else t.reshape(t.size(0), -1)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def matrix_shape(shape: torch.Size, batched: bool) -> tuple[int, ...]:
    """The shape as_matrices gives, from the shape alone (no reshape of a sharded tensor just to read it)."""
    return tuple(shape) if batched or len(shape) == 2 else (shape[0], math.prod(shape[1:]))


def _ns_flops(shape: tuple[int, ...], steps: int) -> int:
    """Matrix-product FLOPs of `steps` iterations on a (..., m, n) stack (each iteration: X X^T, G G and (...) X, for
    an (m, n) matrix 4 r^2 c + 2 r^3 with r = min(m, n), c = max(m, n))."""
    r, c = sorted(shape[-2:])
    return math.prod(shape[:-2]) * steps * (4 * r * r * c + 2 * r ** 3)


def _whole_here(p: Tensor, batched: bool) -> bool:
    """Whether this process holds whole matrices of `p` and orthogonalises them without communication: an unsharded
    parameter, a mesh of one process, or an expert bank split along its expert dimension (each expert's matrix is
    orthogonalised on its own)."""
    from torch.distributed.tensor import Shard

    if not hasattr(p, "device_mesh") or p.device_mesh.size() == 1:
        return True
    return batched and len(p.placements) == 1 and p.placements[0] == Shard(0)


def _split(params: list[Tensor], batched: bool, steps: int) -> dict[Tensor, int]:
    """Owner (rank in the mesh) of each sharded matrix that must be gathered to be orthogonalised: the largest first,
    each to the process with the least work so far. Every process computes the same plan from the global shapes."""
    gathered = [p for p in params if not _whole_here(p, batched)]
    if any(p.device_mesh.ndim != 1 for p in gathered):
        raise ValueError("Muon splits its work over a 1-D device mesh (FSDP2 as the engine shards it), not "
                         f"{gathered[0].device_mesh}")
    if not gathered:
        return {}
    load = [0] * gathered[0].device_mesh.size()
    owners = {}
    cost = {p: _ns_flops(matrix_shape(p.shape, batched), steps) for p in gathered}
    for p in sorted(gathered, key=lambda p: -cost[p]):
        owner = min(range(len(load)), key=load.__getitem__)
        owners[p] = owner
        load[owner] += cost[p]
    return owners


def _gather_to_owner(update: Tensor, like: Tensor, owner: int) -> tuple[list[Tensor] | None, object]:
    """The chunks of `like`'s whole update on its owner (None elsewhere) and the pending receive; _joined puts them
    together once it is waited on. Each process sends its rows to the owner alone, where an all-gather would send
    every process all of them. Shard(0) lays rows out as torch.chunk does (full chunks, then a short one, then empty
    ones), so chunks padded to one length and concatenated hold the rows in order, padding only at the end."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = like.device_mesh
    if tuple(like.placements) != (Shard(0),):  # another layout: gathered whole everywhere, kept by the owner
        full = _gather_everywhere(update, like)
        return ([full] if mesh.get_local_rank() == owner else None), None
    group, world, rows = mesh.get_group(), mesh.size(), like.shape[0]
    chunk = -(-rows // world)
    sent = update  # a full chunk goes as it is; only a short or empty one is padded (a copy)
    if update.shape[0] != chunk:
        sent = update.new_zeros((chunk, *update.shape[1:]))
        sent[:update.shape[0]] = update
    parts = [torch.empty_like(sent) for _ in range(world)] if mesh.get_local_rank() == owner else None
    work = dist.gather(sent, parts, dst=dist.get_global_rank(group, owner), group=group, async_op=True)
    return parts, work


def _gather_everywhere(update: Tensor, like: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(update, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def _joined(parts: list[Tensor], like: Tensor) -> Tensor:
    """The owner's whole update from _gather_to_owner's chunks: padding only ever follows the last row."""
    return torch.cat(parts)[:like.shape[0]]


def _scatter(full: Tensor | None, like: Tensor, owner: int) -> Tensor:
    """This process's rows of `full`, which only the owner holds (None elsewhere)."""
    from torch.distributed.tensor import distribute_tensor

    if full is None:  # not the owner: the rows come from the owner; this placeholder's values are never read
        full = torch.empty(like.shape, dtype=like.dtype, device=_local(like).device)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=owner).to_local()


class MuonAdamW(torch.optim.Optimizer):
    """Groups with ``muon=True`` take Muon steps (momentum, Nesterov, Newton-Schulz, RMS matched to AdamW: the step
    of a (m, n) matrix is scaled by 0.2 sqrt(max(m, n))); the others take AdamW steps. Set ``batched=True`` on a
    Muon group whose tensors are stacks of matrices (MoE experts). ``ns_dtype`` ('auto', 'bf16', 'fp32'; see
    ns_dtype) is a setting of the run, not of its state: a resumed run takes it from its config."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 momentum: float = 0.95, ns_steps: int = 5, ns_dtype: str = "auto"):
        defaults = dict(lr=lr, weight_decay=0.0, betas=betas, eps=eps, momentum=momentum, nesterov=True,
                        ns_steps=ns_steps, muon=False, batched=False)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.dim() < 2 or (group["batched"] and p.dim() != 3):
                        raise ValueError(f"a Muon group holds a tensor of shape {tuple(p.shape)}: matrices only")
        if ns_dtype != "auto" and ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype {ns_dtype!r}: must be 'auto', {', '.join(map(repr, NS_DTYPES))}")
        self.ns_dtype = ns_dtype
        self.found_inf: Tensor | None = None  # set by the training step: 1 skips this step on the device
        self._owners: dict[int, dict[Tensor, int]] = {}  # per Muon group: the split, planned once

    def _plan(self, index: int) -> dict[Tensor, int]:
        """The owners of group `index`'s gathered matrices (_split), from all its parameters, so that the step and
        newton_schulz_flops follow one plan."""
        if index not in self._owners:
            group = self.param_groups[index]
            self._owners[index] = _split(group["params"], group["batched"], group["ns_steps"])
        return self._owners[index]

    def newton_schulz_flops(self) -> int:
        """Matrix-product FLOPs of this process's orthogonalisations in one step: the cost Muon adds to a training
        step, whatever the batch (with sharded parameters, this process's share of the split)."""
        total = 0
        for index, group in enumerate(self.param_groups):
            if group["muon"]:
                owners = self._plan(index)
                for p in group["params"]:
                    if p in owners and owners[p] != p.device_mesh.get_local_rank():
                        continue
                    held = p if p in owners else _local(p)  # an owned matrix is orthogonalised whole
                    total += _ns_flops(matrix_shape(held.shape, group["batched"]), group["ns_steps"])
        return total

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if params and group["muon"]:
                self._muon(params, group, self._plan(index))
            elif params:
                self._adamw(params, group)
        return loss

    def _muon(self, params: list[Tensor], group: dict, owners: dict[Tensor, int]) -> None:
        mu, lr, decay, batched, steps = (group[k] for k in ("momentum", "lr", "weight_decay", "batched", "ns_steps"))
        # 0 on a skipped step: every update below is multiplied by it, on the device
        keep = torch.ones((), device=params[0].grad.device) if self.found_inf is None else 1 - self.found_inf
        kept = keep > 0
        here: list[tuple[Tensor, Tensor]] = []  # (parameter, update) of the matrices held whole on this process
        gathered: list[tuple[Tensor, Tensor | None]] = []  # with the full update where this process owns it

        def apply(p: Tensor, ortho: Tensor) -> None:
            rows, cols = matrix_shape(p.shape, batched)[-2:]
            param = _local(p)
            param.mul_(1 - lr * decay * keep)
            param.sub_(ortho * (keep * lr * 0.2 * math.sqrt(max(rows, cols))))

        for p in params:
            grad = _local(p.grad)
            grad = torch.where(kept, grad, 0.0)  # a skipped step's gradient may be NaN
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = _local(state["momentum_buffer"])
            buf.lerp_(grad, (1 - mu) * keep)
            update = grad.lerp(buf, mu) if group["nesterov"] else buf
            if _whole_here(p, batched):
                here.append((p, update))
            else:
                gathered.append((p, *_gather_to_owner(update, p, owners[p])))
        # every gather is in flight before any owner waits, and done before any owner starts, so the owners'
        # iterations run at the same time; the group's updates are held at once (an fp32 copy of this process's Muon
        # matrices) to be stacked by shape
        for _, _, work in gathered:
            if work is not None:
                work.wait()
        mine = here + [(p, _joined(parts, p)) for p, parts, _ in gathered if parts is not None]
        dtype = ns_dtype(self.ns_dtype, params[0].device)
        orthos = orthogonalise([as_matrices(update, batched) for _, update in mine], steps, dtype)
        ortho = {p: o.reshape(update.shape) for (p, update), o in zip(mine, orthos)}
        for p, _ in here:
            apply(p, ortho[p])
        for p, _, _ in gathered:
            apply(p, _scatter(ortho.get(p), p, owners[p]))

    def _adamw(self, params: list[Tensor], group: dict) -> None:
        """torch's fused AdamW, as build_optimizer's: it skips the step on the device when found_inf is 1."""
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.grad.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        (b1, b2) = group["betas"]
        adam(params, [p.grad for p in params], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
             [], [st["step"] for st in states], fused=True, found_inf=self.found_inf, decoupled_weight_decay=True,
             amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=False)
