"""EDM (Karras et al. 2022) as MicroDiT trains it: log-normal sigma, preconditioned denoiser, per-patch loss on the
patches kept by deferred masking, and the randomness of a step drawn as a pure function of (seed, step)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.training.seeding import derive_seed
from models.flops import kept_tokens


@dataclass(frozen=True)
class EDM:
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def precondition(self, sigma: torch.Tensor):
        """c_skip, c_out, c_in, c_noise for sigma of shape (B,); the first three broadcast over (B, ...)."""
        sd2, s2 = self.sigma_data**2, sigma**2
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (s2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise_tokens(self, model, x_noisy, sigma, y, y_mask, keep_idx=None):
        """D(x; sigma) on the kept tokens: returns (B, K, p²·C) denoised patch values."""
        c_skip, c_out, c_in, c_noise = self.precondition(sigma)
        f = model(x_noisy * c_in.view(-1, 1, 1, 1), c_noise, y, y_mask, keep_idx)  # (B, K, P)
        skip = model.patchify(x_noisy)  # (B, N, P)
        if keep_idx is not None:
            skip = model.gather_fn(skip, keep_idx)  # (B, K, P)
        return c_skip.view(-1, 1, 1) * skip + c_out.view(-1, 1, 1) * f.float()

    def denoise(self, model, x_noisy, sigma, y, y_mask):
        """D(x; sigma) as an image (B, C, H, W) (no masking: sampling needs every patch)."""
        return model.unpatchify(self.denoise_tokens(model, x_noisy, sigma, y, y_mask))

    def loss(self, model, x0, y, y_mask, noise: "StepNoise") -> torch.Tensor:
        """Weighted squared error averaged over every value of every kept patch (= mean of per-patch losses)."""
        sigma = noise.sigma
        x_noisy = x0 + noise.noise * sigma.view(-1, 1, 1, 1)
        denoised = self.denoise_tokens(model, x_noisy, sigma, y, y_mask, noise.keep_idx)  # (B, K, P)
        target = model.patchify(x0)
        if noise.keep_idx is not None:
            target = model.gather_fn(target, noise.keep_idx)  # loss only on kept patches
        err = (denoised - target.float()) ** 2
        return (self.loss_weight(sigma).view(-1, 1, 1) * err).mean()


@dataclass
class StepNoise:
    """All randomness of one step's (micro-)batch: noise levels, noise, kept tokens, caption drop decisions."""

    sigma: torch.Tensor  # (B,)
    noise: torch.Tensor  # (B, C, H, W)
    keep_idx: torch.Tensor | None  # (B, K) sorted token indices, None when nothing is masked
    drop_caption: torch.Tensor  # (B,) bool

    def slice(self, lo: int, hi: int) -> "StepNoise":
        keep = None if self.keep_idx is None else self.keep_idx[lo:hi]
        return StepNoise(self.sigma[lo:hi], self.noise[lo:hi], keep, self.drop_caption[lo:hi])


def draw_step_noise(
    edm: EDM, seed: int, step: int, batch: int, shape: tuple[int, int, int], num_tokens: int,
    mask_ratio: float, caption_dropout: float, device: torch.device,
) -> StepNoise:
    """Randomness of a whole global batch as a pure function of (seed, step), drawn on `device` (no host sync).
    Every process draws the same global tensors and takes its slice, so any world size sees the same numbers
    and a resumed run continues exactly."""
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, step, "edm"))
    sigma = (torch.randn(batch, generator=gen, device=device) * edm.p_std + edm.p_mean).exp()
    noise = torch.randn(batch, *shape, generator=gen, device=device)
    keep = kept_tokens(num_tokens, mask_ratio)
    keep_idx = None
    if keep < num_tokens:
        scores = torch.rand(batch, num_tokens, generator=gen, device=device)
        keep_idx = scores.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, K): exactly K distinct tokens each
    drop = torch.rand(batch, generator=gen, device=device) < caption_dropout
    return StepNoise(sigma, noise, keep_idx, drop)
