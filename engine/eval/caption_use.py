"""Caption use: how much a denoiser relies on each attribute of its caption, per noise level.

Held-out images (the protocol's SyntheticShapes held-out seed) are noised with fixed noise and denoised without
guidance twice: with their own caption, and with one attribute of it changed in every group (colour -> the next
palette colour, shape -> the next shape, count -> the next count, relation -> the other relation; two-group images
only for the relation). The ratio of the two mean squared errors against x0 says how much the model uses that
attribute at that noise level: 1.0 = it ignores the word, larger = the wrong word costs it. A model that renders
colours right but ignores shape words shows it here long before the detector's shape score moves.

It needs no sampling (two forwards per image and level), so it is cheap enough to run at every checkpoint.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from engine.data.synthetic import COLOURS, MAX_COUNT, RELATIONS, SHAPES, SyntheticShapes, caption_of
from engine.diffusion.nested import pool_to
from engine.eval.denoising import CHECK_SIGMAS, per_image_mse, unit_noise
from engine.eval.protocol import HELD_OUT_SEED, mean_ci

ATTRIBUTES = ("colour", "shape", "count", "relation")


def _next(values, value):
    values = list(values)
    return values[(values.index(value) + 1) % len(values)]


def changed_facts(facts: dict, attribute: str) -> dict | None:
    """describe()'s facts with `attribute` changed in every group; None when the caption has no such attribute
    (relation of a one-group image)."""
    out = copy.deepcopy(facts)
    if attribute == "relation":
        if out["relation"] is None:
            return None
        out["relation"] = _next(RELATIONS, out["relation"])
        return out
    for group in out["groups"]:
        if attribute == "colour":
            group["colour"] = _next(COLOURS, group["colour"])
        elif attribute == "shape":
            group["shape"] = _next(SHAPES, group["shape"])
        elif attribute == "count":
            group["count"] = group["count"] % MAX_COUNT + 1
        else:
            raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    return out


@torch.no_grad()
def caption_use(model, edm, cfg, embed, num_images: int = 128, sigmas=CHECK_SIGMAS, batch_size: int = 64,
                seed: int = 0) -> dict:
    """{"sigmas", "num_images", "attributes": {attribute: {"ratio": [mean_ci of per-image MSE ratio per sigma],
    "images": n}}, "mse": [mean_ci of the true caption's MSE per sigma]}. A ratio is the per-image mean over images
    of MSE(changed caption) / MSE(own caption); each image keeps its noise across captions (fixed by seed, image,
    level), so the ratio measures the caption alone. `embed(captions)` -> (y, y_mask) on the model's device (the
    run's text encoder and key mask: engine/training/run_folder.embed_captions); called once, with every distinct
    caption."""
    if edm.nested:
        raise ValueError("caption use is measured on single-stream models; a nested model is not supported")
    device = next(model.parameters()).device
    size = edm.stream_sizes(cfg.data.image_size)[-1]  # a model trained on pooled data is checked on pooled images
    ds = SyntheticShapes(num_images, cfg.data.image_size, HELD_OUT_SEED, cfg.data.backgrounds)
    facts = [ds.describe(i) for i in range(num_images)]
    own = [caption_of(f) for f in facts]
    was_training = model.training
    model.eval()

    # every caption, own and changed, embedded in one call (the text encoder is loaded once)
    alts = {a: [changed_facts(f, a) for f in facts] for a in ATTRIBUTES}
    texts = own + [caption_of(f) for a in ATTRIBUTES for f in alts[a] if f is not None]
    distinct = list(dict.fromkeys(texts))
    row = {t: k for k, t in enumerate(distinct)}
    y_all, mask_all = embed(distinct)

    def mse(x0, noisy, sigma, captions):
        rows = torch.tensor([row[t] for t in captions], device=y_all.device)
        y_mask = None if mask_all is None else mask_all[rows]
        return per_image_mse(model, edm, x0, noisy, sigma, y_all[rows], y_mask)

    own_mse = np.zeros((len(sigmas), num_images))
    changed = {a: np.full((len(sigmas), num_images), np.nan) for a in ATTRIBUTES}
    for lo in range(0, num_images, batch_size):
        idx = list(range(lo, min(num_images, lo + batch_size)))
        x0 = pool_to(ds.images(idx), size).to(device)
        for j, s in enumerate(sigmas):
            noise = torch.stack([unit_noise(seed, i, j, size, x0.shape[1]) for i in idx]).to(device)
            noisy, sigma = x0 + s * noise, torch.full((len(idx),), float(s), device=device)
            own_mse[j, idx] = mse(x0, noisy, sigma, [own[i] for i in idx]).numpy()
            for a in ATTRIBUTES:
                keep = [k for k, i in enumerate(idx) if alts[a][i] is not None]
                if keep:
                    err = mse(x0[keep], noisy[keep], sigma[keep], [caption_of(alts[a][idx[k]]) for k in keep])
                    changed[a][j, [idx[k] for k in keep]] = err.numpy()
    model.train(was_training)
    attributes = {}
    for a in ATTRIBUTES:
        rows = ~np.isnan(changed[a][0])
        ratios = changed[a][:, rows] / np.maximum(own_mse[:, rows], 1e-12)
        attributes[a] = {"images": int(rows.sum()),
                         "ratio": [mean_ci(r.tolist()) if rows.any() else None for r in ratios]}
    return {"sigmas": [float(s) for s in sigmas], "num_images": num_images, "seed": seed,
            "mse": [mean_ci(m.tolist()) for m in own_mse], "attributes": attributes}


def caption_use_table(result: dict) -> str:
    """A small text table: the held-out MSE with the own captions, then one row per attribute with the mean ratio,
    per noise level."""
    head = "attribute  " + " ".join(f"s={s:<6g}" for s in result["sigmas"])
    rows = [head, f"{'MSE':<10} " + " ".join(f"{c['mean']:<8.4f}" for c in result["mse"])]
    for a, r in result["attributes"].items():
        cells = [f"{c['mean']:<8.3f}" if c else f"{'-':<8}" for c in r["ratio"]]
        rows.append(f"{a:<10} " + " ".join(cells) + f"  ({r['images']} images)")
    return "\n".join(rows)
