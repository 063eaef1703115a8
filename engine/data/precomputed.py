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

from engine.data.sampler import global_batch_indices
from engine.data.train_data import Batch


class PrecomputedSet(Dataset):
    """One resolution of a precomputed set: item i -> (latent (C, h, w) float32, emb (L, D) float32, mask (L,) bool),
    caption embeddings padded (or truncated) to L = caption_len at load time."""

    def __init__(self, root: str | Path, resolution: int, caption_len: int):
        import datasets

        from engine.data.manifest import read_manifest

        self.root, self.caption_len = Path(root), caption_len
        self.manifest = read_manifest(self.root)
        entry = self.manifest["resolutions"].get(str(resolution))
        if entry is None:
            have = ", ".join(self.manifest["resolutions"]) or "none"
            raise ValueError(f"{self.root / 'manifest.json'}: no resolution {resolution} (has: {have}); "
                             "set data.resolution to one of them or precompute it")
        self.entry = entry
        shards = [datasets.load_from_disk(str(self.root / s["path"])) for s in entry["shards"]]
        self.table = datasets.concatenate_datasets(shards).with_format("numpy", columns=["latent", "caption_emb"])
        if len(self.table) != entry["count"]:
            raise ValueError(f"{self.root / 'manifest.json'}: resolutions.{resolution}.count={entry['count']} but the "
                             f"shards hold {len(self.table)} samples")

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int):
        row = self.table[int(i)]
        emb = np.asarray(row["caption_emb"], dtype=np.float32)[: self.caption_len]  # (n, D), real tokens only
        padded = np.zeros((self.caption_len, emb.shape[1]), dtype=np.float32)
        padded[: len(emb)] = emb
        mask = np.arange(self.caption_len) < len(emb)
        return torch.from_numpy(np.asarray(row["latent"], dtype=np.float32)), torch.from_numpy(padded), torch.from_numpy(mask)


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


class StepBatches(torch.utils.data.Sampler):
    """Yields this process's micro-batches in training order, from `start_step` to `steps`: global positions
    [lo, hi) of each step's batch, mapped to sample indices by the deterministic stream."""

    def __init__(self, num_samples, seed, global_batch, micro_batch, rank, world_size, start_step, steps):
        self.args = num_samples, seed, global_batch, micro_batch, rank, world_size, start_step, steps

    def __iter__(self):
        n, seed, gb, mb, rank, world, start, steps = self.args
        per_rank = gb // world
        for step in range(start, steps):
            idx = global_batch_indices(step, gb, n, seed)
            for lo in range(rank * per_rank, (rank + 1) * per_rank, mb):
                yield [(step, lo, int(i)) for i in idx[lo:lo + mb]]

    def __len__(self) -> int:
        n, seed, gb, mb, rank, world, start, steps = self.args
        return (steps - start) * (gb // world // mb)


class TaggedSet(Dataset):
    """Passes the (step, lo) tag through the workers so the consumer can check it gets the batch it asked for."""

    def __init__(self, base: PrecomputedSet):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, tagged):
        step, lo, i = tagged
        return (step, lo), self.base[i]


def collate(items):
    tags = {t for t, _ in items}
    latents, embs, masks = zip(*(x for _, x in items))
    return tags.pop(), torch.stack(latents), torch.stack(embs), torch.stack(masks)


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
            TaggedSet(self.ds), batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.num_workers else None,
        ))

    def batch(self, step: int, global_batch: int, lo: int, hi: int) -> Batch:
        tag, x, y, mask = next(self.loader)
        if tag != (step, lo):
            raise RuntimeError(f"data loader out of order: asked for step {step} position {lo}, got {tag}")
        to = lambda t: t.to(self.device, non_blocking=True)
        return Batch(to(x), to(y), to(mask))
