"""Op registry: every op the models call, with the backends that implement it.

Models never import a backend directly; they ask `resolve(op, name)` for the function the config selected
(`kernels.gather: torch`, `kernels.attention: sdpa`, ...). An unknown name, or a backend that is not installed
or not supported on this device, is an error that names the config flag and the choices that would work.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Backend:
    """One implementation of an op: where it lives and whether it can run here."""

    module: str  # module path, imported on first use so optional packages stay optional
    attr: str  # function name inside `module`
    available: Callable[[], str | None]  # None when usable, else the reason it is not
    rank: int  # higher wins for `auto`


def _always() -> str | None:
    return None


def _reason(module: str, attr: str) -> Callable[[], str | None]:
    """An availability check that lives in `module` (imported only when asked: optional packages stay optional)."""
    return lambda: getattr(importlib.import_module(module), attr)()


# `auto` ranks, from bench/results/2026-11-30_H200_kernels.json and 2026-12-04_H200_kernels.json (bf16, MicroDiT_XL_2
# shapes, one H200, forward + backward as training runs them). torch won all but one norm and residual-norm case in
# both sessions (Triton 0.41-1.06x; its forward alone is up to 4.9x, but training runs both passes) and the 256-px
# gathers (Triton 0.21-0.33x with its dense backward, cuda 0.66-1.03x); cuda won only the 512-px gather (2.1x both
# times).
# MoE, timed on 12-04 only: Triton 1.16x torch at F=4096 but 0.72x at F=1024, and layer-wise scaling gives the blocks
# both widths. So `auto` is torch for these ops on CUDA as on CPU (there the Triton kernels run only in the
# interpreter); the Triton and CUDA backends stay a flag away: name them to use them.
_FAST_RANK = -1

# op name -> backend name -> Backend. Fast backends (triton, cuda, flash_attn, ...) register here as they land.
_REGISTRY: dict[str, dict[str, Backend]] = {
    "gather": {
        "torch": Backend("tessera_kernels.gather", "gather_tokens_ref", _always, 0),
        "triton": Backend("tessera_kernels.gather", "gather_tokens_triton",
                          _reason("tessera_kernels.gather", "triton_unavailable"), _FAST_RANK),
        # csrc/ extension `tessera_csrc`: built by setup.py only where CUDA + nvcc are present at install time
        "cuda": Backend("tessera_kernels.gather_cuda", "gather_tokens_cuda",
                        _reason("tessera_kernels.gather_cuda", "cuda_unavailable"), _FAST_RANK),
    },
    "moe": {
        "torch": Backend("tessera_kernels.moe", "expert_choice_ref", _always, 0),
        "triton": Backend("tessera_kernels.moe", "expert_choice_triton",
                          _reason("tessera_kernels.moe", "triton_unavailable"), _FAST_RANK),
        # megablocks has token-choice dMoE only, not expert choice: available() always gives the reason it can't run
        "megablocks": Backend("tessera_kernels.moe", "expert_choice_megablocks",
                              _reason("tessera_kernels.moe", "megablocks_unavailable"), _FAST_RANK),
    },
    "norm": {
        "torch": Backend("tessera_kernels.norm", "layernorm_modulate_ref", _always, 0),
        "triton": Backend("tessera_kernels.norm", "layernorm_modulate_triton",
                          _reason("tessera_kernels.norm", "triton_unavailable"), _FAST_RANK),
    },
    # follows `kernels.norm` (no flag of its own): the block's gated residual add fused with the norm after it
    "residual_norm": {
        "torch": Backend("tessera_kernels.residual_norm", "add_layernorm_modulate_ref", _always, 0),
        "triton": Backend("tessera_kernels.residual_norm", "add_layernorm_modulate_triton",
                          _reason("tessera_kernels.norm", "triton_unavailable"), _FAST_RANK),
    },
    # auto = sdpa everywhere: on CPU it is the only fast one; on the H200 it beat our Triton kernel on every
    # self-attention case in both sessions (bench/results/2026-11-30_ and 2026-12-04_H200_attention.json: Triton
    # 0.29-0.85x); Triton won only the padded 77-token cross-attention forward (1.41x, 1.32x; fwd+bwd 0.90x, 1.12x).
    "attention": {
        "sdpa": Backend("tessera_kernels.attention", "attention_sdpa", _always, 4),
        "flash_attn": Backend("tessera_kernels.attention", "attention_flash_attn",
                              _reason("tessera_kernels.attention", "flash_attn_unavailable"), 3),
        "triton": Backend("tessera_kernels.attention_triton", "attention_triton",
                          _reason("tessera_kernels.attention", "triton_unavailable"), 2),
        "xformers": Backend("tessera_kernels.attention", "attention_xformers",
                            _reason("tessera_kernels.attention", "xformers_unavailable"), 1),
        "torch": Backend("tessera_kernels.attention", "attention_ref", _always, 0),
    },
}


# Ops without a config flag of their own: they take the backend named by another op's flag (same kernels family).
FOLLOWS = {"residual_norm": "norm"}


def ops() -> list[str]:
    """Names of the ops that have a config flag (`kernels.<op>`)."""
    return sorted(op for op in _REGISTRY if op not in FOLLOWS)


def flag_backends(flags: dict[str, str]) -> dict[str, str]:
    """Backend name per op, every op included: `flags` (op -> name, as in the config) plus the ops that follow one."""
    return {**flags, **{op: flags[leader] for op, leader in FOLLOWS.items() if leader in flags}}


def backends(op: str) -> list[str]:
    """Every backend name known for `op` (installed or not), plus `auto`."""
    _check_op(op)
    return sorted(_REGISTRY[op]) + ["auto"]


def available_backends(op: str) -> list[str]:
    """Backend names for `op` that can run in this process."""
    _check_op(op)
    return sorted(name for name, b in _REGISTRY[op].items() if b.available() is None)


def resolve_name(op: str, name: str) -> str:
    """Map `auto` to the best available backend and check that `name` can run here."""
    _check_op(op)
    table = _REGISTRY[op]
    if name == "auto":
        usable = [(b.rank, n) for n, b in table.items() if b.available() is None]
        return max(usable)[1]
    if name not in table:
        raise ValueError(
            f"kernels.{FOLLOWS.get(op, op)}: unknown backend '{name}'; choices: {', '.join(backends(op))}"
        )
    reason = table[name].available()
    if reason is not None:
        raise ValueError(
            f"kernels.{FOLLOWS.get(op, op)}: backend '{name}' is not usable here ({reason}); "
            f"available: {', '.join(available_backends(op) + ['auto'])}"
        )
    return name


def resolve(op: str, name: str) -> Callable:
    """The function implementing `op` with backend `name` (or the best one for `auto`)."""
    name = resolve_name(op, name)
    backend = _REGISTRY[op][name]
    return getattr(importlib.import_module(backend.module), backend.attr)


def _check_op(op: str) -> None:
    if op not in _REGISTRY:
        raise ValueError(f"kernels: unknown op '{op}'; ops: {', '.join(sorted(_REGISTRY))}")
