"""Training the attribute distribution predictor of a trained run (engine/debias.py train-predictor).

Pseudo-labels as in the paper: the procedural detector reads each training image's colour (images whose objects all
share one colour; the label is that colour). Features come from the run's EMA model with the caption's colour words
removed, as the colour-free prompts are at sampling, at one of three kinds of noisy input:
  trajectory (the paper's Stable Diffusion recipe) the run's own sampler (Heun on its grid, its CFG) driven by
             colour-named prompts ("a blue circle", each colour equally often) from fresh noise; at every call the
             colour-free caption's features of the same state are recorded, and the detector's reading of the final
             image is the label, so the states are exactly those sampling meets. Needs a model that obeys colour
             words: a colour that never comes out is an error;
  inverted   (the paper's CelebA recipe) each dataset image run backwards along the guided ODE (Euler on the
             sampling grid). Measured: at high sigma its states are not distributed like fresh noise, and a predictor
             trained on them misreads real sampling states;
  noised     (default) x0 + sigma * noise at a log-uniform sigma: cheap and always available, but the colour is
             unreadable there above sigma ~ 5, so guidance can act only below that.
Classes are balanced by taking the same number of images (or pairs) per class, and by class-balanced minibatches.
A linear probe over layers x sigma bands picks the layer (best mean balanced accuracy over the bands from sigma 0.3
up, where guidance can still change the outcome); then the predictor (an MLP with sigma as input) is fitted there.
The file records a hash of the weights it was trained on: sampling checks it.
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


@torch.no_grad()
def extract_inverted(model, edm: EDM, cfg, embed, images: torch.Tensor, captions: list[str], layers: list[str],
                     batch: int = 64) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Pooled features (M * S, D) per layer along the Euler inversion of each image on the run's Karras grid with its
    CFG scale, their sigma (M * S,) and image row (M * S,). Features are those of the conditional rows."""
    from engine.sampling.sampler import guided_denoiser, karras_sigmas

    device = next(model.parameters()).device
    sig = karras_sigmas(edm, cfg.sample.steps).tolist()[:-1][::-1]  # ascending sigma_min ... sigma_max
    out: dict[str, list] = {k: [] for k in layers}
    sigmas, rows = [], []
    with FeatureTap(model, layers) as tap:
        for lo in range(0, len(images), batch):
            x = images[lo:lo + batch].to(device).double()
            n = len(x)
            y, y_mask = embed(captions[lo:lo + batch])
            denoise = guided_denoiser(model, edm, y, y_mask, cfg.sample.cfg_scale)
            for i, s in enumerate(sig):
                d = denoise(x, s)  # also fills tap.features at (x, s)
                for k in layers:
                    out[k].append(tap.features[k][:n].float().mean(1).cpu())
                sigmas.append(torch.full((n,), s))
                rows.append(torch.arange(lo, lo + n))
                if i + 1 < len(sig):
                    x = x + (sig[i + 1] - s) * (x - d) / s  # Euler step up the probability-flow ODE
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(sigmas).float(), torch.cat(rows)


@torch.no_grad()
def extract_trajectories(model, edm: EDM, cfg, embed, per_class: int, layers: list[str], seed: int,
                         batch: int = 64) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled colour-free features (T, D) per layer along sampling trajectories of colour-named prompts, their sigma
    (T,), trajectory row (T,) and, per trajectory, the detector's dominant colour of the final image (-1: none)."""
    from engine.data.synthetic import SHAPES
    from engine.eval.attributes import read_images
    from engine.eval.protocol import paired_noise
    from engine.sampling.sampler import karras_sigmas
    from engine.sampling.solvers import heun

    device = next(model.parameters()).device
    names = list(COLOURS)
    named = [f"a {names[i % len(names)]} {SHAPES[(i // len(names)) % len(SHAPES)]}"
             for i in range(per_class * len(names))]
    free = [f"a {SHAPES[(i // len(names)) % len(SHAPES)]}" for i in range(len(named))]
    sig = karras_sigmas(edm, cfg.sample.steps).tolist()
    shape = (model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
    out: dict[str, list] = {k: [] for k in layers}
    sigmas, rows, final = [], [], []
    with FeatureTap(model, layers) as tap:
        for lo in range(0, len(named), batch):
            yn, mn = embed(named[lo:lo + batch])
            yf, mf = embed(free[lo:lo + batch])
            n = len(yn)
            y = torch.cat([yn, yf, torch.zeros_like(yn)])
            mask = None if mn is None else torch.cat([mn, mf, torch.ones_like(mn)])

            def denoise(x, s):  # [named cond; free cond (recorded only); uncond] in one call
                d = edm.denoise(model, torch.cat([x, x, x]).float(), torch.full((3 * n,), s, device=device), y, mask)
                for k in layers:
                    out[k].append(tap.features[k][n:2 * n].float().mean(1).cpu())
                sigmas.append(torch.full((n,), s))
                rows.append(torch.arange(lo, lo + n))
                c, _, u = d.double().chunk(3)
                return u + cfg.sample.cfg_scale * (c - u)

            x = paired_noise(seed, lo, n, shape, device).double() * sig[0]
            final.append(heun(denoise, x, sig).float().cpu())
    reads = read_images(torch.cat(final), free)
    labels = torch.tensor([-1 if r["colour"] is None else names.index(r["colour"]) for r in reads])
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(sigmas).float(), torch.cat(rows), labels


def band_accuracy(adp, feats, sigma, labels) -> list[float]:
    """Balanced accuracy per SIGMA_BANDS band."""
    accs = []
    for lo, hi in zip(SIGMA_BANDS, SIGMA_BANDS[1:]):
        m = (sigma >= lo) & (sigma < hi)
        accs.append(round(balanced_accuracy(adp, feats[m], sigma[m], labels[m]), 4) if m.any() else None)
    return accs


def train_predictor(cfg, model, embed, per_class: int = 64, seed: int = 0, layer: str | None = None,
                    steps: int = 600, features: str = "noised", log=print) -> dict:
    """Probe every layer, fit the predictor on the chosen (or given) layer; returns the bundle to save. `per_class`:
    trajectories per colour (a fifth of them held out), or dataset images (inverted) or (image, sigma) pairs (noised)
    per colour plus a quarter as many from other images held out. Accuracies are on the held-out part."""
    K = len(COLOURS)
    g = torch.Generator().manual_seed(seed)
    edm = EDM.from_config(cfg.diffusion)
    layers = layer_names(model)
    if features == "trajectory":
        feats, sigma, rows, traj_labels = extract_trajectories(model, edm, cfg, embed, per_class, layers, seed)
        counts = torch.bincount(traj_labels[traj_labels >= 0], minlength=K)
        log(f"trajectories: final colours {dict(zip(COLOURS, counts.tolist()))}, "
            f"{int((traj_labels < 0).sum())} without a detection (left out)")
        perm = torch.randperm(len(traj_labels), generator=g)
        traj_part = torch.zeros(len(traj_labels), dtype=torch.long)
        traj_part[perm[: len(perm) // 5]] = 1  # a fifth of the trajectories held out
        traj_part[traj_labels < 0] = 2
        y, part = traj_labels[rows].clamp_min(0), traj_part[rows]
    else:
        y, part, feats, sigma = _dataset_features(cfg, model, edm, embed, per_class, features, layers, g, seed)
    tr, te = part == 0, part == 1
    if any(not (y[tr] == k).any() for k in range(K)):
        raise ConfigError(f"some colour never came out of the run's sampler: {torch.bincount(y[tr], minlength=K)}")
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
            "weights_hash": weights_hash(model), "features": features, "sigma_bands": list(SIGMA_BANDS),
            "probe": probe, "probe_score": score, "accuracy": acc, "per_class": per_class, "seed": seed,
            "label_counts": torch.bincount(y[part < 2], minlength=K).tolist()}


def _dataset_features(cfg, model, edm, embed, per_class, features, layers, g, seed):
    """(labels, split 0 train / 1 test, features, sigma) from dataset images, inverted or noised."""
    idx, labels, caps = labelled_images(cfg)
    labels_t = torch.tensor(labels)
    K = len(COLOURS)
    missing = [c for k, c in enumerate(COLOURS) if not (labels_t == k).any()]
    if missing:
        raise ConfigError(f"the run's training images have no single-colour image of {missing}: nothing to learn from")
    ds = synthetic_train_set(cfg)
    chosen, split = [], []  # per class: images split 80/20 into train/test, drawn with replacement if short
    for k in range(K):
        mine = torch.nonzero(labels_t == k).flatten()
        mine = mine[torch.randperm(len(mine), generator=g)]
        cut = max(1, int(0.8 * len(mine)))
        test_pool = mine[cut:] if len(mine) > cut else mine[:cut]
        for part, pool, m in ((0, mine[:cut], per_class), (1, test_pool, max(1, per_class // 4))):
            pick = pool[:m] if len(pool) >= m else pool[torch.randint(len(pool), (m,), generator=g)]
            chosen += pick.tolist()
            split += [part] * m
    chosen_t, split_t = torch.tensor(chosen), torch.tensor(split)
    images, captions = ds.images([idx[c] for c in chosen]), [caps[c] for c in chosen]
    if features == "inverted":
        feats, sigma, rows = extract_inverted(model, edm, cfg, embed, images, captions, layers)
    elif features == "noised":
        lo, hi = np.log(SIGMA_BANDS[0]), np.log(SIGMA_BANDS[-1])
        sigma = (torch.rand(len(chosen), generator=g) * (hi - lo) + lo).exp()
        feats = extract(model, edm, cfg, embed, images, captions, sigma, layers, seed + 1)
        rows = torch.arange(len(chosen))
    else:
        raise ConfigError(f"--features {features!r} must be 'trajectory', 'inverted' or 'noised'")
    return labels_t[chosen_t][rows], split_t[rows], feats, sigma


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
