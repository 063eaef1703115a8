"""Embed each distinct caption once, optionally cached on disk as safetensors.

Synthetic and real caption sets repeat heavily, so the encoder runs on the U distinct captions and samples refer to
them by id. The cache file records a hash of (encoder name, max_length, distinct captions); a file whose hash does
not match is recomputed and replaced, never silently reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def unique_captions(captions: list[str]) -> tuple[torch.Tensor, list[str]]:
    """(caption_ids LongTensor (N,), distinct captions in order of first appearance)."""
    first: dict[str, int] = {}
    ids = [first.setdefault(c, len(first)) for c in captions]
    return torch.tensor(ids, dtype=torch.long), list(first)


def cache_key(encoder, captions: list[str]) -> str:
    """sha256 hex of (encoder name, max_length, captions): what the embeddings depend on."""
    name = getattr(encoder, "name", type(encoder).__name__)
    blob = json.dumps([name, int(encoder.max_length), list(captions)], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _load(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("emb"), f.get_tensor("mask")
    except (OSError, SafetensorError):  # unreadable or foreign file: recompute
        return None


def _save(path: Path, key: str, emb: torch.Tensor, mask: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"emb": emb.contiguous(), "mask": mask.contiguous()}, str(tmp), metadata={"key": key})
    os.replace(tmp, path)


def embed_unique(captions: list[str], encoder, cache_path=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed the distinct captions once.

    Args:
        captions: N captions, repeats allowed.
        encoder: has `encode(list[str]) -> (emb (U, L, D), mask (U, L))`, `max_length` and ideally `name`.
        cache_path: optional .safetensors file; reused when its key matches, else (re)written atomically.

    Returns:
        caption_ids LongTensor (N,) into the U distinct captions (first-appearance order),
        emb float32 (U, L, D) and mask bool (U, L), on CPU.
    """
    ids, distinct = unique_captions(captions)
    key = cache_key(encoder, distinct)
    if cache_path is not None:
        cached = _load(Path(cache_path), key)
        if cached is not None:
            return ids, cached[0], cached[1]
    emb, mask = encoder.encode(distinct)
    emb, mask = emb.detach().to("cpu", torch.float32), mask.to("cpu", torch.bool)
    if cache_path is not None:
        _save(Path(cache_path), key, emb, mask)
    return ids, emb, mask
