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
                total_steps=1000, usd_per_gpu_hour=3.75, device="cpu", time_fn=clock)
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


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA GH200 480GB", 989), ("NVIDIA B200", 2250),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L40S", 362), ("NVIDIA L4", 121),
    ("NVIDIA A10G", 70), ("NVIDIA GeForce RTX 4090", 165), ("Quadro K620", None),
])
def test_peak_table_prefers_the_longest_match(name, tflops):
    got = peak_flops_for_name(name)
    assert got == (None if tflops is None else tflops * 1e12)


def test_state_dict_carries_cost_across_resume():
    clock = FakeClock()
    meter = _meter(clock)
    _run(meter, clock, 10)
    saved = meter.state_dict()
    assert saved == {"wall_s": 10.0, "gpu_s": 20.0}

    clock2 = FakeClock()
    clock2.t = 500.0  # a new process: its clock has nothing to do with the old one
    resumed = _meter(clock2, world_size=4)  # resumed on more devices
    resumed.load_state_dict(saved)
    _run(resumed, clock2, 3)
    r = resumed.report(13)
    assert r["gpu_hours"] == pytest.approx((20 + 3 * 4) / 3600)
    assert r["elapsed_hours"] == pytest.approx(13 / 3600)
    assert resumed.state_dict() == {"wall_s": 13.0, "gpu_s": 32.0}


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
