"""Hand-written LoRA with many adapters per layer, each sample routed to its own adapter inside one forward.

Why not peft: TiF trains one adapter per class and scores every class on one test image in a single batch, which
needs per-sample routing in training and inference; peft activates one adapter at a time (its mixed-adapter model
cannot be saved or trained). peft also renames the wrapped modules (`qkv.base_layer.weight`), which would break the
run's DCP, EMA and FSDP2 keys and engine/convert.py's maps.

So nothing in the model changes: the low-rank terms live in a separate module (`LoRA`) and are added to the targeted
nn.Linear outputs by forward hooks while `attach` is open. The model's state_dict keeps its keys; the adapters are
checkpointed on their own. For each targeted linear W (out, in) and adapter k: A_k (rank, in), B_k (out, rank), and
y = W x + (alpha / rank) B_{idx_i} A_{idx_i} x_i for sample i with adapter index idx_i (-1: no adapter). B starts at
zero, so a fresh adapter is the identity.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from engine.config import ConfigError

DEFAULT_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|mlp\.w[123])"


class LoRA(nn.Module):
    """`num_adapters` adapters of `rank` on every nn.Linear of `model` whose name fully matches `targets`."""

    def __init__(self, model: nn.Module, num_adapters: int, rank: int = 4, alpha: float | None = None,
                 targets: str = DEFAULT_TARGETS, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        if num_adapters < 1:
            raise ConfigError(f"LoRA needs at least one adapter, got {num_adapters}")
        self.num_adapters, self.rank, self.targets = num_adapters, rank, targets
        self.alpha = float(rank if alpha is None else alpha)
        self.names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
        if not self.names:
            raise ConfigError(f"LoRA targets {targets!r} match no nn.Linear of the model")
        g = torch.Generator().manual_seed(seed)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for n in self.names:
            lin = model.get_submodule(n)
            bound = 1 / math.sqrt(lin.in_features)  # kaiming-uniform-like A, zero B: the identity at init
            a = (torch.rand(num_adapters, rank, lin.in_features, generator=g) * 2 - 1) * bound
            self.A[_key(n)] = nn.Parameter(a.to(lin.weight.device))
            self.B[_key(n)] = nn.Parameter(torch.zeros(num_adapters, lin.out_features, rank, device=lin.weight.device))
        self.index: torch.Tensor | None = None  # (B,) adapter per sample while routing

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, name: str, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """scale · B_idx A_idx x for x (B, ..., in) and idx (B,); rows with idx < 0 get 0."""
        A, B = self.A[_key(name)], self.B[_key(name)]
        safe = idx.clamp_min(0)
        shape = x.shape
        xf = x.reshape(shape[0], -1, shape[-1]).to(A.dtype)  # (B, T, in)
        z = torch.einsum("bti,bri->btr", xf, A[safe])  # (B, T, rank)
        d = torch.einsum("btr,bor->bto", z, B[safe]) * self.scale  # (B, T, out)
        d = d * (idx >= 0).to(d.dtype).view(-1, 1, 1)
        return d.reshape(*shape[:-1], d.shape[-1])

    @contextmanager
    def attach(self, model: nn.Module, index: torch.Tensor):
        """While open, every forward of `model` adds sample i's adapter index[i] (a (B,) long tensor; with
        classifier-free guidance's doubled batch, give the index of the doubled batch)."""
        handles = []
        for n in self.names:
            def hook(_m, args, out, n=n):
                idx = self.index
                if idx is None or idx.shape[0] != out.shape[0]:
                    raise RuntimeError(f"LoRA routing index has {None if idx is None else idx.shape[0]} rows, the "
                                       f"batch at {n} has {out.shape[0]}")
                return out + self.delta(n, args[0], idx.to(out.device)).to(out.dtype)
            handles.append(model.get_submodule(n).register_forward_hook(hook))
        self.index = index
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.index = None

    @torch.no_grad()
    def merge(self, model: nn.Module, k: int, sign: float = 1.0) -> None:
        """Add adapter k into the base weights (sign -1: take it out again, `unmerge`)."""
        for n in self.names:
            lin = model.get_submodule(n)
            w = self.B[_key(n)][k] @ self.A[_key(n)][k]  # (out, in)
            lin.weight.add_(sign * self.scale * w.to(lin.weight.dtype))

    def unmerge(self, model: nn.Module, k: int) -> None:
        self.merge(model, k, -1.0)

    def spec(self) -> dict:
        return {"num_adapters": self.num_adapters, "rank": self.rank, "alpha": self.alpha, "targets": self.targets}

    def save(self, path: Path, **meta) -> None:
        """Adapters and their spec (plus `meta`, e.g. the base weights' hash) in one file, written atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"spec": self.spec(), "names": self.names, "state_dict": self.state_dict(), "meta": meta}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, model: nn.Module) -> tuple["LoRA", dict]:
        if not Path(path).is_file():
            raise ConfigError(f"no LoRA adapters at {path}")
        blob = torch.load(path, map_location="cpu", weights_only=False)
        lora = cls(model, **blob["spec"])
        if lora.names != blob["names"]:
            raise ConfigError(f"LoRA adapters {path} target other layers than this model has")
        lora.load_state_dict(blob["state_dict"])
        return lora.to(next(model.parameters()).device), blob["meta"]


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots
