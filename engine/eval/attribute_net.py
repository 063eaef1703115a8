"""Features for a Fréchet distance that needs no download and means something on the synthetic set.

A small CNN is trained on SyntheticShapes to read what the captions describe: for each of the 18 (colour, shape)
kinds how many objects of it the image holds (0-3), the relation between the two groups (none, left of, above), and
as easier side tasks the number of objects of each colour and of each shape (0-6), which get learning started: with
the kind counts alone, 92% of whose labels are 0, the net sat on the prior for hundreds of steps.
Its 64-wide penultimate layer is the feature space. Inception features were learned on photographs and barely
separate a red square from a red circle at 32 px; these are learned on exactly the attributes the prompts set.

Training is deterministic from a seed (data, init and order, at a fixed thread count), takes well under two minutes
on two CPU cores, and the weights are cached (`cached_attribute_net`), so every evaluation of every run uses the same
extractor; its name carries a hash of the weights, which eval.json records and the Fréchet code checks before
comparing.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.data.synthetic import COLOURS, MAX_COUNT, RELATIONS, SHAPES, SyntheticShapes

FEATURE_DIM = 64
KINDS = [(c, s) for c in COLOURS for s in SHAPES]
RELATION_LABELS = (None, *RELATIONS)
TRAIN_SEED = 2_000_003  # images the net learns from: neither the training seed nor the held-out prompt seed
VERSION = 1  # bump when the architecture or the recipe changes: the cache key holds it


class AttributeNet(nn.Module):
    """uint8-derived float images (B, 3, H, W) in [-1, 1] -> features (B, 64) and attribute logits."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size
        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        # Full resolution first (a 6-px triangle and circle differ in a few pixels), then three stride-2 stages.
        self.body = nn.Sequential(*conv(3, 32, 1), *conv(32, 32, 2), *conv(32, 64, 2), *conv(64, 64, 2))
        side = -(-image_size // 8)
        # Flattening (not pooling) keeps where things are: "left of" and "above" need it.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, FEATURE_DIM), nn.BatchNorm1d(FEATURE_DIM))
        self.count_head = nn.Linear(FEATURE_DIM, len(KINDS) * (MAX_COUNT + 1))
        self.relation_head = nn.Linear(FEATURE_DIM, len(RELATION_LABELS))
        self.colour_head = nn.Linear(FEATURE_DIM, len(COLOURS) * (2 * MAX_COUNT + 1))
        self.shape_head = nn.Linear(FEATURE_DIM, len(SHAPES) * (2 * MAX_COUNT + 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))  # (B, 64)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: counts (B, 18, 4), relation (B, 3), colour counts (B, 6, 7), shape counts (B, 3, 7)."""
        f = F.relu(self.features(x))
        return {"counts": self.count_head(f).view(-1, len(KINDS), MAX_COUNT + 1),
                "relation": self.relation_head(f),
                "colours": self.colour_head(f).view(-1, len(COLOURS), 2 * MAX_COUNT + 1),
                "shapes": self.shape_head(f).view(-1, len(SHAPES), 2 * MAX_COUNT + 1)}


def attribute_labels(ds: SyntheticShapes, indices) -> dict[str, torch.Tensor]:
    """Targets of samples `indices`: counts (n, 18), relation (n,), colours (n, 6), shapes (n, 3), all long."""
    counts = torch.zeros(len(indices), len(KINDS), dtype=torch.long)
    relation = torch.zeros(len(indices), dtype=torch.long)
    for row, i in enumerate(indices):
        facts = ds.describe(i)
        for g in facts["groups"]:
            counts[row, KINDS.index((g["colour"], g["shape"]))] = g["count"]
        relation[row] = RELATION_LABELS.index(facts["relation"])
    per_kind = counts.view(-1, len(COLOURS), len(SHAPES))  # KINDS is colour-major
    return {"counts": counts, "relation": relation, "colours": per_kind.sum(2), "shapes": per_kind.sum(1)}


def attribute_loss(logits: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the heads' outputs (each kind, colour and shape counts as one), mean over images."""
    return sum(F.cross_entropy(v.reshape(-1, v.shape[-1]), target[k].reshape(-1)) * (v.numel() // v.shape[-1])
               for k, v in logits.items()) / len(target["relation"])


# The convolutions' sums are split among CPU threads, so the trained weights depend on the thread count: an evaluation
# run at one thread beside another run would train another extractor than one alone on two cores, and its FDs could
# not be compared. Training always uses this many threads (2: what the caches made before this pin were trained with).
TRAIN_THREADS = 2


def train_attribute_net(image_size: int, seed: int = 0, num_images: int = 12288, steps: int = 800,
                        batch: int = 64) -> AttributeNet:
    """Train deterministically from `seed`, at TRAIN_THREADS whatever the caller's thread count. Mild pixel noise and
    colour jitter make the features tolerate the small deviations of generated images from the palette without
    learning to ignore shape."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        return fit_attribute_net(image_size, seed, num_images, steps, batch)
    finally:
        torch.set_num_threads(threads)


def fit_attribute_net(image_size: int, seed: int, num_images: int, steps: int, batch: int) -> AttributeNet:
    torch.manual_seed(seed)
    ds = SyntheticShapes(num_images, image_size, TRAIN_SEED + seed)
    x = ds.images(range(num_images))  # (n, 3, H, W) in [-1, 1]
    target = attribute_labels(ds, range(num_images))
    net = AttributeNet(image_size).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, num_images, (batch,), generator=gen)
        xb = x[idx]
        jitter = (torch.rand(batch, 3, 1, 1, generator=gen) - 0.5) * 0.1  # per-image colour shift
        noise = torch.randn(xb.shape, generator=gen) * torch.rand(batch, 1, 1, 1, generator=gen) * 0.1
        loss = attribute_loss(net((xb + jitter + noise).clamp(-1, 1)), {k: v[idx] for k, v in target.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def weights_hash(net: nn.Module) -> str:
    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()[:12]


class AttributeFeatures:
    """`extractor(images)` -> (B, 64) float32 features; images uint8 (B, H, W, 3) / (B, 3, H, W) or float in [-1, 1].
    `name` identifies the weights (FIDs from different extractors are never compared)."""

    def __init__(self, net: AttributeNet, source: str = ""):
        self.net = net.eval()
        self.name = f"synthetic-attributes-v{VERSION}@{weights_hash(net)}" + (f" ({source})" if source else "")

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        from engine.eval.fid import as_uint8_nchw

        x = as_uint8_nchw(images).float().div(127.5).sub(1.0)
        if x.shape[-1] != self.net.image_size or x.shape[-2] != self.net.image_size:
            raise ValueError(f"attribute features were trained on {self.net.image_size}px images, got "
                             f"{tuple(x.shape[-2:])}")
        return self.net.features(x).float()

    @torch.no_grad()
    def accuracy(self, ds: SyntheticShapes, n: int) -> dict:
        """Per head, the fraction of images whose every output is right, on samples 0..n-1 of `ds`."""
        target = attribute_labels(ds, range(n))
        logits = self.net(ds.images(range(n)))
        return {k: float((v.argmax(-1) == target[k]).reshape(n, -1).all(-1).float().mean()) for k, v in logits.items()}


def cache_path(image_size: int, cache_dir: Path, seed: int = 0) -> Path:
    return Path(cache_dir) / f"attribute_net_v{VERSION}_{image_size}px_seed{seed}.pt"


def cached_attribute_net(image_size: int, cache_dir: Path, seed: int = 0) -> AttributeFeatures:
    """The attribute net for this image size and seed, trained once and kept in `cache_dir` (atomically written)."""
    path = cache_path(image_size, cache_dir, seed)
    net = AttributeNet(image_size)
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return AttributeFeatures(net.eval(), str(path.name))
    with torch.random.fork_rng():  # training must not move the caller's global RNG
        net = train_attribute_net(image_size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    return AttributeFeatures(net, str(path.name))


def frechet_of_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between two (N, D) feature sets (unbiased covariances)."""
    from engine.eval.fid import frechet_distance

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
