"""Held-out denoising loss: how well a model's D(x; sigma) recovers held-out synthetic images, per noise level.

Unlike the training loss it depends neither on the prediction target nor on the loss weighting (it is measured on D
in x space), nor on the step's random draws: the images are the held-out prompt set's own (SyntheticShapes with the
held-out seed), conditioned on their captions without guidance, and image i's noise at noise level j is fixed by
(seed, i, j). So runs with different targets, weightings, patch sizes, split experts or nested streams are compared
on identical inputs. A nested model is given every stream's noisy input and judged on its highest stream; a model of
pooled data on the pooled images (the record names the resolution).

Summary: `edm_weighted`, the mean over noise levels at the log-normal's quantiles (the training distribution of
sigma) of EDM's lambda(sigma) times the MSE: the EDM training loss of a network, estimated on held-out data.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from engine.eval.protocol import HELD_OUT_SEED, mean_ci
from engine.training.seeding import derive_seed


def lognormal_quantiles(p_mean: float, p_std: float, count: int) -> list[float]:
    """Noise levels at the (k + 0.5) / count quantiles of the log-normal (p_mean, p_std)."""
    q = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return (torch.special.ndtri(q) * p_std + p_mean).exp().tolist()


@torch.no_grad()
def heldout_denoising_loss(model, edm, cfg, encoder, num_images: int = 128, num_sigmas: int = 12,
                           batch_size: int = 64, seed: int = 0) -> dict:
    """Per noise level: MSE of D against x0 over held-out images (mean with a bootstrap CI), and the summary."""
    from engine.data.synthetic import SyntheticShapes
    from engine.data.train_data import key_padding_mask
    from engine.diffusion.nested import initial_state, pool_to, shifts
    from engine.eval.protocol import synthetic_prompt_set
    from engine.sampling.experts import ExpertSwitch

    device = next(model.parameters()).device
    sizes = edm.stream_sizes(cfg.data.image_size)
    ds = SyntheticShapes(num_images, cfg.data.image_size, HELD_OUT_SEED, cfg.data.backgrounds)
    prompts = synthetic_prompt_set(num_images, cfg.data.image_size, HELD_OUT_SEED, backgrounds=cfg.data.backgrounds)
    sigmas = lognormal_quantiles(cfg.diffusion.p_mean, cfg.diffusion.p_std, num_sigmas)
    was_training = model.training
    model.eval()
    per_sigma = []
    for j, s in enumerate(sigmas):
        net = model.at(s) if isinstance(model, ExpertSwitch) else model
        errors = []
        for lo in range(0, num_images, batch_size):
            idx = range(lo, min(num_images, lo + batch_size))
            x0 = ds.images(idx).to(device)
            y, y_mask = encoder.encode(prompts.prompts[lo:lo + len(idx)])
            y, y_mask = y.to(device), key_padding_mask(cfg, y_mask)
            y_mask = None if y_mask is None else y_mask.to(device)
            noise = [torch.stack([unit_noise(seed, i, j, r, x0.shape[1]) for i in idx]).to(device) for r in sizes]
            sigma = torch.full((len(idx),), s, device=device)
            target = pool_to(x0, sizes[-1])
            if edm.nested:
                x = initial_state(edm, noise) * s + torch.cat([pool_to(x0, r).flatten(1) for r in sizes], dim=1)
                d = edm.denoise(net, x, sigma, y, y_mask)[:, -target[0].numel():].view_as(target)
            else:
                d = edm.denoise(net, target + s * noise[-1], sigma, y, y_mask)
            errors.append(((d.float() - target) ** 2).flatten(1).mean(1).cpu())
        per_sigma.append(torch.cat(errors).numpy())
    model.train(was_training)
    lam = [(s**2 + cfg.diffusion.sigma_data**2) / (s * cfg.diffusion.sigma_data) ** 2 for s in sigmas]
    weighted = np.stack([w * e for w, e in zip(lam, per_sigma)]).mean(0)  # (N,): each image's EDM loss
    return {"sigmas": sigmas, "mse": [mean_ci(e.tolist()) for e in per_sigma], "edm_weighted": mean_ci(weighted),
            "resolution": sizes[-1], "num_images": num_images, "sigma_data": cfg.diffusion.sigma_data,
            "shifts": shifts(edm) if edm.nested else [1.0]}


# Noise levels of the denoising checks that compare two conditions image by image (caption use, train gap): from
# where samples keep their layout (0.25) to where it is decided (4-8).
CHECK_SIGMAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def per_image_mse(model, edm, x0, noisy, sigma, y, y_mask) -> torch.Tensor:
    """(B,) MSE of D(noisy; sigma) against x0 per image, on the CPU. All images share one noise level; a split run
    (ExpertSwitch) answers with that level's expert."""
    from engine.sampling.experts import ExpertSwitch

    net = model.at(float(sigma[0])) if isinstance(model, ExpertSwitch) else model
    d = edm.denoise(net, noisy, sigma, y, y_mask)
    return ((d.float() - x0) ** 2).flatten(1).mean(1).cpu()


def unit_noise(seed: int, image: int, level: int, size: int, channels: int) -> torch.Tensor:
    """Image `image`'s unit noise at noise level `level` for a stream of side `size`: fixed by those numbers."""
    g = torch.Generator().manual_seed(derive_seed(seed, "heldout-denoising", image, level, size))
    return torch.randn(channels, size, size, generator=g)


def weighted_loss_between(result: dict, lo: float | None, hi: float | None) -> float:
    """The mean of lambda · MSE over the noise levels of `result` in [lo, hi) (None: unbounded)."""
    sd = result["sigma_data"]
    vals = [(s**2 + sd**2) / (s * sd) ** 2 * m["mean"] for s, m in zip(result["sigmas"], result["mse"])
            if (lo is None or s >= lo) and (hi is None or s < hi)]
    return float(np.mean(vals)) if vals else math.nan
