"""bench/study_sampling.py's paired all-correct comparisons, on hand-made per-image results (the sampling is the
sampler tests'; here only which cells are paired with which, and the differences)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import study_sampling  # noqa: E402

BASELINE = ("heun", "karras", 60)


def test_each_schedule_is_paired_with_karras_and_every_cell_with_the_baseline():
    rng = np.random.default_rng(0)
    ok = {key: rng.integers(0, 2, 64).astype(np.float64) for key in [
        ("dpmpp2m", "karras", 5), ("dpmpp2m", "opt_p2", 5), ("dpmpp2m", "logsnr", 5), BASELINE]}
    rows = study_sampling.geneval_paired(ok, BASELINE)
    pairs = {(r["solver"], r["schedule"], r["nfe"], r["against"]): r for r in rows}
    assert set(pairs) == {("dpmpp2m", "karras", 5, "heun_baseline"), ("dpmpp2m", "opt_p2", 5, "karras"),
                          ("dpmpp2m", "opt_p2", 5, "heun_baseline"), ("dpmpp2m", "logsnr", 5, "karras"),
                          ("dpmpp2m", "logsnr", 5, "heun_baseline")}
    opt = pairs[("dpmpp2m", "opt_p2", 5, "karras")]
    want = float(np.mean(ok[("dpmpp2m", "opt_p2", 5)] - ok[("dpmpp2m", "karras", 5)]))
    assert opt["difference"] == want
    lo, hi = opt["ci95"]
    assert lo <= want <= hi and hi - lo > 0


def test_a_cell_equal_to_its_karras_cell_differs_by_exactly_zero():
    same = np.array([1.0, 0.0, 1.0, 1.0])
    ok = {("unipc2_bh2", "karras", 6): same, ("unipc2_bh2", "opt_p1", 6): same.copy(), BASELINE: 1 - same}
    rows = study_sampling.geneval_paired(ok, BASELINE)
    vs_karras = [r for r in rows if r["against"] == "karras"]
    assert len(vs_karras) == 1 and vs_karras[0]["difference"] == 0.0 and vs_karras[0]["ci95"] == [0.0, 0.0]
    vs_base = [r for r in rows if r["against"] == "heun_baseline"]
    assert all(r["difference"] == 0.5 for r in vs_base) and len(vs_base) == 2


def test_without_a_karras_cell_only_the_baseline_is_paired():
    ok = {("dpmpp2m", "opt_p2", 5): np.array([1.0, 1.0]), BASELINE: np.array([0.0, 1.0])}
    rows = study_sampling.geneval_paired(ok, BASELINE)
    assert [(r["against"], r["difference"]) for r in rows] == [("heun_baseline", 0.5)]
