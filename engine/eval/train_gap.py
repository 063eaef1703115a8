"""Train gap: does a denoiser do better on the images it trained on than on new ones of the same distribution?

The first N images of the run's synthetic training set and N held-out images (the same generator and knobs, the
protocol's held-out seed) are noised with the same fixed noise (image i of either set gets unit_noise(seed, i, level))
and denoised with their own captions, without guidance. Per noise level: the mean squared error against x0 of each
set and their ratio, held-out / train. A ratio near 1 says the model has not memorised its training images, so more
of them will not help; a ratio well above 1 at a noise level says it has, there. A small training set
(`data.num_samples`) seen for many epochs is where this matters.

Like caption use it needs no sampling (one forward per image and level): cheap enough for every checkpoint.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.data.synthetic import synthetic_train_set
from engine.diffusion.nested import pool_to
from engine.eval.denoising import CHECK_SIGMAS, per_image_mse, unit_noise
from engine.eval.protocol import HELD_OUT_SEED, mean_ci


@torch.no_grad()
def train_gap(model, edm, cfg, embed, num_images: int = 256, sigmas=CHECK_SIGMAS, batch_size: int = 64,
              seed: int = 0) -> dict:
    """{"sigmas", "num_images", "seed", "train": [mean_ci of MSE per sigma], "held_out": [likewise],
    "ratio": [held-out mean / train mean per sigma]}. `embed(captions)` -> (y, y_mask) on the model's device (the
    run's text encoder and key mask: engine/training/run_folder.make_embedder)."""
    if edm.nested:
        raise ValueError("the train gap is measured on single-stream models; a nested model is not supported")
    train = synthetic_train_set(cfg)
    n = min(num_images, len(train))  # a training set smaller than asked: all of it, and as many held-out images
    sets = {"train": train, "held_out": synthetic_train_set(cfg, seed=HELD_OUT_SEED)}
    device = next(model.parameters()).device
    size = edm.stream_sizes(cfg.data.image_size)[-1]  # a model trained on pooled data is checked on pooled images
    was_training = model.training
    model.eval()
    mse = {name: np.zeros((len(sigmas), n)) for name in sets}
    for lo in range(0, n, batch_size):
        idx = list(range(lo, min(n, lo + batch_size)))
        batches = {name: (pool_to(ds.images(idx), size).to(device), *embed(ds.captions(idx)))
                   for name, ds in sets.items()}
        channels = batches["train"][0].shape[1]
        for j, s in enumerate(sigmas):
            noise = torch.stack([unit_noise(seed, i, j, size, channels) for i in idx]).to(device)
            sigma = torch.full((len(idx),), float(s), device=device)
            for name, (x0, y, y_mask) in batches.items():  # both sets get the same noise
                mse[name][j, idx] = per_image_mse(model, edm, x0, x0 + s * noise, sigma, y, y_mask).numpy()
    model.train(was_training)
    return {"sigmas": [float(s) for s in sigmas], "num_images": n, "seed": seed,
            "train": [mean_ci(m.tolist()) for m in mse["train"]],
            "held_out": [mean_ci(m.tolist()) for m in mse["held_out"]],
            "ratio": [float(h.mean() / max(t.mean(), 1e-12)) for h, t in zip(mse["held_out"], mse["train"])]}


def train_gap_table(result: dict) -> str:
    """A small text table: MSE of each set and their ratio per noise level."""
    head = "train gap  " + " ".join(f"s={s:<6g}" for s in result["sigmas"])
    rows = [f"{name:<10} " + " ".join(f"{c['mean']:<8.4f}" for c in result[name]) for name in ("train", "held_out")]
    rows.append(f"{'ratio':<10} " + " ".join(f"{r:<8.3f}" for r in result["ratio"]) +
                f"  ({result['num_images']} images each)")
    return "\n".join([head, *rows])
