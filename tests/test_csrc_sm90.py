"""The CUDA C++ gather of csrc/ compiles for an H100 (sm_90) and its machine code moves rows 16 bytes at a time.

The extension itself builds and runs only where torch has CUDA (tests/test_kernels_gather.py, gpu-marked); its
device code lives in csrc/gather_kernels.cuh, free of torch headers, so plain nvcc compiles it here. The SASS of the
16-byte instantiation must load and store with LDG/STG .128 only, and the kernel must not spill."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from compile_check import cuobjdump  # noqa: E402

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")


@pytest.fixture(scope="module")
def cubin(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("csrc")
    src = d / "instances.cu"
    src.write_text(
        '#include "gather_kernels.cuh"\n#include <vector_types.h>\n'
        + "".join(f"template __global__ void tessera::copy_rows_kernel<uint4, {t}>(const uint4*, uint4*, const {t}*, "
                  "int64_t, int64_t, int64_t, int64_t, bool);\n" for t in ("int64_t", "int32_t")))
    out = d / "instances.cubin"
    proc = subprocess.run([NVCC, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", f"-I{ROOT / 'csrc'}", "-o", str(out),
                           str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_rows_move_in_16_byte_accesses(cubin):
    sass = subprocess.run([cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    for kernel in re.split(r"\n\s*Function : ", sass)[1:]:
        name = kernel.split()[0]
        loads = re.findall(r"\bLDG\.E(?:\.(\d+))?", kernel)
        stores = re.findall(r"\bSTG\.E(?:\.(\d+))?", kernel)
        assert "128" in loads, f"{name}: no 16-byte loads"
        assert stores and all(w == "128" for w in stores), f"{name}: stores {stores}"


def test_no_spills(cubin):
    usage = subprocess.run([cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"REG:(\d+).*?LOCAL:(\d+)", usage)
    assert len(found) == 2, usage
    assert all(int(local) == 0 and 0 < int(regs) <= 255 for regs, local in found), usage
