"""What the training loop reads: one micro-batch of (inputs, caption embeddings, caption mask) per call.

`synthetic`: the built-in coloured-shapes set, rendered and caption-embedded once at start and kept in memory
(distinct captions are embedded once and cached on disk). `random`: latents and caption embeddings drawn on the
device, for benchmarks and smoke tests of large models without a dataset. Both are pure functions of
(seed, step, position in the global batch), so resume is exact and any world size sees the same samples.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.config import Config, ConfigError
from engine.data.batch import Batch
from engine.data.sampler import global_batch_indices
from engine.training.seeding import derive_seed


class InMemoryData:
    """Inputs and caption embeddings held on the device; a batch is an index_select. mask None: no token is padding."""

    def __init__(self, x: torch.Tensor, caption_ids: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor | None,
                 seed: int):
        self.x, self.caption_ids, self.emb, self.mask, self.seed = x, caption_ids, emb, mask, seed

    def start(self, step: int) -> None:
        """Nothing to prefetch: batches are computed from the step."""

    @property
    def num_samples(self) -> int:
        return self.x.shape[0]

    def batch(self, step: int, global_batch: int, lo: int, hi: int) -> Batch:
        """Positions [lo, hi) of step `step`'s global batch."""
        idx = global_batch_indices(step, global_batch, self.num_samples, self.seed)[lo:hi]
        if self.x.device.type == "cuda":  # pinned + non_blocking: a pageable copy would wait for the GPU
            idx = idx.pin_memory().to(self.x.device, non_blocking=True)
        cap = self.caption_ids[idx]
        return Batch(self.x[idx], self.emb[cap], None if self.mask is None else self.mask[cap])


class RandomData:
    """Gaussian inputs and caption embeddings of the configured shapes, with random caption lengths; or, with
    `padded=False` (data.attend_to_padding), every caption full length and no key mask."""

    def __init__(self, shape: tuple[int, int, int], caption_len: int, caption_channels: int, seed: int, device,
                 padded: bool = True):
        self.shape, self.caption_len, self.caption_channels, self.seed = shape, caption_len, caption_channels, seed
        self.device, self.padded = device, padded

    def start(self, step: int) -> None:
        """Nothing to prefetch: batches are drawn from the step."""

    def batch(self, step: int, global_batch: int, lo: int, hi: int) -> Batch:
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, step, lo, "random-data"))
        n, L = hi - lo, self.caption_len
        x = torch.randn(n, *self.shape, generator=g, device=self.device)
        y = torch.randn(n, L, self.caption_channels, generator=g, device=self.device)
        if not self.padded:
            return Batch(x, y, None)
        lengths = torch.randint(1, L + 1, (n, 1), generator=g, device=self.device)
        return Batch(x, y, torch.arange(L, device=self.device) < lengths)


def build_train_data(cfg: Config, device: torch.device, cache_dir: Path, rank: int = 0, world_size: int = 1):
    """The training data of `cfg.data`, and the text encoder for sample prompts (None for `random`)."""
    d = cfg.data
    shape = (d.channels, d.image_size, d.image_size)
    if d.source == "random":
        return RandomData(shape, d.caption_len, d.caption_channels, cfg.run.seed, device, not d.attend_to_padding), None
    if d.source == "precomputed":
        try:
            encoder = load_text_encoder(cfg)  # only for the sample grids' prompts
        except ConfigError as e:  # e.g. a hub encoder on an offline machine: train anyway, without sample grids
            print(f"warning: {e}; no sample grids", flush=True)
            encoder = None
        return build_precomputed(cfg, device, rank, world_size), encoder
    from engine.data.caption_cache import embed_unique
    from engine.data.synthetic import synthetic_train_set

    encoder = load_text_encoder(cfg)
    ds = synthetic_train_set(cfg)
    everything = range(d.num_samples)
    captions = ds.captions(everything)
    check_caption_len(encoder, captions)
    ids, emb, mask = embed_unique(captions, encoder, cache_path=cache_dir / "synthetic_captions.safetensors")
    x = ds.images(everything)
    mask = key_padding_mask(cfg, mask)
    return InMemoryData(x.to(device), ids.to(device), emb.to(device), mask if mask is None else mask.to(device),
                        cfg.run.seed), encoder


def check_caption_len(encoder, captions: list[str]) -> None:
    """A training caption longer than data.caption_len (the encoder's max_length) would lose its last words without a
    sign (the text encoder truncates): ConfigError naming the longest one."""
    cut = encoder.cut(captions)
    if cut:
        n, longest = cut[0]
        raise ConfigError(f"config: data.caption_len={encoder.max_length} but the training caption {longest!r} has "
                          f"{n} tokens ({encoder.name}): its last words would be cut; set data.caption_len >= {n}")


def key_padding_mask(cfg: Config, mask: torch.Tensor) -> torch.Tensor | None:
    """The caption mask attention gets: None when data.attend_to_padding says every position is real. Decided from
    the config, never by looking at the mask: checking it for padding would be a host sync in every step."""
    return None if cfg.data.attend_to_padding else mask


class PaddingVisible:
    """A text encoder whose masks mark every position real: padding embeddings are attended to (data.attend_to_padding,
    the official MicroDiT behaviour)."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.name = f"{encoder.name} (padding visible)"  # its own caption-cache key: the masks differ

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, captions):
        emb, mask = self.encoder.encode(captions)
        return emb, torch.ones_like(mask)


def load_text_encoder(cfg: Config):
    """The configured text encoder, checked against data.caption_channels; ConfigError when it cannot be loaded."""
    from engine.encoders.text_encoder import TextEncoder

    try:
        encoder = TextEncoder(cfg.data.text_encoder, max_length=cfg.data.caption_len)
    except (OSError, ImportError, ValueError) as e:  # no such folder or id, its package missing, too short a model
        raise ConfigError(f"config: data.text_encoder={cfg.data.text_encoder!r} cannot be loaded: {e}") from None
    if encoder.dim != cfg.data.caption_channels:
        raise ConfigError(
            f"config: data.caption_channels={cfg.data.caption_channels} but text encoder "
            f"'{cfg.data.text_encoder}' produces {encoder.dim}-wide embeddings"
        )
    return PaddingVisible(encoder) if cfg.data.attend_to_padding else encoder


def build_precomputed(cfg: Config, device: torch.device, rank: int, world_size: int):
    """The precomputed set of data.path at data.resolution, checked against the config (and checksums)."""
    from engine.data.manifest import verify_checksums
    from engine.data.precomputed import PrecomputedData, PrecomputedSet, check_matches_config

    d, t = cfg.data, cfg.train
    if d.attend_to_padding:  # precompute stores real tokens only: there are no padding embeddings to attend to
        raise ConfigError("config: data.attend_to_padding=true cannot be honoured with data.source=precomputed "
                          "(padding embeddings are not stored); set it to false to fine-tune on a precomputed set")
    if "://" in d.path:
        raise ConfigError(f"config: data.path={d.path!r}: training reads a local (or mounted) folder; copy the set "
                          "there first (precompute sources may be remote, its output and the training set may not)")
    try:  # every failure here is the set at data.path: missing, unfinished, built for another model, or modified
        ds = PrecomputedSet(d.path, d.resolution, d.caption_len)
        check_matches_config(ds, d.channels, d.image_size, d.caption_channels)
        if ds.manifest["text_encoder"]["name"] != d.text_encoder:
            raise ValueError(f"{ds.root / 'manifest.json'}: text_encoder.name={ds.manifest['text_encoder']['name']!r} "
                             f"but data.text_encoder={d.text_encoder!r}: sample prompts would be embedded differently")
        if d.verify_checksums:
            verify_checksums(ds.root, ds.manifest)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config: data.path={d.path!r}: {e}") from None
    return PrecomputedData(ds, cfg.run.seed, t.global_batch, t.micro_batch, rank, world_size, t.steps, device,
                           d.num_workers)
