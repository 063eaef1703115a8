"""Every Triton kernel compiles for an H100 (sm_90) at MicroDiT_XL_2 shapes, and what it compiles to is sane.

The other kernel tests run the kernels in the interpreter, which never compiles them; this one compiles them for the
GPU (bench/compile_check.py, no GPU needed) in a subprocess without TRITON_INTERPRET and checks, for every autotune config
that survives pruning: shared memory within the H100's per-block limit (a config over it would fail to launch),
no register spills, 16-byte global loads/stores (memory-bound kernels at bf16 with D a multiple of 8), and Hopper
warpgroup MMA (wgmma) in every attention kernel that multiplies matrices.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _nvidia_backend(), reason="triton without its CUDA backend")]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, dict]:
    """bench/compile_check.py for sm_90 (every op) and for sm_80 / sm_89 (attention), compiled in parallel subprocesses (each
    compile is single-threaded; a cold Triton cache makes this the slowest test file)."""
    folder = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {}
    for arch, ops in ((90, []), (80, ["--ops", "attention"]), (89, ["--ops", "attention"])):
        cmd = [sys.executable, str(ROOT / "bench" / "compile_check.py"), "--arch", str(arch), *ops,
               "--json", str(folder / f"{arch}.json")]
        runs[arch] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
    out = {}
    for arch, proc in runs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        out[arch] = json.loads((folder / f"{arch}.json").read_text())
    return out


@pytest.fixture(scope="module")
def report(reports) -> dict:
    return reports[90]


def test_every_kernel_is_compiled(report):
    compiled = {r["kernel"] for r in report["kernels"]}
    assert set(report["kernels_defined"]) == compiled, "a Triton kernel has no case in bench/compile_check.py"
    assert len(report["kernels_defined"]) >= 8


def test_shared_memory_fits_h100(report):
    over = [(r["case"], r["kernel"], r["config"], r["shared_bytes"]) for r in report["kernels"]
            if r["shared_bytes"] > report["shared_limit"]]
    assert not over, f"configs over the {report['shared_limit']} B shared memory of an H100 block: {over}"


def test_no_register_spills(report):
    if any(r["local_bytes"] is None for r in report["kernels"]):
        pytest.skip("cuobjdump missing from the triton wheel: no resource usage")
    spilled = [(r["case"], r["kernel"], r["config"], r["local_bytes"]) for r in report["kernels"] if r["local_bytes"]]
    assert not spilled, f"register spills (local memory): {spilled}"
    assert all(0 < r["registers"] <= 255 for r in report["kernels"])


def test_global_accesses_are_16_bytes(report):
    narrow = [(r["case"], r["kernel"], r["vector_bits"]) for r in report["kernels"] if r["vector_bits"] < 128]
    assert not narrow, f"kernels without 16-byte global accesses: {narrow}"


def test_attention_uses_hopper_tensor_cores(report):
    matmul_kernels = [r for r in report["kernels"] if r["op"] == "attention" and r["kernel"] != "_attn_bwd_delta"]
    assert matmul_kernels
    assert all(r["wgmma"] for r in matmul_kernels), [(r["kernel"], r["config"]) for r in matmul_kernels
                                                      if not r["wgmma"]]


@pytest.mark.parametrize("arch", [80, 89])
def test_attention_has_a_fitting_config_on_ampere_and_ada(arch, reports):
    """A100 (sm_80, 163 KB) and L40S / RTX 4090 (sm_89, 99 KB) have less shared memory than an H100: configs over
    the limit are dropped by the autotuner, but every case must keep at least one, and none may spill."""
    report = reports[arch]
    fitting = {}
    for r in report["kernels"]:
        key = (r["case"], r["kernel"])
        fitting[key] = fitting.get(key, False) or r["shared_bytes"] <= report["shared_limit"]
        assert not r["local_bytes"], (r["case"], r["kernel"], r["config"])
        assert r["kernel"] == "_attn_bwd_delta" or r["mma"]  # Ampere tensor cores (mma.sync)
    assert all(fitting.values()), [k for k, ok in fitting.items() if not ok]
