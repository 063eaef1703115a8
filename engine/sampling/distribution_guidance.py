"""Distribution guidance (Balancing Act, Parihar et al. CVPR 2024) and the paper's per-sample baseline, as feature
edits for engine/sampling/feature_tap.py.

At each denoiser call whose sigma lies in the window, the attribute predictor reads the conditional rows' features,
the batch's predicted distribution p = mean_i softmax(logits_i / T) is compared with the target by a divergence, and
the features are moved against its gradient before the rest of the forward runs. Only the conditional rows change
(with classifier-free guidance the CFG extrapolation then carries the edit); the unconditional rows stay as they are.

Batch-size invariance: d L / d h_i carries a 1/n from the batch mean, so the step is scaled by n; each sample's push
then depends on the batch only through p. Bounded: each sample's edit is clipped to `max_ratio` times the norm of its
features (a wrong scale cannot blow up sampling). Scale 0 edits nothing: the images are the unguided ones, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.data.synthetic import COLOURS, parse_named_weights

DIVERGENCES = ("chi2", "kl")
CHI2_FLOOR = 0.01  # added to the target in chi-squared's denominator: a zero target class stays finite


def parse_target(text: str, classes: list[str] | None = None) -> torch.Tensor:
    """'uniform' or 'red=0.5,blue=0.5' (unnamed classes get 0) -> (K,) probabilities over `classes` (default: the
    palette). ValueError names an unknown class, a negative weight or a sum other than 1."""
    classes = list(COLOURS) if classes is None else classes
    if text.strip() == "uniform":
        return torch.full((len(classes),), 1.0 / len(classes))
    p = torch.zeros(len(classes))
    for name, w in parse_named_weights(text, classes, "class").items():
        p[classes.index(name)] = w
    if abs(float(p.sum()) - 1) > 1e-6:
        raise ValueError(f"the weights sum to {float(p.sum()):.4g}, not 1")
    return p


def divergence(p: torch.Tensor, target: torch.Tensor, kind: str = "chi2") -> torch.Tensor:
    """Zero-safe divergence between the batch distribution p (K,) and the target (K,).
    chi2: sum (p - t)^2 / (t + CHI2_FLOOR); kl: KL(t || p) = sum_t>0 t log(t / p) (p > 0 from the softmax)."""
    if kind == "chi2":
        return ((p - target) ** 2 / (target + CHI2_FLOOR)).sum()
    if kind == "kl":
        t = target
        return torch.where(t > 0, t * (t.clamp_min(1e-30).log() - p.clamp_min(1e-30).log()), 0.0).sum()
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")


def bounded(delta: torch.Tensor, h: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """delta (n, N, D) with each sample's norm clipped to max_ratio · ‖h_i‖."""
    dn = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    cap = max_ratio * h.flatten(1).norm(dim=1)
    return delta * (cap / dn).clamp(max=1.0).view(-1, 1, 1)


@dataclass
class _Edit:
    """What both guidance rules share: which rows, when, how far; `log` collects (sigma, loss, p) per call."""

    adp: torch.nn.Module
    scale: float
    cond_rows: int
    window: tuple[float, float] = (0.0, float("inf"))
    temperature: float = 1.0
    max_ratio: float = 0.2
    log: list = field(default_factory=list)

    def __call__(self, h: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        s = float(sigma[0])
        if self.scale == 0 or not self.window[0] <= s <= self.window[1]:
            return None
        n = self.cond_rows
        with torch.enable_grad():
            hc = h[:n].detach().float().requires_grad_(True)
            p = torch.softmax(self.adp(hc, sigma[:n]) / self.temperature, dim=1)  # (n, K)
            loss = self.loss(p)
            (grad,) = torch.autograd.grad(loss, hc)
        delta = bounded(-self.scale * self.step_factor() * grad, hc.detach(), self.max_ratio)
        self.log.append((s, float(loss.detach()), p.detach().mean(0).tolist()))
        out = h.clone()
        out[:n] = (hc.detach() + delta).to(h.dtype)
        return out

    def step_factor(self) -> float:
        return 1.0

    def loss(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class DistributionGuidance(_Edit):
    """The method: L = divergence(mean_i p_i, target); the step is n · dL/dh (batch-size invariant)."""

    target: torch.Tensor = None
    kind: str = "chi2"

    def loss(self, p: torch.Tensor) -> torch.Tensor:
        return divergence(p.mean(0), self.target.to(p.device), self.kind)

    def step_factor(self) -> float:
        return float(self.cond_rows)


@dataclass
class SampleGuidance(_Edit):
    """The paper's baseline: each sample is pushed alone toward a class drawn for it from the target,
    L = -sum_i log p_i[c_i] (log-probability, so a confident sample still gets a gradient)."""

    labels: torch.Tensor = None

    def loss(self, p: torch.Tensor) -> torch.Tensor:
        return -p.gather(1, self.labels.to(p.device).view(-1, 1)).clamp_min(1e-30).log().sum()


def draw_labels(target: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n class indices from the target: the exact quota (largest remainders), shuffled by the seed."""
    quota = (target * n).floor().long()
    rest = n - int(quota.sum())
    quota[torch.argsort(target * n - quota, descending=True)[:rest]] += 1
    labels = torch.repeat_interleave(torch.arange(len(target)), quota)
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
