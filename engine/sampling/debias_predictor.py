"""Training the attribute distribution predictor of a trained run (engine/debias.py train-predictor).

Pseudo-labels as in the paper: the procedural detector reads each training image's colour (images whose objects all
share one colour; the label is that colour). Features: the run's EMA model on the image noised to a random sigma
(log-uniform), with the caption's colour words removed, as the colour-free prompts are at sampling. Classes are
balanced by drawing the same number of (image, sigma) pairs per class. A linear probe over layers x sigma bands picks
the layer (best mean balanced accuracy over the bands the sampler spends its guidance in); then the predictor (an MLP
with sigma as input) is fitted there. The file records a hash of the weights it was trained on: sampling checks it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from engine.config import ConfigError
from engine.data.synthetic import COLOURS, caption_of, synthetic_train_set
from engine.diffusion.edm import EDM
from engine.eval.geneval import ShapeDetector
from engine.sampling.attribute_predictor import AttributePredictor, balanced_accuracy, fit_predictor
from engine.sampling.feature_tap import FeatureTap, layer_names

SIGMA_BANDS = (0.01, 0.1, 0.3, 1.0, 2.0, 5.0, 10.0, 20.0, 80.0)
CHOOSE_FROM = 0.3  # the layer is chosen on the bands above this sigma: below it the colour is already fixed


def weights_hash(model) -> str:
    """sha256 over the model's state (names and bytes in name order): which weights a predictor belongs to."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def labelled_images(cfg) -> tuple[list[int], list[int], list[str]]:
    """(indices, colour labels, colour-free captions) of the run's training images whose detected objects share one
    colour; labels index COLOURS."""
    ds = synthetic_train_set(cfg)
    n = cfg.data.num_samples
    dets = ShapeDetector().detect(ds.images(range(n)))
    names = list(COLOURS)
    idx, labels, caps = [], [], []
    for i, d in enumerate(dets):
        colours = {x.colour for x in d}
        if len(colours) == 1:
            idx.append(i)
            labels.append(names.index(colours.pop()))
            caps.append(caption_of(ds.describe(i), colours=False))
    return idx, labels, caps


@torch.no_grad()
def extract(model, edm: EDM, cfg, embed, images: torch.Tensor, captions: list[str], sigma: torch.Tensor,
            layers: list[str], seed: int, batch: int = 256) -> dict[str, torch.Tensor]:
    """Mean-pooled features (M, D) per layer of the conditional forward at x0 + sigma * noise."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {k: [] for k in layers}
    with FeatureTap(model, layers) as tap:
        for lo in range(0, len(images), batch):
            x0 = images[lo:lo + batch]
            s = sigma[lo:lo + batch]
            x = x0 + torch.randn(x0.shape, generator=g) * s.view(-1, 1, 1, 1)
            y, y_mask = embed(captions[lo:lo + batch])
            edm.denoise(model, x.to(device), s.to(device), y, y_mask)
            for k in layers:
                out[k].append(tap.features[k].float().mean(1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def band_accuracy(adp, feats, sigma, labels) -> list[float]:
    """Balanced accuracy per SIGMA_BANDS band."""
    accs = []
    for lo, hi in zip(SIGMA_BANDS, SIGMA_BANDS[1:]):
        m = (sigma >= lo) & (sigma < hi)
        accs.append(round(balanced_accuracy(adp, feats[m], sigma[m], labels[m]), 4) if m.any() else None)
    return accs


def train_predictor(cfg, model, embed, pairs_per_class: int = 800, seed: int = 0, layer: str | None = None,
                    steps: int = 600, log=print) -> dict:
    """Probe every layer, fit the predictor on the chosen (or given) layer; returns the bundle to save."""
    idx, labels, caps = labelled_images(cfg)
    labels_t = torch.tensor(labels)
    K = len(COLOURS)
    present = [k for k in range(K) if (labels_t == k).any()]
    if len(present) < K:
        missing = [list(COLOURS)[k] for k in range(K) if k not in present]
        raise ConfigError(f"the run's training images have no single-colour image of {missing}: nothing to learn from")
    g = torch.Generator().manual_seed(seed)
    ds = synthetic_train_set(cfg)
    # per class: images split 80/20 into train/test (disjoint), then pairs drawn with replacement from each part
    chosen, split = [], []
    for k in range(K):
        mine = torch.nonzero(labels_t == k).flatten()
        mine = mine[torch.randperm(len(mine), generator=g)]
        cut = max(1, int(0.8 * len(mine)))
        for part, pool, m in ((0, mine[:cut], pairs_per_class), (1, mine[cut:] if len(mine) > cut else mine[:cut],
                                                                  pairs_per_class // 4)):
            pick = pool[torch.randint(len(pool), (m,), generator=g)]
            chosen += pick.tolist()
            split += [part] * m
    chosen_t, split_t = torch.tensor(chosen), torch.tensor(split)
    lo, hi = np.log(SIGMA_BANDS[0]), np.log(SIGMA_BANDS[-1])
    sigma = (torch.rand(len(chosen), generator=g) * (hi - lo) + lo).exp()
    images = ds.images([idx[c] for c in chosen])
    layers = layer_names(model)
    feats = extract(model, EDM.from_config(cfg.diffusion), cfg, embed, images, [caps[c] for c in chosen], sigma,
                    layers, seed + 1)
    y = labels_t[chosen_t]
    tr, te = split_t == 0, split_t == 1
    probe = {}
    for name in layers:
        lin = fit_predictor(feats[name][tr], sigma[tr], y[tr], K, hidden=0, steps=300, seed=seed)
        probe[name] = band_accuracy(lin, feats[name][te], sigma[te], y[te])
        log(f"probe layer {name:>5}: balanced accuracy per sigma band {probe[name]}")
    first = next(i for i, s in enumerate(SIGMA_BANDS) if s >= CHOOSE_FROM)
    score = {n: float(np.mean([a for a in acc[first:] if a is not None])) for n, acc in probe.items()}
    if layer is None:
        layer = max(score, key=score.get)
    elif layer not in layers:
        raise ConfigError(f"--layer {layer!r} is not one of {', '.join(layers)}")
    adp = fit_predictor(feats[layer][tr], sigma[tr], y[tr], K, steps=steps, seed=seed)
    acc = band_accuracy(adp, feats[layer][te], sigma[te], y[te])
    log(f"predictor on layer {layer}: balanced accuracy per sigma band {acc}")
    return {"state_dict": adp.state_dict(), "spec": adp.spec(), "layer": layer, "classes": list(COLOURS),
            "weights_hash": weights_hash(model), "sigma_bands": list(SIGMA_BANDS), "probe": probe,
            "probe_score": score, "accuracy": acc, "pairs_per_class": pairs_per_class, "seed": seed,
            "labelled_images": len(idx), "label_counts": torch.bincount(labels_t, minlength=K).tolist()}


def load_predictor(path: Path, model) -> tuple[AttributePredictor, dict]:
    """The predictor saved at `path`, checked to belong to `model`'s weights; ConfigError otherwise."""
    if not path.is_file():
        raise ConfigError(f"no predictor at {path}: run `engine/debias.py train-predictor` first")
    bundle = torch.load(path, map_location="cpu", weights_only=False)
    if bundle.get("weights_hash") != weights_hash(model):
        raise ConfigError(f"predictor {path} was trained on other weights (hash {str(bundle.get('weights_hash'))[:12]}"
                          f", these are {weights_hash(model)[:12]}): train it again on this run and checkpoint")
    adp = AttributePredictor(**bundle["spec"])
    adp.load_state_dict(bundle["state_dict"])
    return adp.to(next(model.parameters()).device).eval(), bundle
