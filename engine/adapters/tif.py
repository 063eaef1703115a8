"""The TiF few-shot learner (Yue et al., CVPR 2024) on a trained Tessera model, and its baselines.

Training: one LoRA per class (engine/adapters/lora.py), all classes in one loop with every sample routed to its
class's adapter, each class captioned by a rare token ("a sks object"), with prior preservation: ordinary synthetic
samples with their own captions, routed to the adapters in turn, keep each adapter from forgetting the base model.

Classification: a test image x0 is noised at a grid of sigmas with ONE noise draw per sigma shared by all classes;
each class's error e_c(sigma) = ||x0 - D_c(x0 + sigma eps; sigma)||^2 / sigma^2 (TiF's epsilon error in EDM terms) and
the score -sum_j w(sigma_j) e_c(sigma_j). TiF's weight, recomputed for sigma (the official code evaluates it on
another noise schedule than its model's and lets erfc underflow to exact zeros at small t):
    w(sigma) = erfc(d / (2 sqrt2 sigma)) / sum_{j=0..J} erfc((d + delta j) / (2 sqrt2 sigma)),
computed in log space (log erfc via log_ndtr), with d the smallest between-class distance of the shots (their 10th
percentile, L2 over pixels): w -> 1 where the noise is too small to hide a class difference of size d and falls as
the coarse, larger differences (d + delta j, here the nuisance) stop being distinguishable either.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from engine.adapters.fewshot_task import FewShotTask
from engine.adapters.lora import LoRA
from engine.config import ConfigError
from engine.diffusion.edm import EDM

RARE_TOKENS = ("sks", "hta", "qzv", "kpw")


def class_captions(n: int) -> list[str]:
    return [f"a {RARE_TOKENS[c]} object" for c in range(n)]


def train_class_loras(model, edm: EDM, task: FewShotTask, embed, prior, rank: int = 4, steps: int = 150,
                      lr: float = 3e-3, prior_batch: int = 8, seed: int = 0) -> LoRA:
    """One adapter per class, trained together; `prior` = (images, captions) of ordinary samples."""
    C = len(task.classes)
    lora = LoRA(model, num_adapters=C, rank=rank, seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(lora.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    y_cls, m_cls = embed(class_captions(C))
    prior_x, prior_caps = prior
    y_pri, m_pri = embed(prior_caps)
    for step in range(steps):
        x = task.shots.clone()
        flip = torch.rand(len(x), generator=g) < 0.5  # augmentation: horizontal flips keep every class's shape class
        x[flip] = x[flip].flip(-1)
        pick = torch.randint(len(prior_x), (prior_batch,), generator=g)
        x0 = torch.cat([x, prior_x[pick]]).to(device)
        y = torch.cat([y_cls[task.shot_labels], y_pri[pick]])
        mask = None if m_cls is None else torch.cat([m_cls[task.shot_labels], m_pri[pick]])
        idx = torch.cat([task.shot_labels, torch.arange(prior_batch) % C]).to(device)
        sigma = (torch.randn(len(x0), generator=g) * edm.p_std + edm.p_mean).exp().to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        with lora.attach(model, idx):
            d = edm.denoise(model, x0 + noise * sigma.view(-1, 1, 1, 1), sigma, y, mask)
        loss = (edm.loss_weight(sigma).view(-1, 1, 1, 1) * (d - x0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return lora


def log_erfc(z: torch.Tensor) -> torch.Tensor:
    """log erfc(z) without underflow: erfc(z) = 2 Phi(-z sqrt2)."""
    return math.log(2.0) + torch.special.log_ndtr(-z * math.sqrt(2.0))


def tif_weights(sigmas: torch.Tensor, d: float, delta: float, J: int) -> torch.Tensor:
    """TiF's weight per sigma (see the module doc), in (0, 1], never exactly 0 by underflow."""
    s = sigmas.double().view(-1, 1)
    z = (d + delta * torch.arange(J + 1, dtype=torch.float64)).view(1, -1) / (2 * math.sqrt(2) * s)  # (S, J+1)
    le = log_erfc(z)
    return torch.exp(le[:, 0] - torch.logsumexp(le, dim=1)).float()


def weights(kind: str, sigmas: torch.Tensor, d: float, delta: float, J: int) -> torch.Tensor:
    """tif | uniform | window:a,b (weight 1 for sigma in [a, b], else 0)."""
    if kind == "tif":
        return tif_weights(sigmas, d, delta, J)
    if kind == "uniform":
        return torch.ones_like(sigmas)
    if kind.startswith("window:"):
        try:
            a, b = (float(v) for v in kind[7:].split(","))
        except ValueError:
            raise ConfigError(f"--weighting {kind!r}: a window is window:a,b (two sigmas)") from None
        w = ((sigmas >= a) & (sigmas <= b)).float()
        if not w.any():
            raise ConfigError(f"--weighting {kind!r}: no sigma of the grid lies in the window")
        return w
    raise ConfigError(f"--weighting {kind!r} must be tif, uniform or window:a,b")


def class_distance(task: FewShotTask, q: float = 0.1) -> float:
    """The q-quantile of L2 distances between shots of different classes: TiF's d."""
    x = task.shots.flatten(1)
    dist = torch.cdist(x, x)
    other = task.shot_labels.view(-1, 1) != task.shot_labels.view(1, -1)
    return float(torch.quantile(dist[other], q))


@torch.no_grad()
def class_errors(model, edm: EDM, lora: LoRA, images: torch.Tensor, embed, sigmas: torch.Tensor, seed: int,
                 batch_images: int = 8) -> torch.Tensor:
    """(n, C, S) errors ||x0 - D_c(x0 + sigma eps)||^2 / sigma^2 (mean over pixels), eps shared by the classes."""
    C = lora.num_adapters
    S = len(sigmas)
    device = next(model.parameters()).device
    y_cls, m_cls = embed(class_captions(C))
    out = []
    for lo in range(0, len(images), batch_images):
        x0 = images[lo:lo + batch_images].to(device)
        n = len(x0)
        g = torch.Generator().manual_seed(seed * 1_000_003 + lo)
        eps = torch.randn(n, 1, S, *x0.shape[1:], generator=g).to(device)  # one draw per (image, sigma), all classes
        x = x0.view(n, 1, 1, *x0.shape[1:]) + eps * sigmas.view(1, 1, S, 1, 1, 1).to(device)
        x = x.expand(n, C, S, *x0.shape[1:]).reshape(n * C * S, *x0.shape[1:])
        cls = torch.arange(C, device=device).view(1, C, 1).expand(n, C, S).reshape(-1)
        sig = sigmas.to(device).view(1, 1, S).expand(n, C, S).reshape(-1)
        with lora.attach(model, cls):
            d = edm.denoise(model, x, sig, y_cls[cls], None if m_cls is None else m_cls[cls])
        err = ((d.view(n, C, S, -1) - x0.view(n, 1, 1, -1)) ** 2).mean(-1) / sigmas.view(1, 1, S).to(device) ** 2
        out.append(err.cpu())
    return torch.cat(out)


def classify(errors: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Predicted class per image from (n, C, S) errors and weights (S,)."""
    return (errors * w.view(1, 1, -1)).sum(-1).argmin(1)


def margin_by_sigma(errors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(S,) mean over images of e_correct - min e_wrong: negative where the noise level votes for the right class."""
    n, C, S = errors.shape
    right = errors[torch.arange(n), labels]  # (n, S)
    wrong = errors.masked_fill(torch.nn.functional.one_hot(labels, C).bool().unsqueeze(-1), float("inf")).min(1).values
    return (right - wrong).mean(0)


# ---------------------------------------------------------------- baselines

def pixel_nn(task: FewShotTask, images: torch.Tensor) -> torch.Tensor:
    return task.shot_labels[torch.cdist(images.flatten(1), task.shots.flatten(1)).argmin(1)]


@torch.no_grad()
def frozen_features(model, edm: EDM, images: torch.Tensor, embed, sigma: float = 0.05, layer: int | None = None):
    """Mean-pooled mid-backbone tokens of the frozen model at a small sigma, neutral caption, no noise."""
    from engine.sampling.feature_tap import FeatureTap

    name = str(len(model.blocks) // 2 - 1 if layer is None else layer)
    device = next(model.parameters()).device
    y, m = embed(["an object"] * len(images))
    with FeatureTap(model, [name]) as tap:
        edm.denoise(model, images.to(device), torch.full((len(images),), sigma, device=device), y, m)
        return tap.features[name].float().mean(1).cpu()


def nearest_class_mean(train_f: torch.Tensor, labels: torch.Tensor, test_f: torch.Tensor) -> torch.Tensor:
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6) if len(train_f) > 1 else 1.0
    tr, te = (train_f - mu) / sd, (test_f - mu) / sd
    means = torch.stack([tr[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    return torch.cdist(te, means).argmin(1)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean())


def seed_ci(values: list[float]) -> dict:
    """Mean over seeds with a t-interval (95%)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return {"mean": float(v.mean()), "ci": None, "per_seed": v.round(4).tolist()}
    t = {2: 12.71, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(v), 2.0)
    h = t * v.std(ddof=1) / math.sqrt(len(v))
    return {"mean": float(v.mean()), "ci": [float(v.mean() - h), float(v.mean() + h)], "per_seed": v.round(4).tolist()}
