"""Throughput, MFU, memory and dollar-cost accounting per log window, and the run loggers.

The trainer drives a ``ThroughputMeter`` with ``step_start() / data_ready() / step_end()``
around every step and calls ``report(step)`` on log steps, after the loss ``.item()`` has
synchronised the device, so that wall time covers the GPU work. The dict it returns goes to
``MetricsLogger.log(step, metrics)``, which writes JSONL and TensorBoard on rank 0.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "PEAK_BF16_TFLOPS", "peak_flops", "peak_flops_for_name", "peak_memory_gib",
    "ThroughputMeter", "JsonlLogger", "TensorBoardLogger", "MetricsLogger",
]

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, keyed by a substring of
# torch.cuda.get_device_name(); the longest matching key wins ("L40S" before "L4").
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM, reported as "NVIDIA H100 80GB HBM3"
    "H800": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "GB200": 2500.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,  # approximate: AWS does not publish it
    "A10": 125.0,
    "RTX 6000 Ada": 364.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "MI300X": 1307.0,
}


def peak_flops_for_name(name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a device name, or None if the table does not know it."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``; None on CPU or an unknown GPU (no MFU then)."""
    device = _resolve(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """Peak allocated CUDA memory on ``device``, or the process's max RSS on CPU, in GiB."""
    device = _resolve(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


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

    Rates cover the window since the previous ``report``; the first step of this process
    (compilation, allocator warm-up) is excluded from them but counted in GPU-hours.
    GPU-hours start at the first ``step_start`` and carry across resumes via ``state_dict``.
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
        self._prior_wall_s = 0.0  # from runs before a resume
        self._prior_gpu_s = 0.0
        self._run_t0: float | None = None
        self._step_t0 = 0.0
        self._wait = 0.0
        self._last_end: float | None = None
        self._window_t0: float | None = None
        self._window_steps = 0
        self._window_wait = 0.0

    def step_start(self) -> None:
        """Call before fetching the step's batch."""
        now = self._time()
        if self._run_t0 is None:
            self._run_t0 = now
        self._step_t0 = now
        self._wait = 0.0

    def data_ready(self) -> None:
        """Call once the batch is on hand (before the forward pass)."""
        self._wait = self._time() - self._step_t0

    def step_end(self) -> None:
        """Call after ``optimizer.step()``."""
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
        return 0.0 if self._last_end is None else self._last_end - self._run_t0

    def report(self, step: int) -> dict[str, float | None]:
        """Metrics for the window since the last report; ``step`` = optimizer steps done so far."""
        wall_s = self._prior_wall_s + self._run_s()
        gpu_hours = (self._prior_gpu_s + self._run_s() * self.world_size) / 3600
        out: dict[str, float | None] = {
            "images_per_sec": None, "images_per_sec_per_device": None, "tokens_per_sec": None,
            "tflops_per_sec_per_device": None, "mfu": None, "data_wait_frac": None,
            "peak_mem_gib": peak_memory_gib(self.device),
            "elapsed_hours": wall_s / 3600,
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
        """Accumulated wall and GPU seconds, to put in the checkpoint's extra dict."""
        return {
            "wall_s": self._prior_wall_s + self._run_s(),
            "gpu_s": self._prior_gpu_s + self._run_s() * self.world_size,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue the accumulated totals of a resumed run (the world size may differ)."""
        self._prior_wall_s = float(state["wall_s"]) - self._run_s()
        self._prior_gpu_s = float(state["gpu_s"]) - self._run_s() * self.world_size


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
