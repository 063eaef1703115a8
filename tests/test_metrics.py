"""Tests for engine/training/metrics.py: throughput and cost arithmetic on a fake clock, loggers."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from engine.training import metrics
from engine.training.metrics import (
    JsonlLogger, MetricsLogger, TensorBoardLogger, ThroughputMeter, peak_flops, peak_flops_for_name,
)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _run(meter, clock, steps, step_s=1.0, wait_s=0.25):
    for _ in range(steps):
        meter.step_start()
        clock.t += wait_s
        meter.data_ready()
        clock.t += step_s - wait_s
        meter.step_end()


def _meter(clock, **kw):
    args = dict(world_size=2, global_batch=64, tokens_per_image=256, flops_per_image=1e12,
                total_steps=1000, usd_per_gpu_hour=3.75, device="cpu", time_fn=clock, process_start=clock.t)
    return ThroughputMeter(**{**args, **kw})


def test_rates_cost_and_projection():
    clock = FakeClock()
    meter = _meter(clock, peak_flops_per_device=100e12)
    _run(meter, clock, 10)  # 10 steps of 1 s, 0.25 s of each waiting for data
    r = meter.report(10)
    # the first step is warm-up: 9 steps x 64 images over 9 s
    assert r["images_per_sec"] == pytest.approx(64.0)
    assert r["images_per_sec_per_device"] == pytest.approx(32.0)
    assert r["tokens_per_sec"] == pytest.approx(64 * 256)
    assert r["tflops_per_sec_per_device"] == pytest.approx(32.0)  # 32 img/s x 1 TFLOP
    assert r["mfu"] == pytest.approx(0.32)
    assert r["data_wait_frac"] == pytest.approx(0.25)
    # GPU-hours include the warm-up: 10 s wall x 2 devices
    assert r["gpu_hours"] == pytest.approx(20 / 3600)
    assert r["cost_usd"] == pytest.approx(20 / 3600 * 3.75)
    # 990 steps left at 1 s each: (10 + 990) s wall
    assert r["projected_total_hours"] == pytest.approx(1000 / 3600)
    assert r["projected_total_gpu_hours"] == pytest.approx(2000 / 3600)
    assert r["projected_total_cost_usd"] == pytest.approx(2000 / 3600 * 3.75)
    assert r["peak_mem_gib"] > 0


def test_window_ends_at_the_report_after_the_host_sync():
    """step_end returns when the host has queued a step; the device finishes later, and the log step's host sync
    waits for it. The window and the billed time end at report(), after that sync."""
    clock = FakeClock()
    meter = _meter(clock)
    _run(meter, clock, 5, step_s=0.1, wait_s=0.0)  # the host queues 5 steps in 0.5 s
    clock.t += 3.6  # the sync: the device needs 4 s for them
    r = meter.report(5)
    assert r["images_per_sec"] == pytest.approx(4 * 64 / 4.0)  # 4 timed steps (after the warm-up) in 4 s, not 0.4 s
    assert r["gpu_hours"] == pytest.approx(4.1 * 2 / 3600)


def test_window_resets_between_reports():
    clock = FakeClock()
    meter = _meter(clock)
    _run(meter, clock, 5)
    meter.report(5)
    clock.t += 3.0  # logging / checkpoint time between steps belongs to the next window
    _run(meter, clock, 4, step_s=0.5, wait_s=0.0)
    r = meter.report(9)
    assert r["images_per_sec"] == pytest.approx(4 * 64 / 5.0)
    assert r["data_wait_frac"] == 0.0
    assert r["gpu_hours"] == pytest.approx((5 + 3 + 2) * 2 / 3600)


def test_excluded_pause_costs_gpu_hours_but_not_rate():
    clock = FakeClock()
    meter = _meter(clock)
    _run(meter, clock, 5)
    meter.report(5)
    clock.t += 3.0  # a checkpoint and its sample grid
    meter.exclude_pause()
    _run(meter, clock, 4, step_s=0.5, wait_s=0.0)
    r = meter.report(9)
    assert r["images_per_sec"] == pytest.approx(64 / 0.5)
    assert r["gpu_hours"] == pytest.approx((5 + 3 + 2) * 2 / 3600)


def test_report_before_any_timed_step_has_no_rates():
    clock = FakeClock()
    meter = _meter(clock)
    _run(meter, clock, 1)
    r = meter.report(1)
    assert r["images_per_sec"] is None and r["mfu"] is None and r["projected_total_cost_usd"] is None
    assert r["gpu_hours"] == pytest.approx(2 / 3600)


def test_mfu_is_none_without_a_known_peak():
    clock = FakeClock()
    meter = _meter(clock)
    assert meter.peak is None and peak_flops("cpu") is None
    _run(meter, clock, 3)
    r = meter.report(3)
    assert r["mfu"] is None and r["tflops_per_sec_per_device"] == pytest.approx(32.0)


@pytest.mark.parametrize("name,tflops", [  # datasheets: the dense figure, or the sparse (*) one / 2
    ("NVIDIA H100 80GB HBM3", 1979 / 2), ("NVIDIA H100 PCIe", 1513 / 2), ("NVIDIA H100 NVL", 1671 / 2),
    ("NVIDIA H200", 1979 / 2), ("NVIDIA H200 NVL", 1671 / 2), ("NVIDIA GH200 480GB", 1979 / 2),
    ("NVIDIA B200", 4500 / 2), ("NVIDIA GB200", 5000 / 2), ("NVIDIA A100-SXM4-80GB", 624 / 2),
    ("NVIDIA A10", 250 / 2), ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05), ("NVIDIA L4", 242 / 2),
    ("NVIDIA GeForce RTX 4090", 330.4 / 2), ("NVIDIA A10G", None), ("Quadro K620", None), ("NVIDIA H20", None),
])
def test_peak_table_matches_whole_names_longest_first(name, tflops):
    got = peak_flops_for_name(name)
    assert got == (None if tflops is None else pytest.approx(tflops * 1e12, rel=2e-3))  # datasheets round


def test_unknown_gpu_gives_no_mfu_and_one_warning_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery X1")
    monkeypatch.setattr(metrics, "_WARNED_DEVICES", set())
    assert peak_flops("cuda") is None and peak_flops("cuda") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'NVIDIA Mystery X1'" in err and "mfu is null" in err


def test_peak_memory_is_per_logging_window():
    """Each report's peak_mem_gib is that window's: a large allocation freed in window 1 is not window 2's peak."""
    clock = FakeClock()
    meter = _meter(clock)
    _run(meter, clock, 2)
    big = torch.ones(512 * 2**20 // 4)  # 512 MiB, touched
    del big
    first = meter.report(2)["peak_mem_gib"]
    _run(meter, clock, 2)
    second = meter.report(4)["peak_mem_gib"]
    assert first - second > 0.4, (first, second)


def test_setup_is_billed_from_process_start_and_reported():
    """GPU-hours run from the process start: 30 s of setup (imports, checksums, compilation) before the first step
    are billed, reported as setup_hours, and part of the projected total."""
    clock = FakeClock()
    meter = _meter(clock)  # the process started at t = 0
    clock.t = 30.0
    _run(meter, clock, 10)
    r = meter.report(10)
    assert r["setup_hours"] == pytest.approx(30 / 3600)
    assert r["gpu_hours"] == pytest.approx((30 + 10) * 2 / 3600) and r["elapsed_hours"] == pytest.approx(40 / 3600)
    assert r["projected_total_hours"] == pytest.approx((40 + 990) / 3600)


def test_earlier_process_starts_are_billed_through_the_ledger(tmp_path):
    """A killed process's work after its last checkpoint was paid for: the ledger (updated on log steps), not the
    checkpoint, carries it into the resumed process's totals, setup included."""
    from engine.training.billing import Ledger

    first_clock = FakeClock()
    first = _meter(first_clock)
    first_clock.t = 5.0  # setup
    _run(first, first_clock, 20)  # checkpoint at step 10 (t = 15), killed after step 20 (t = 25)
    first.report(20)
    Ledger(tmp_path / "billing.json", is_main=True).record(2, first.this_process())

    ledger = Ledger(tmp_path / "billing.json", is_main=True)
    assert ledger.prior() == {"wall_s": 25.0, "gpu_s": 50.0, "setup_s": 5.0}
    clock = FakeClock()
    clock.t = 1000.0  # a new process: its clock has nothing to do with the old one
    resumed = _meter(clock, world_size=4)  # resumed on more devices
    resumed.load_state_dict(ledger.prior())
    clock.t += 7.0  # its own setup
    _run(resumed, clock, 3)
    r = resumed.report(13)
    assert r["gpu_hours"] == pytest.approx((50 + 10 * 4) / 3600)
    assert r["elapsed_hours"] == pytest.approx((25 + 10) / 3600) and r["setup_hours"] == pytest.approx(12 / 3600)
    ledger.record(4, resumed.this_process())
    entries = json.loads((tmp_path / "billing.json").read_text())["processes"]
    assert [(e["world_size"], e["gpu_s"]) for e in entries] == [(2, 50.0), (4, 40.0)]
    assert resumed.state_dict() == {"wall_s": 35.0, "gpu_s": 90.0, "setup_s": 12.0}


def test_process_age_is_read_from_the_os():
    import subprocess

    from engine.training.billing import process_age_s

    assert 0 <= process_age_s() < 1e7
    code = "import time; time.sleep(1.5); from engine.training.billing import process_age_s; print(process_age_s())"
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    age = float(subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                               check=True).stdout)
    assert age >= 1.4  # counted from the start of the process, not from the import


def test_jsonl_lines_parse(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    log.log(1, {"loss": torch.tensor(0.5), "mfu": None, "lr": 1e-4})
    log.log(2, {"loss": 0.25})
    lines = (tmp_path / "m.jsonl").read_text().splitlines()  # flushed without close()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 0.5 and records[0]["mfu"] is None and records[1]["loss"] == 0.25
    log.close()


def test_jsonl_stays_strict_json_with_non_finite_values(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    log.log(1, {"loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "lr": -float("inf"), "mfu": 0.5})
    log.close()
    text = (tmp_path / "m.jsonl").read_text()
    strict = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    assert (strict["loss"], strict["grad_norm"], strict["lr"], strict["mfu"]) == (None, None, None, 0.5)
    assert strict["nonfinite_keys"] == ["loss", "grad_norm", "lr"]


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    tb = TensorBoardLogger(tmp_path / "tb")
    tb.log(3, {"loss": 0.1, "mfu": None, "device": "cpu", "images_per_sec": torch.tensor(5.0)})
    tb.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "images_per_sec"}
    assert acc.Scalars("loss")[0].step == 3


def test_tensorboard_missing_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    monkeypatch.setattr(metrics, "_TB_WARNED", False)
    with pytest.warns(UserWarning, match="tensorboard not available") as record:
        a, b = TensorBoardLogger(tmp_path / "a"), TensorBoardLogger(tmp_path / "b")
    assert len([w for w in record if "tensorboard" in str(w.message)]) == 1
    a.log(1, {"loss": 1.0})
    b.close()
    assert not (tmp_path / "a").exists()


def test_metrics_logger_writes_only_on_rank0(tmp_path):
    with MetricsLogger(tmp_path / "r0", rank=0, tensorboard=False) as log:
        log.log(1, {"loss": 1.0})
    with MetricsLogger(tmp_path / "r1", rank=1) as log:
        log.log(1, {"loss": 1.0})
    assert json.loads((tmp_path / "r0" / "metrics.jsonl").read_text())["loss"] == 1.0
    assert not (tmp_path / "r1").exists()
