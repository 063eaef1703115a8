"""What a run has cost across every start of its process: the age of this process, and the run's ledger.

A device is paid for from the moment the process holds it, not from the first step: imports, the data set's
checksums, building and compiling the model, and every restart's setup are billed. A killed run's work after its last
checkpoint was paid for too, although a resume repeats it; so the ledger, not the checkpoint, carries earlier starts.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

_IMPORTED = time.monotonic()  # fallback start where /proc is unavailable: this module's import


def process_age_s() -> float:
    """Seconds since this OS process started (Linux /proc), else since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


class Ledger:
    """``<run>/billing.json``: one entry per process start of the run ({started, world_size, wall_s, gpu_s,
    setup_s}). Every process reads the earlier entries at start; the main process rewrites the file, with its own
    entry last, on every log step and checkpoint. Work after the last update of a killed process is not billed: at
    most one logging window."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = Path(path), is_main
        self.earlier: list[dict] = json.loads(self.path.read_text())["processes"] if self.path.is_file() else []
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - process_age_s()))

    def prior(self) -> dict[str, float]:
        """Totals of the earlier process starts: wall_s, gpu_s, setup_s (zeros for a new run)."""
        return {k: sum(float(p[k]) for p in self.earlier) for k in ("wall_s", "gpu_s", "setup_s")}

    def record(self, world_size: int, this_process: dict[str, float]) -> None:
        """Write the earlier entries and this process's totals so far (main process only; atomic)."""
        if not self.is_main:
            return
        entry = {"started": self.started, "world_size": world_size, **this_process}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"processes": [*self.earlier, entry]}, indent=1) + "\n")
        os.replace(tmp, self.path)
