"""The attribute distribution predictor (ADP) of distribution-guided debiasing (Parihar et al., CVPR 2024).

It reads a denoiser layer's features h (B, N, D) at noise level sigma and returns class logits (B, K). The noise
level is an input (a few sinusoids of log sigma), so one trunk serves every sampler grid and step count, where the
paper's code keeps one linear head per step of one fixed 50-step grid. Tokens are mean-pooled and layer-normed: the
gradient of the pooled feature is then one direction added to every token of a sample.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sigma_features(sigma: torch.Tensor, num: int = 8) -> torch.Tensor:
    """(B, 2 num) sin/cos of log(sigma) at octave-spaced frequencies; covers sigma from ~1e-3 to ~1e2."""
    s = sigma.float().clamp_min(1e-6).log().view(-1, 1)  # (B, 1)
    freqs = math.pi / 16 * 2.0 ** torch.arange(num, device=sigma.device).float()  # periods 32 ... 0.25 in log sigma
    return torch.cat([torch.sin(s * freqs), torch.cos(s * freqs)], dim=1)


class AttributePredictor(nn.Module):
    """logits = MLP(LayerNorm(mean_n h) ⊕ sigma features). `hidden=0` gives a linear head (the layer probe)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, sigma_dim: int = 8):
        super().__init__()
        self.dim, self.num_classes, self.hidden, self.sigma_dim = dim, num_classes, hidden, sigma_dim
        self.norm = nn.LayerNorm(dim)
        d_in = dim + 2 * sigma_dim
        self.net = nn.Linear(d_in, num_classes) if hidden == 0 else nn.Sequential(
            nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, num_classes))

    def pooled(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, D) token features -> (B, D) normalised mean; (B, D) is taken as already pooled."""
        return self.norm(h.float().mean(1) if h.dim() == 3 else h.float())

    def forward(self, h: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        z = torch.cat([self.pooled(h), sigma_features(sigma.to(h.device), self.sigma_dim)], dim=1)
        return self.net(z)  # (B, K)

    def spec(self) -> dict:
        return {"dim": self.dim, "num_classes": self.num_classes, "hidden": self.hidden, "sigma_dim": self.sigma_dim}


def fit_predictor(feats: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  hidden: int = 128, steps: int = 400, lr: float = 3e-3, batch: int = 256, seed: int = 0,
                  weight_decay: float = 1e-4) -> AttributePredictor:
    """Adam on pooled features (M, D), their sigma (M,) and class labels (M,); classes balanced by sampling each
    minibatch with probability inversely proportional to its class's frequency."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the head's init
    adp = AttributePredictor(feats.shape[1], num_classes, hidden)
    counts = torch.bincount(labels, minlength=num_classes).float()
    w = (1.0 / counts.clamp_min(1))[labels]  # (M,) inverse class frequency: balanced draws
    opt = torch.optim.Adam(adp.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        idx = torch.multinomial(w, batch, replacement=True, generator=g)
        loss = nn.functional.cross_entropy(adp(feats[idx], sigma[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return adp.eval()


@torch.no_grad()
def balanced_accuracy(adp: AttributePredictor, feats: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present of the per-class accuracy."""
    pred = adp(feats, sigma).argmax(1)
    accs = [(pred[labels == k] == k).float().mean() for k in labels.unique()]
    return float(torch.stack(accs).mean()) if accs else float("nan")
