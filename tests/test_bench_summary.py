"""bench/summarize.py: rows, speedups over each suite's baseline and the issues' target verdicts from
pytest-benchmark JSON (a small hand-made file in pytest-benchmark's layout: the parser is under test, not a GPU)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import summarize  # noqa: E402


def bench(name, params, info, median_s=1e-3):
    return {"name": name, "params": params, "extra_info": info, "stats": {"median": median_s}}


H100 = "NVIDIA H100 80GB HBM3"
DATA = {
    "datetime": "2026-11-22T00:00:00", "commit_info": {"id": "abc", "dirty": False},
    "machine_info": {"node": "n", "tessera": {"torch": "2.11", "triton": "3.6", "gpu": H100}},
    "benchmarks": [
        bench("test_gather[x-torch-fwd]", {"B": 256, "backend": "torch", "pass_": "fwd"},
              {"device": H100, "backend": "torch", "pass": "fwd", "time_ms": 0.20, "pct_of_copy_bw": 60.0}),
        bench("test_gather[x-triton-fwd]", {"B": 256, "backend": "triton", "pass_": "fwd"},
              {"device": H100, "backend": "triton", "pass": "fwd", "time_ms": 0.10, "pct_of_copy_bw": 85.0}),
        bench("test_norm[x-triton-fwd]", {"B": 256, "backend": "triton", "pass_": "fwd"},
              {"device": H100, "backend": "triton", "pass": "fwd", "time_ms": 0.30, "pct_of_copy_bw": 70.0}),
        bench("test_moe[x-onehot_einsum-fwd]", {"B": 256, "backend": "onehot_einsum", "pass_": "fwd"},
              {"device": H100, "backend": "onehot_einsum", "pass": "fwd", "time_ms": 3.0}),
        bench("test_moe[x-triton-fwd]", {"B": 256, "backend": "triton", "pass_": "fwd"},
              {"device": H100, "backend": "triton", "pass": "fwd", "time_ms": 1.5}),
        bench("test_attention[sdpa-self_64-fwd_bwd]", {"backend": "sdpa", "case": "self_64", "mode": "fwd_bwd"},
              {"device": H100, "backend": "sdpa", "mode": "fwd_bwd", "median_ms": 1.0}),
        bench("test_attention[triton-self_64-fwd_bwd]", {"backend": "triton", "case": "self_64", "mode": "fwd_bwd"},
              {"device": H100, "backend": "triton", "mode": "fwd_bwd", "median_ms": 1.25}),
        bench("test_attention[triton-self_64-fwd_bwd]", {"backend": "triton", "case": "self_64", "mode": "fwd_bwd"},
              {"device": "cpu", "backend": "triton", "mode": "fwd_bwd", "median_ms": 99.0}),
    ],
}


@pytest.fixture
def rows():
    return summarize.rows_of(DATA)


def test_speedups_are_over_the_suite_baseline(rows):
    by = {(r["suite"], r["backend"], r["device"]): r for r in rows}
    assert by[("test_gather", "triton", H100)]["speedup_vs_baseline"] == pytest.approx(2.0)
    assert by[("test_moe", "triton", H100)]["speedup_vs_baseline"] == pytest.approx(2.0)
    assert by[("test_attention", "triton", H100)]["speedup_vs_baseline"] == pytest.approx(0.8)
    assert by[("test_attention", "sdpa", H100)]["pass"] == "fwd+bwd"
    assert by[("test_norm", "triton", H100)]["speedup_vs_baseline"] is None  # no torch row to compare with
    assert by[("test_attention", "triton", "cpu")]["speedup_vs_baseline"] is None  # no SDPA row on that device


def test_targets_judge_gpu_rows_only(rows):
    verdicts = {(v["suite"], v["met"]) for v in summarize.targets(rows)}
    # gather 85% >= 80 met; norm 70% missed; MoE 2.0x >= 1.5 met; attention 0.8x < 1/1.1 missed; the CPU row ignored
    assert verdicts == {("test_gather", True), ("test_norm", False), ("test_moe", True), ("test_attention", False)}
    assert len(summarize.targets(rows)) == 4


def test_main_writes_the_result_file(tmp_path, capsys):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(DATA))
    out = tmp_path / "results" / "summary.json"
    assert summarize.main([str(src), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["machine"]["gpu"] == H100 and summary["commit"] == "abc" and len(summary["rows"]) == 8
    printed = capsys.readouterr().out
    assert "MISSED test_attention" in printed and "MET  test_moe" in printed
