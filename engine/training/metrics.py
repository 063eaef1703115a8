"""Throughput, MFU, memory and dollar-cost accounting per log window, and the run loggers.

The trainer drives a ``ThroughputMeter`` with ``step_start() / data_ready() / step_end()``
around every step and calls ``report(step)`` on log steps, after the log step's host sync: the
window ends at that call, so its wall time covers the device work of its steps (``step_end``
returns as soon as the host has queued a step, long before a GPU finishes it). The dict it returns goes to
``MetricsLogger.log(step, metrics)``, which writes JSONL and TensorBoard on rank 0.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from engine.training.billing import process_age_s

__all__ = [
    "PEAK_BF16_TFLOPS", "peak_flops", "peak_flops_for_name", "peak_memory_gib",
    "ThroughputMeter", "JsonlLogger", "TensorBoardLogger", "MetricsLogger",
]

# Dense bf16 tensor-core peak in TFLOP/s (no 2:4 sparsity: datasheets print the sparse figure, marked *, which is
# twice this), keyed by a name inside torch.cuda.get_device_name(). A key matches whole words only ("A10" is neither
# "A10G" nor "A100", "H200" not "GH200"); the longest matching key wins ("H100 NVL" before "H100").
# Sources, NVIDIA's product datasheets and architecture whitepapers (sparse figure / 2 where only that is printed):
#   H100 SXM 1,979* / PCIe 1,513* / NVL 1,671* (H100 datasheet); H800 SXM and PCIe: the H100 SXM and PCIe figures;
#   H200 SXM 1,979* / NVL 1,671* (H200 datasheet); GH200 1,979* (Grace Hopper datasheet); B200 (HGX) 4.5 PF* and
#   GB200 5 PF* per GPU (HGX B200 / GB200 NVL72 specifications); A100 and A800 312 (A100 datasheet); A10 125 (A10
#   datasheet); L40S 362.05, L40 181.05, L4 121 (their datasheets); RTX 6000 Ada 364.2 (Ada whitepaper, FP32
#   accumulate); RTX 4090 165.2 (Ada whitepaper, FP32 accumulate); RTX 3090 71 (GA102 whitepaper, FP32 accumulate);
#   MI300X 1,307.4 (AMD's datasheet). The AWS A10G has no NVIDIA datasheet: it is unknown here (no MFU), not guessed.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100": 989.4,  # SXM, reported as "NVIDIA H100 80GB HBM3"
    "H100 PCIe": 756.5,
    "H100 NVL": 835.5,
    "H800": 989.4,
    "H800 PCIe": 756.5,
    "H200": 989.4,  # SXM, reported as "NVIDIA H200"
    "H200 NVL": 835.5,
    "GH200": 989.4,
    "B200": 2250.0,
    "GB200": 2500.0,
    "A100": 312.0,
    "A800": 312.0,
    "A10": 125.0,
    "L40S": 362.05,
    "L40": 181.05,
    "L4": 121.0,
    "RTX 6000 Ada": 364.2,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "MI300X": 1307.4,
}
_WARNED_DEVICES: set[str] = set()


def peak_flops_for_name(name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a device name, or None if the table does not know it."""
    found = [k for k in PEAK_BF16_TFLOPS if re.search(rf"(?<![A-Za-z0-9]){re.escape(k)}(?![A-Za-z0-9])", name, re.I)]
    return PEAK_BF16_TFLOPS[max(found, key=len)] * 1e12 if found else None


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``; None on CPU or an unknown GPU (no MFU then: one warning line per
    device name, so a missing table entry is seen rather than a made-up MFU)."""
    device = _resolve(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_flops_for_name(name)
    if peak is None and name not in _WARNED_DEVICES:
        _WARNED_DEVICES.add(name)
        print(f"warning: no dense bf16 peak known for device {name!r}: mfu is null (add it to PEAK_BF16_TFLOPS in "
              "engine/training/metrics.py, from its datasheet)", file=sys.stderr, flush=True)
    return peak


def peak_memory_gib(device: torch.device | str | None = None, reset: bool = False) -> float:
    """Peak allocated CUDA memory on ``device``, or the process's peak RSS on CPU, in GiB, since the last reset (or
    the start). ``reset`` then starts a new peak, so each logging window reports its own. On CPU the peak is Linux's
    VmHWM, which writing 5 to /proc/self/clear_refs resets; where that is unavailable it is the process's peak."""
    device = _resolve(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    hwm = _proc_status_kib("VmHWM")
    if hwm is None:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size to the current one
        except OSError:
            pass
    return hwm / 2**20


def _proc_status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _resolve(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ThroughputMeter:
    """Per-window rates and whole-run GPU-hours and cost.

    Args:
        world_size: number of devices (GPU-hours = wall hours x world_size).
        global_batch: images per optimizer step over all devices.
        tokens_per_image: tokens the backbone processes per image (after masking).
        flops_per_image: training FLOPs per image (forward + backward) for TFLOP/s and MFU.
        total_steps: steps of the configured schedule, for the projections.
        usd_per_gpu_hour: price of one device-hour.
        device: device whose name picks the peak and whose memory is reported.
        peak_flops_per_device: overrides the table lookup (FLOP/s).
        time_fn: clock in seconds; injectable for tests.
        process_start: when this process started, on ``time_fn``'s clock (default: from the OS).

    Rates cover the window since the previous ``report``; the first step of this process
    (compilation, allocator warm-up) is excluded from them but counted in GPU-hours.
    GPU-hours and cost run from the start of this process: setup (imports, checksums, model
    build, compilation) is billed, and reported on its own as setup_hours. Earlier starts of
    the run are added with ``load_state_dict`` (from engine/training/billing.py's ledger).
    """

    def __init__(
        self,
        world_size: int,
        global_batch: int,
        tokens_per_image: int,
        flops_per_image: float,
        total_steps: int,
        usd_per_gpu_hour: float = 3.75,
        device: torch.device | str | None = None,
        peak_flops_per_device: float | None = None,
        time_fn: Callable[[], float] = time.perf_counter,
        process_start: float | None = None,
    ):
        self.world_size = world_size
        self.global_batch = global_batch
        self.tokens_per_image = tokens_per_image
        self.flops_per_image = flops_per_image
        self.total_steps = total_steps
        self.usd_per_gpu_hour = usd_per_gpu_hour
        self.device = _resolve(device)
        self.peak = peak_flops_per_device if peak_flops_per_device is not None else peak_flops(self.device)
        self._time = time_fn
        self._prior = {"wall_s": 0.0, "gpu_s": 0.0, "setup_s": 0.0}  # earlier process starts of this run
        self._run_t0 = time_fn() - process_age_s() if process_start is None else process_start
        self._setup_s: float | None = None  # process start -> first step
        self._step_t0 = 0.0
        self._wait = 0.0
        self._last_end: float | None = None
        self._window_t0: float | None = None
        self._window_steps = 0
        self._window_wait = 0.0

    def step_start(self) -> None:
        """Call before fetching the step's batch."""
        now = self._time()
        if self._setup_s is None:
            self._setup_s = now - self._run_t0
        self._step_t0 = now
        self._wait = 0.0

    def data_ready(self) -> None:
        """Call once the batch is on hand (before the forward pass)."""
        self._wait = self._time() - self._step_t0

    def step_end(self) -> None:
        """Call after ``optimizer.step()`` (host time: the device may still be working on the step)."""
        if self._window_t0 is None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # NOTE: host sync (the first step only): rates start once it is done
        now = self._time()
        if self._window_t0 is None:  # warm-up step ends: rates start here
            self._window_t0 = now
        else:
            self._window_steps += 1
            self._window_wait += self._wait
        self._last_end = now

    def exclude_pause(self) -> None:
        """Call after work between steps that is not training (checkpoints, sample grids): it still counts in
        GPU-hours and cost, but stays out of the rates of the current window."""
        if self._window_t0 is not None and self._last_end is not None:
            self._window_t0 += self._time() - self._last_end

    def _run_s(self) -> float:
        """This process's billed seconds: from its start to the end of the last report (or step)."""
        return (self._time() if self._last_end is None else self._last_end) - self._run_t0

    def this_process(self) -> dict[str, float]:
        """This process's wall, GPU and setup seconds up to now (the ledger's entry for it)."""
        wall = self._time() - self._run_t0
        return {"wall_s": wall, "gpu_s": wall * self.world_size, "setup_s": self._setup_s or 0.0}

    def report(self, step: int) -> dict[str, float | None]:
        """Metrics for the window since the last report; ``step`` = optimizer steps done so far. Call it after the
        log step's host sync: the window (and the billed time) ends now, when the device has done its steps."""
        self._last_end = self._time()
        wall_s = self._prior["wall_s"] + self._run_s()
        gpu_hours = (self._prior["gpu_s"] + self._run_s() * self.world_size) / 3600
        out: dict[str, float | None] = {
            "images_per_sec": None, "images_per_sec_per_device": None, "tokens_per_sec": None,
            "tflops_per_sec_per_device": None, "mfu": None, "data_wait_frac": None,
            "peak_mem_gib": peak_memory_gib(self.device, reset=True),  # this window's peak
            "elapsed_hours": wall_s / 3600,
            "setup_hours": (self._prior["setup_s"] + (self._setup_s or 0.0)) / 3600,  # in elapsed/GPU-hours too
            "gpu_hours": gpu_hours,
            "cost_usd": gpu_hours * self.usd_per_gpu_hour,
            "projected_total_hours": None, "projected_total_gpu_hours": None,
            "projected_total_cost_usd": None,
        }
        window_s = 0.0 if self._window_t0 is None else self._last_end - self._window_t0
        if self._window_steps == 0 or window_s <= 0:
            return out
        images_per_sec = self._window_steps * self.global_batch / window_s
        per_device = images_per_sec / self.world_size
        flops = self.flops_per_image * per_device
        sec_per_step = window_s / self._window_steps
        total_h = (wall_s + max(self.total_steps - step, 0) * sec_per_step) / 3600
        out.update(
            images_per_sec=images_per_sec,
            images_per_sec_per_device=per_device,
            tokens_per_sec=images_per_sec * self.tokens_per_image,
            tflops_per_sec_per_device=flops / 1e12,
            mfu=None if not self.peak else flops / self.peak,
            data_wait_frac=self._window_wait / window_s,
            projected_total_hours=total_h,
            projected_total_gpu_hours=total_h * self.world_size,
            projected_total_cost_usd=total_h * self.world_size * self.usd_per_gpu_hour,
        )
        self._window_t0, self._window_steps, self._window_wait = self._last_end, 0, 0.0
        return out

    def state_dict(self) -> dict[str, float]:
        """Wall, GPU and setup seconds of the whole run so far (earlier starts and this one)."""
        mine = self.this_process()
        return {k: self._prior[k] + mine[k] for k in self._prior}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """The totals of the run's earlier process starts (each on its own world size); this process adds its own."""
        self._prior = {k: float(state.get(k, 0.0)) for k in self._prior}


def _plain(value: Any) -> Any:
    """json.dumps fallback for tensors and numpy scalars."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()  # NOTE: host sync
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _finite_or_none(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The record with NaN/±inf numbers replaced by None (JSON has no token for them), and the keys replaced."""
    out, bad = {}, []
    for key, value in record.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()  # NOTE: host sync
        if isinstance(value, float) and not math.isfinite(value):
            value = None
            bad.append(key)
        out[key] = value
    return out, bad


class JsonlLogger:
    """Appends ``{"step": ..., "time": ..., **metrics}`` as one JSON line per call, flushed. The file stays strict
    JSON: a non-finite value is written as null and its key listed under ``nonfinite_keys`` of that line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record, bad = _finite_or_none({"step": step, "time": time.time(), **metrics})
        if bad:
            record["nonfinite_keys"] = bad
        self._file.write(json.dumps(record, default=_plain, allow_nan=False) + "\n")
        self._file.flush()  # a killed run keeps every line written so far

    def close(self) -> None:
        self._file.close()


_TB_WARNED = False


class TensorBoardLogger:
    """Scalars to TensorBoard; warns once and does nothing if tensorboard is not installed."""

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None):
        global _TB_WARNED
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            if not _TB_WARNED:
                warnings.warn(f"tensorboard not available ({err}); TensorBoard logging disabled")
                _TB_WARNED = True
            return
        # purge_step: a resumed run hides the events a killed run wrote after its last checkpoint
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.item()  # NOTE: host sync
            if isinstance(value, (int, float)):  # skips None and strings
                self._writer.add_scalar(key, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MetricsLogger:
    """Fans ``log(step, metrics)`` out to ``<run_dir>/metrics.jsonl`` and ``<run_dir>/tb``.

    A no-op on every rank but 0 (``rank`` defaults to the torch.distributed rank).
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int | None = None, tensorboard: bool = True,
                 purge_step: int | None = None):
        if rank is None:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._sinks: list = []
        if rank == 0:
            self._sinks.append(JsonlLogger(Path(run_dir) / "metrics.jsonl"))
            if tensorboard:
                self._sinks.append(TensorBoardLogger(Path(run_dir) / "tb", purge_step=purge_step))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in self._sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
