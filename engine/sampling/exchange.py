"""What the processes of patch-parallel sampling send each other (DistriFusion's displaced exchange).

Every model evaluation, each layer that needs the other bands (self-attention keys/values, router scores) hands its
fresh tensor for this process's band to `all_bands(key, fresh)` and gets the tensor of the whole image back:

  synchronous evaluation   every band's fresh tensor, by a blocking all-gather of this one tensor;
  displaced evaluation     this band's fresh tensor and the other bands' tensors of the previous evaluation. The fresh
                           tensors of all layers are packed into one byte buffer; when the evaluation ends, one
                           asynchronous all-gather sends it, and the next evaluation waits on it at its first
                           displaced layer, so the transfer overlaps the solver step and the layers before that one.

`gather_now` is the blocking all-gather for exchanges that must be exact (the output bands, synchronous routing).
Seconds spent waiting on communication are counted (host side: on a GPU, waits only order streams).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

ALIGN = 16  # bytes: every packed tensor starts at a multiple, so a byte slice views as any dtype


class Exchange:
    def __init__(self, displaced: bool, warmup_evals: int = 1, total_evals: int | None = None, group=None):
        """displaced: evaluations after the first `warmup_evals` use the previous evaluation's values of the other
        bands (False: every exchange is synchronous). total_evals: the last evaluation sends nothing."""
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.displaced, self.warmup, self.total = displaced, warmup_evals, total_evals
        self.evals = 0  # evaluations begun
        self.layout: dict[str, tuple[int, torch.dtype, torch.Size]] = {}  # key -> byte offset, dtype, shape
        self.nbytes = 0
        self.last: dict[str, torch.Tensor] = {}  # key -> (N, *shape): every band's value of the previous evaluation
        self.send = self.recv = self.pending = None
        self.received = 0  # the displaced evaluation whose values `last` holds
        self.wait_s = 0.0
        self.sent_bytes = 0

    # ---- evaluation boundaries (BandModel calls these around every forward) ---------------------------------------
    @property
    def synchronous(self) -> bool:
        """Whether the evaluation in progress exchanges synchronously."""
        return not self.displaced or self.evals <= self.warmup

    def begin_eval(self) -> None:
        self.evals += 1

    def end_eval(self) -> None:
        """After a displaced evaluation, send its packed tensors (not after the last: nobody would read them)."""
        if self.synchronous or self.evals == self.total:
            return
        self.pending = dist.all_gather_single(self.recv.view(-1), self.send, group=self.group, async_op=True)
        self.sent_bytes += self.send.numel()

    def finish(self) -> None:
        """Wait for a send still in flight (sampling stopped before total_evals, or total_evals unknown)."""
        if self.pending is not None:
            self._wait()

    # ---- exchanges ------------------------------------------------------------------------------------------------
    def gather_now(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every band's `t` concatenated along `dim` in band order, by a blocking all-gather."""
        return torch.cat(self._gather(t).unbind(0), dim=dim)

    def all_bands(self, key: str, fresh: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole image's tensor along `dim`: this band's `fresh`, the others' fresh (synchronous evaluation) or
        from the previous evaluation (displaced). Layers call it in the same order every evaluation."""
        if self.synchronous:
            self._register(key, fresh)
            out = self._gather(fresh)  # (N, *fresh.shape)
            if self.displaced and self.evals == self.warmup:  # the next evaluation reads these as stale
                self.last[key] = out
            return torch.cat(out.unbind(0), dim=dim)
        self._receive(fresh.device)
        offset, dtype, shape = self.layout[key]
        self._slot(self.send, offset, dtype, shape).copy_(fresh)
        bands = list(self.last[key].unbind(0))
        bands[self.rank] = fresh
        return torch.cat(bands, dim=dim)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """(N, *t.shape): every band's t, blocking."""
        out = t.new_empty(self.world * t.shape[0], *t.shape[1:])  # the bands stacked along dim 0 (what gloo takes)
        start = time.perf_counter()
        dist.all_gather_single(out, t.contiguous(), group=self.group)
        self.wait_s += time.perf_counter() - start
        self.sent_bytes += t.numel() * t.element_size()
        return out.view(self.world, *t.shape)

    # ---- the packed buffer ----------------------------------------------------------------------------------------
    def _register(self, key: str, t: torch.Tensor) -> None:
        if key in self.layout:
            return
        self.layout[key] = (self.nbytes, t.dtype, t.shape)
        self.nbytes += -(-t.numel() * t.element_size() // ALIGN) * ALIGN

    @staticmethod
    def _slot(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        """A (..., *shape) view of `dtype` into the byte buffer buf (..., nbytes) at `offset`."""
        n = shape.numel() * torch.empty((), dtype=dtype).element_size()
        return buf[..., offset:offset + n].view(dtype).view(*buf.shape[:-1], *shape)

    def _receive(self, device) -> None:
        """Once per displaced evaluation: wait for the previous one's send, point `last` at what arrived."""
        if self.received == self.evals:
            return
        self.received = self.evals
        if self.send is None:  # the first displaced evaluation: the layout is known, stale values are in `last`
            self.send = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
            self.recv = torch.empty(self.world, self.nbytes, dtype=torch.uint8, device=device)
            return
        self._wait()
        self.last = {key: self._slot(self.recv, *spec) for key, spec in self.layout.items()}  # (N, *shape) each

    def _wait(self) -> None:
        start = time.perf_counter()
        self.pending.wait()
        self.wait_s += time.perf_counter() - start
        self.pending = None
