"""Compile every Triton kernel of tessera_kernels/ for a GPU this machine does not have, and read what each would use
there.

    python bench/compile_check.py [--arch 90] [--dtype bfloat16] [--json FILE]     (TRITON_INTERPRET must be unset)

Why: the tests run the kernels under TRITON_INTERPRET=1, which checks their arithmetic but never compiles them. Here
the real launchers run on meta tensors at MicroDiT_XL_2 shapes while a stand-in Triton driver reports an sm_<arch>
target; every launch becomes a JIT warmup (compile only, every autotune config that survives pruning) through
Triton's own specialization (16-byte alignment and divisibility of the arguments, as on the device). Each compiled
kernel is then read back:

    registers, local_bytes   from the cubin (`cuobjdump -res-usage`); local memory = register spills
    shared_bytes             Triton's dynamic shared memory + the cubin's static shared memory
    vector_bits              widest global load/store in the PTX (128 = 16-byte accesses)
    wgmma / mma              Hopper warpgroup MMA / Ampere mma.sync instructions in the PTX (tensor-core path)

What this is not: a speed measurement. It proves that a kernel compiles for the target, fits its shared memory,
does not spill, vectorizes and uses the tensor-core instruction the target has; bench/ measures the speed on a GPU.
No host sync, no CUDA, no GPU: ptxas and cuobjdump ship inside the Triton wheel.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # run as a script from anywhere: the repo's packages importable
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

# Per-block shared memory a kernel may opt into, and SM counts (the norm launcher sizes its grid by them).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}

# The modules whose kernels are compiled, and the launch gates that normally send non-CUDA tensors to torch.
# (tessera_kernels/residual_norm.py launches kernels.norm's kernels: its cases compile through that module.)
KERNEL_MODULES = (
    "tessera_kernels.gather", "tessera_kernels.moe", "tessera_kernels.norm", "tessera_kernels.attention_triton")
_GATES = (("tessera_kernels.gather", "use_triton"), ("tessera_kernels.moe", "use_triton"),
          ("tessera_kernels.norm", "_use_triton"))


@dataclasses.dataclass
class CompiledKernel:
    """One kernel compiled for one autotune config at one case's shapes."""

    op: str
    case: str
    kernel: str
    config: str
    registers: int | None
    local_bytes: int | None
    shared_bytes: int
    vector_bits: int
    wgmma: bool
    mma: bool


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports the target, never launches (warmup only compiles)."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


class _Recorder:
    """Replaces a module's kernel object: `kernel[grid](*args)` compiles every config instead of launching."""

    def __init__(self, name: str, kernel, sink: list):
        self.name, self.kernel, self.sink = name, kernel, sink

    def __getitem__(self, grid) -> Callable:
        def compile_only(*args, **kwargs):
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            self.sink.append((self.name, compiled if isinstance(compiled, list) else [compiled]))

        return compile_only


def triton_kernels(module) -> dict[str, object]:
    """The @triton.jit kernels (also autotuned / heuristics-wrapped ones) defined in `module`, by name."""
    kinds = (triton.runtime.JITFunction, triton.runtime.Autotuner, triton.runtime.Heuristics)
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, kinds)}


@contextlib.contextmanager
def compiling_for(arch: int, sink: list) -> Iterator[None]:
    """Within: Triton targets sm_<arch>, launchers accept meta tensors, and every launch compiles into `sink`."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check compiles kernels: unset TRITON_INTERPRET (the interpreter never compiles)")
    import importlib

    modules = {name: importlib.import_module(name) for name in KERNEL_MODULES}
    saved = []

    def patch(module, attr, value):
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)

    for mod_name, gate in _GATES:
        patch(modules[mod_name], gate, lambda t: True)
    patch(modules["tessera_kernels.norm"], "_num_sms", lambda device: SM_COUNT.get(arch, 132))
    for module in modules.values():
        for name, kernel in triton_kernels(module).items():
            patch(module, name, _Recorder(name, kernel, sink))
    previous = driver._active  # None until a real driver was first asked for (never, without CUDA)
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    try:
        yield
    finally:
        driver.set_active(previous)
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


# ---- the cases: MicroDiT_XL_2 shapes (256 px masked: 256 tokens, 64 kept; 512 px: 1024 / 256) -------------------------
def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _gather_cases(dtype):
    from tessera_kernels import gather

    B = 256
    for N, K, D in ((256, 64, 768), (1024, 256, 768), (256, 64, 1024)):
        x, idx = _meta(B, N, D, dtype=dtype), _meta(B, K, dtype=torch.int64)
        name = f"B{B} N{N} K{K} D{D}"
        yield f"gather fwd {name}", lambda: gather.gather_tokens_launch(x, idx)
        yield f"gather bwd dense {name}", lambda: gather.scatter_tokens_launch(_meta(B, K, D, dtype=dtype), idx, N)
        yield f"gather bwd store {name}", lambda: gather.scatter_tokens_launch(
            _meta(B, K, D, dtype=dtype), idx, N, method="store")
        yield f"gather+pos fwd {name}", lambda: gather.gather_tokens_launch(x, idx, _meta(N, D, dtype=dtype))


def _moe_cases(dtype):
    from tessera_kernels import moe

    # XL: 64 kept tokens, 8 experts, capacity 2, width 1024. Nano (configs/tiny.yaml on a GPU): width 128, where the
    # launcher picks many rows per program; this specialization once failed Triton's layout pass on the device.
    for B, T, D, E, k in ((256, 64, 1024, 8, 16), (32, 32, 128, 4, 16)):
        slots = E * B * k
        plan = (_meta(slots, dtype=torch.int64), _meta(B * T + 1, dtype=torch.int64), _meta(slots, dtype=torch.int64))
        name = f"B{B} T{T} D{D} E{E} k{k}"
        yield f"moe dispatch {name}", lambda B=B, T=T, D=D, E=E, plan=plan: moe.dispatch_launch(
            _meta(B, T, D, dtype=dtype), *plan, E)
        yield f"moe combine {name}", lambda B=B, T=T, D=D, E=E, k=k, plan=plan: moe.combine_launch(
            _meta(E, B * k, D, dtype=dtype), _meta(E, B * k, dtype=torch.float32), plan[1], plan[2], B, T)
        yield f"moe combine bwd {name}", lambda B=B, T=T, D=D, E=E, k=k, plan=plan: moe.combine_backward_launch(
            _meta(B, T, D, dtype=dtype), _meta(E, B * k, D, dtype=dtype), _meta(E, B * k, dtype=torch.float32),
            plan[0])


def _norm_cases(dtype):
    from tessera_kernels import norm

    B = 256
    for N, D in ((256, 768), (64, 1024), (256, 1152)):
        x, w = _meta(B, N, D, dtype=dtype), _meta(D, dtype=dtype)
        shift, scale = _meta(B, 6 * D, dtype=dtype).chunk(6, dim=-1)[:2]  # strided adaLN views, as in the model
        yield f"norm fwd B{B} N{N} D{D}", lambda: norm.layernorm_modulate_launch(x, w, shift, scale, 1e-6)
        yield f"norm bwd B{B} N{N} D{D}", lambda: norm.layernorm_modulate_backward_launch(x, x, w, scale, 1e-6)


def _residual_norm_cases(dtype):
    from tessera_kernels import residual_norm as rn

    B = 256
    for N, D in ((256, 768), (64, 1024)):
        x, w = _meta(B, N, D, dtype=dtype), _meta(D, dtype=dtype)
        shift, scale, gate = _meta(B, 6 * D, dtype=dtype).chunk(6, dim=-1)[:3]
        for use, g, sh, sc in (("pre-xattn", gate, None, None), ("pre-mlp", None, shift, scale)):
            name = f"B{B} N{N} D{D} {use}"
            yield f"residual_norm fwd {name}", lambda: rn.add_layernorm_modulate_launch(x, x, g, w, sh, sc, 1e-6)
            yield f"residual_norm bwd {name}", lambda: rn.add_layernorm_modulate_backward_launch(
                x, x, x, x, g, w, sc, sc is not None, 1e-6)


def _attention_cases(dtype):
    from tessera_kernels import attention_triton as at

    B, H = 256, 16
    shapes = [(64, 64, 64, False), (256, 256, 64, False), (1024, 1024, 64, False), (256, 77, 64, True),
              (256, 256, 32, False), (1024, 1024, 128, False)]
    for nq, nk, dh, masked in shapes:
        q, k, v = _meta(B, H, nq, dh, dtype=dtype), _meta(B, H, nk, dh, dtype=dtype), _meta(B, H, nk, dh, dtype=dtype)
        mask = _meta(B, nk, dtype=torch.bool) if masked else None
        name = f"B{B} H{H} Nq{nq} Nk{nk} Dh{dh}{' key-padding' if masked else ''}"
        yield f"attention fwd {name}", lambda: at._fwd_impl(q, k, v, mask, None)
        yield f"attention bwd {name}", lambda: at._bwd_impl(
            q, q, k, v, q, _meta(B, H, nq, dtype=torch.float32), mask, None)


CASES = {"gather": _gather_cases, "moe": _moe_cases, "norm": _norm_cases, "residual_norm": _residual_norm_cases,
         "attention": _attention_cases}


# ---- reading a compiled kernel ----------------------------------------------------------------------------------------
_GLOBAL_ACCESS = re.compile(r"\b(?:ld|st)\.global(?:\.[a-z_0-9]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")
_RES_USAGE = re.compile(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)")


def cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, else the one bundled with Triton's CUDA backend, else None."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return shutil.which("cuobjdump") or (bundled if os.access(bundled, os.X_OK) else None)


def resource_usage(cubin: bytes) -> tuple[int, int, int] | None:
    """(registers, static shared bytes, local bytes per thread) of the cubin's kernel, or None without cuobjdump."""
    tool = cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = _RES_USAGE.findall(text)
    if not found:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{text}")
    regs, shared, local = (int(v) for v in found[-1])
    return regs, shared, local


def widest_global_access(ptx: str) -> int:
    """Bits moved by the widest global load/store instruction of the PTX (e.g. ld.global.v4.b32 -> 128)."""
    return max((int(v or 1) * int(bits) for v, bits in _GLOBAL_ACCESS.findall(ptx)), default=0)


def describe(op: str, case: str, kernel_name: str, compiled) -> CompiledKernel:
    meta = compiled.metadata
    usage = resource_usage(compiled.asm["cubin"])
    regs, static_shared, local = usage if usage else (None, 0, None)
    names = compiled.src.fn.arg_names  # constants are keyed by argument position paths, e.g. (13,)
    consts = {names[path[0]]: value for path, value in compiled.src.constants.items()}
    blocks = " ".join(f"{k}={v}" for k, v in consts.items() if k.startswith("BLOCK"))
    ptx = compiled.asm["ptx"]
    return CompiledKernel(
        op=op, case=case, kernel=kernel_name, config=f"{blocks} warps={meta.num_warps} stages={meta.num_stages}".strip(),
        registers=regs, local_bytes=local, shared_bytes=meta.shared + static_shared,
        vector_bits=widest_global_access(ptx), wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx,
    )


def compile_all(arch: int = 90, dtype: torch.dtype = torch.bfloat16, ops: tuple[str, ...] | None = None,
                case_filter: Callable[[str], bool] | None = None) -> list[CompiledKernel]:
    """Compile every case of `ops` (default: all) for sm_<arch>; one record per kernel and autotune config."""
    records = []
    for op in ops or tuple(CASES):
        for case, launch in CASES[op](dtype):
            if case_filter is not None and not case_filter(case):
                continue
            sink: list = []
            with compiling_for(arch, sink):
                launch()
            for kernel_name, compiled_list in sink:
                records += [describe(op, case, kernel_name, c) for c in compiled_list]
    return records


def _table(records: list[CompiledKernel], arch: int) -> str:
    head = f"{'case':<48} {'kernel':<24} {'config':<38} {'regs':>4} {'spill':>5} {'smem KB':>7} {'vec':>3} mma"
    rows = [head, "-" * len(head)]
    for r in records:
        mma = "wgmma" if r.wgmma else "mma.sync" if r.mma else "-"
        over = "!" if r.shared_bytes > SHARED_LIMIT.get(arch, 1 << 62) else ""
        rows.append(f"{r.case:<48} {r.kernel:<24} {r.config:<38} {r.registers!s:>4} {r.local_bytes!s:>5} "
                    f"{r.shared_bytes / 1024:>6.1f}{over:1} {r.vector_bits:>3} {mma}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ops", nargs="*", choices=sorted(CASES), help="default: all")
    parser.add_argument("--json", help="also write the records here")
    args = parser.parse_args(argv)
    records = compile_all(args.arch, getattr(torch, args.dtype), tuple(args.ops) if args.ops else None)
    print(_table(records, args.arch))
    if args.json:
        import datetime
        import importlib

        defined = sorted({name for m in KERNEL_MODULES for name in triton_kernels(importlib.import_module(m))})
        import platform

        info = dict(kind="static compile for a GPU target on this machine, not a run", arch=args.arch,
                    device=f"none: compiled for sm_{args.arch} on a {platform.machine()} host without a GPU",
                    dtype=args.dtype, date=datetime.date.today().isoformat(), torch=torch.__version__,
                    triton=triton.__version__, shared_limit=SHARED_LIMIT.get(args.arch), kernels_defined=defined)
        with open(args.json, "w") as f:
            json.dump(dict(info, kernels=[dataclasses.asdict(r) for r in records]), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
