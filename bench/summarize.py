"""Side-by-side table and result file from pytest-benchmark JSON: what `pytest bench --benchmark-only` measured.

    python bench/summarize.py BENCH.json [...] [--out bench/results/<date>_<device>.json]

Per suite, every backend of a case in one block: time per call, the achieved rate (GB/s and % of the measured copy
bandwidth for memory-bound ops; TFLOP/s and % of the bf16 peak for math; images/sec and MFU for whole steps) and the
speedup over the suite's baseline (torch for the token ops and norms, the official one-hot einsum for the MoE, SDPA
for attention). On a GPU it then checks the issues' targets: Triton memory-bound ops at >= 80% of copy bandwidth,
Triton MoE >= 1.5x the einsum, Triton attention within 10% of SDPA. `--out` writes the rows, the target verdicts,
the device and software (recorded by bench/conftest.py), the commit and the date as one JSON file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINE = {"test_gather": "torch", "test_norm": "torch", "test_residual_norm": "torch", "test_moe": "onehot_einsum",
            "test_attention": "sdpa"}
MEMORY_BOUND = ("test_gather", "test_norm", "test_residual_norm")
COPY_BW_TARGET, MOE_SPEEDUP_TARGET, ATTENTION_SLACK = 80.0, 1.5, 1.10


def rows_of(bench: dict) -> list[dict]:
    """One flat row per benchmark: suite, case, backend, pass, time and rates, whatever the suite called them."""
    rows = []
    for b in bench["benchmarks"]:
        info, params = b.get("extra_info", {}), dict(b.get("params") or {})
        suite = b["name"].split("[")[0]
        backend = str(info.get("backend", params.pop("backend", "-")))
        params.pop("backend", None)
        pass_ = info.get("pass") or {"fwd_bwd": "fwd+bwd"}.get(info.get("mode"), info.get("mode")) or "step"
        params.pop("pass_", None), params.pop("mode", None)
        rows.append({
            "suite": suite, "case": " ".join(f"{k}={v}" for k, v in params.items()) or info.get("config", "-"),
            "backend": backend, "pass": pass_, "device": info.get("device"),
            "time_ms": info.get("time_ms", info.get("median_ms", b["stats"]["median"] * 1e3)),
            "gb_per_s": info.get("gb_per_s"), "pct_of_copy_bw": info.get("pct_of_copy_bw"),
            "tflops_per_s": info.get("tflops_per_s", info.get("tflops_per_sec")),
            "pct_of_peak": info.get("pct_of_peak", info.get("pct_of_bf16_peak")),
            "images_per_sec": info.get("images_per_sec"), "mfu": info.get("mfu"),
            "extra": {k: v for k, v in info.items() if k in ("sdpa_kernel", "micro_batch", "peak_mem_gib", "note",
                                                            "shapes", "use", "samples_per_sec", "a", "b",
                                                            "step_ratio", "ratios")},
        })
    same = ("suite", "case", "pass", "device")
    for r in rows:  # speedup over the suite's baseline backend at the same case and pass on the same device
        base = next((o for o in rows if all(o[k] == r[k] for k in same) and o["backend"] == BASELINE.get(r["suite"])),
                    None)
        r["speedup_vs_baseline"] = base["time_ms"] / r["time_ms"] if base and r["time_ms"] else None
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The issues' speed targets, one verdict per measured case (GPU rows only: CPU times say nothing of them)."""
    out = []
    for r in rows:
        if not r["device"] or str(r["device"]).startswith("cpu") or not r["backend"].startswith("triton"):
            continue
        if r["suite"] in MEMORY_BOUND and r["backend"] == "triton" and r["pct_of_copy_bw"] is not None:
            goal, value = f">= {COPY_BW_TARGET:.0f}% of copy bandwidth", r["pct_of_copy_bw"]
            ok = value >= COPY_BW_TARGET
        elif r["suite"] == "test_moe" and r["speedup_vs_baseline"] is not None:
            goal, value = f">= {MOE_SPEEDUP_TARGET}x the one-hot einsum", r["speedup_vs_baseline"]
            ok = value >= MOE_SPEEDUP_TARGET
        elif r["suite"] == "test_attention" and r["speedup_vs_baseline"] is not None:
            goal, value = f"within {100 * (ATTENTION_SLACK - 1):.0f}% of SDPA", r["speedup_vs_baseline"]
            ok = value >= 1 / ATTENTION_SLACK
        else:
            continue
        out.append({"suite": r["suite"], "case": r["case"], "pass": r["pass"], "goal": goal, "value": value, "met": ok})
    return out


def _fmt(v, spec):
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = [f"{'suite / case':<52} {'pass':<8} {'backend':<15} {'ms':>9} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} "
             f"{'%peak':>6} {'img/s':>8} {'vs base':>7}"]
    for r in sorted(rows, key=lambda r: (r["suite"], r["case"], r["pass"], r["time_ms"])):
        lines.append(f"{(r['suite'] + ' ' + r['case'])[:52]:<52} {r['pass']:<8} {r['backend'][:15]:<15} "
                     f"{r['time_ms']:>9.3f} {_fmt(r['gb_per_s'], '7.0f')} {_fmt(r['pct_of_copy_bw'], '6.1f')} "
                     f"{_fmt(r['tflops_per_s'], '8.1f')} {_fmt(r['pct_of_peak'], '6.1f')} "
                     f"{_fmt(r['images_per_sec'], '8.1f')} {_fmt(r['speedup_vs_baseline'], '6.2f')}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--out", type=Path, help="write the summary JSON here (e.g. under bench/results/)")
    args = parser.parse_args(argv)
    benches = [json.loads(f.read_text()) for f in args.files]
    rows = [r for b in benches for r in rows_of(b)]
    verdicts = targets(rows)
    print(table(rows))
    for v in verdicts:
        print(f"{'MET ' if v['met'] else 'MISSED'} {v['suite']} {v['case']} {v['pass']}: {v['value']:.2f} ({v['goal']})")
    if args.out:
        first = benches[0]
        summary = {
            "date": first.get("datetime"), "machine": first.get("machine_info", {}).get("tessera", {}),
            "host": {k: first.get("machine_info", {}).get(k) for k in ("node", "processor", "python_version")},
            "commit": first.get("commit_info", {}).get("id"), "dirty": first.get("commit_info", {}).get("dirty"),
            "sources": [f.name for f in args.files], "rows": rows, "targets": verdicts,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
