"""Training from a precomputed set (engine/precompute.py): VAE latents and unpadded caption embeddings in HF
`datasets` Arrow shards, memory-mapped, read by DataLoader workers with pinned memory and prefetch.

The order is the deterministic global stream of engine/data/sampler.py: step s, positions [lo, hi) of its global
batch, for every process and any world size. The loader is started at the resumed step, so the data position is
the step number held in every checkpoint and a resumed run sees exactly the samples it would have seen."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from engine.data.batch import Batch
from engine.data.sampler import global_batch_indices


class PrecomputedSet(Dataset):
    """One resolution of a precomputed set. `batch(indices)` -> latents (B, C, h, w), caption embeddings (B, L, D)
    padded (or truncated) to L = caption_len, both float16 as stored (half the bytes to pin and copy; the consumer
    casts on the device), and their mask (B, L) bool. Rows are taken straight
    from the memory-mapped Arrow columns (one take per micro-batch, no per-row Python), which is what lets a few
    workers outrun the training step."""

    def __init__(self, root: str | Path, resolution: int, caption_len: int):
        import datasets
        import pyarrow as pa

        from engine.data.manifest import read_manifest

        self.root, self.caption_len = Path(root), caption_len
        self.manifest = read_manifest(self.root)
        entry = self.manifest["resolutions"].get(str(resolution))
        if entry is None:
            have = ", ".join(self.manifest["resolutions"]) or "none"
            raise ValueError(f"{self.root / 'manifest.json'}: no resolution {resolution} (has: {have}); "
                             "set data.resolution to one of them or precompute it")
        self.entry = entry
        self.latent_shape = tuple(entry["latent_shape"])
        tables = [datasets.load_from_disk(str(self.root / s["path"])).data.table for s in entry["shards"]]
        self.table = pa.concat_tables(tables).select(["latent", "caption_emb"])  # still memory-mapped
        if self.table.num_rows != entry["count"]:
            raise ValueError(f"{self.root / 'manifest.json'}: resolutions.{resolution}.count={entry['count']} but the "
                             f"shards hold {self.table.num_rows} samples")

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int):
        latent, emb, mask = self.batch([i])
        return latent[0], emb[0], mask[0]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.table.take(np.asarray(indices, dtype=np.int64))
        latent = rows.column("latent").combine_chunks().storage  # list<list<list<half>>> (Array3D)
        for _ in range(3):
            latent = latent.flatten()
        x = latent.to_numpy(zero_copy_only=False).reshape(len(indices), *self.latent_shape).copy()  # off the mmap
        emb = rows.column("caption_emb").combine_chunks().storage  # list<list<half>>: tokens of each caption
        lengths = np.diff(emb.offsets.to_numpy())  # (B,) real tokens per caption
        tokens = emb.flatten().flatten().to_numpy(zero_copy_only=False)
        tokens = tokens.reshape(-1, len(tokens) // max(1, lengths.sum()))  # (sum of lengths, D)
        L, D = self.caption_len, tokens.shape[1]
        padded = np.zeros((len(indices), L, D), dtype=tokens.dtype)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for b, (s, n) in enumerate(zip(starts, lengths)):
            n = min(n, L)
            padded[b, :n] = tokens[s:s + n]
        mask = np.arange(L)[None] < np.minimum(lengths, L)[:, None]
        return torch.from_numpy(x), torch.from_numpy(padded), torch.from_numpy(mask)


def check_matches_config(ds: PrecomputedSet, channels: int, latent_side: int, caption_channels: int) -> None:
    """A set built for another model is an error naming the manifest and the field, before any step runs."""
    where = ds.root / "manifest.json"
    shape = list(ds.entry["latent_shape"])
    if shape != [channels, latent_side, latent_side]:
        raise ValueError(f"{where}: latent_shape={shape} but the config wants "
                         f"[data.channels={channels}, data.image_size={latent_side}, {latent_side}]")
    dim = ds.manifest["text_encoder"]["dim"]
    if dim != caption_channels:
        raise ValueError(f"{where}: text_encoder.dim={dim} but data.caption_channels={caption_channels}")
    stored = ds.manifest["text_encoder"]["max_length"]
    if ds.caption_len < stored:  # captions up to `stored` tokens were kept: a shorter L would cut them silently
        raise ValueError(f"{where}: text_encoder.max_length={stored} but data.caption_len={ds.caption_len}; "
                         f"set data.caption_len >= {stored}")


class StepBatches(torch.utils.data.Sampler):
    """Yields this process's micro-batches in training order, from `start_step` to `steps`: (step, lo, sample
    indices of global positions [lo, lo + micro_batch) of that step's batch in the deterministic stream)."""

    def __init__(self, num_samples, seed, global_batch, micro_batch, rank, world_size, start_step, steps):
        self.args = num_samples, seed, global_batch, micro_batch, rank, world_size, start_step, steps

    def __iter__(self):
        n, seed, gb, mb, rank, world, start, steps = self.args
        per_rank = gb // world
        for step in range(start, steps):
            idx = global_batch_indices(step, gb, n, seed)
            for lo in range(rank * per_rank, (rank + 1) * per_rank, mb):
                yield step, lo, idx[lo:lo + mb].tolist()

    def __len__(self) -> int:
        n, seed, gb, mb, rank, world, start, steps = self.args
        return (steps - start) * (gb // world // mb)


class MicroBatches(Dataset):
    """Maps a (step, lo, indices) spec to its collated micro-batch inside a worker; the (step, lo) tag rides along
    so the consumer can check it gets the batch it asked for."""

    def __init__(self, base: PrecomputedSet):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, spec):
        step, lo, indices = spec
        return (step, lo), *self.base.batch(indices)


def as_is(item):
    """The micro-batch is already collated; keep the (step, lo) tag a tuple."""
    return item


class PrecomputedData:
    """`batch(step, global_batch, lo, hi)` for the training loop, served by a prefetching DataLoader."""

    def __init__(self, ds: PrecomputedSet, seed: int, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 steps: int, device: torch.device, num_workers: int):
        self.ds, self.device, self.num_workers = ds, device, num_workers
        self.order = seed, global_batch, micro_batch, rank, world_size, steps
        self.loader = None

    def start(self, step: int) -> None:
        """Begin serving at `step` (the resumed step); workers start prefetching now."""
        seed, gb, mb, rank, world, steps = self.order
        sampler = StepBatches(len(self.ds), seed, gb, mb, rank, world, step, steps)
        self.loader = iter(DataLoader(
            MicroBatches(self.ds), sampler=sampler, batch_size=None, collate_fn=as_is, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.num_workers else None,
        ))

    def batch(self, step: int, global_batch: int, lo: int, hi: int) -> Batch:
        tag, x, y, mask = next(self.loader)
        if tag != (step, lo):
            raise RuntimeError(f"data loader out of order: asked for step {step} position {lo}, got {tag}")
        to = lambda t: t.to(self.device, non_blocking=True)
        return Batch(to(x).float(), to(y).float(), to(mask))
