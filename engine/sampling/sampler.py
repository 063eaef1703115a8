"""EDM Heun sampler (2nd order, deterministic) with classifier-free guidance."""
from __future__ import annotations

import torch

from engine.diffusion.edm import EDM


def karras_sigmas(edm: EDM, steps: int, device=None) -> torch.Tensor:
    """steps noise levels from sigma_max to sigma_min (rho schedule), then a final 0: (steps + 1,)."""
    i = torch.arange(steps, dtype=torch.float64, device=device)
    inv_rho = 1 / edm.rho
    frac = i / max(steps - 1, 1)
    sig = (edm.sigma_max**inv_rho + frac * (edm.sigma_min**inv_rho - edm.sigma_max**inv_rho)) ** edm.rho
    return torch.cat([sig, sig.new_zeros(1)])


@torch.no_grad()
def sample(
    model, edm: EDM, y: torch.Tensor, y_mask: torch.Tensor | None, steps: int = 30, cfg_scale: float = 1.0,
    generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images (B, C, H, W) for caption embeddings y (B, L, D) with mask (B, L). The unconditional branch uses the
    null caption the model was trained with (all-zero embedding, every position valid). `noise` (B, C, H, W) unit
    Gaussian: the initial noise, given (paired evaluations) or else drawn from `generator`."""
    cfg = model.cfg
    B = y.shape[0]
    x = noise.to(y.device) if noise is not None else \
        torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=generator, device=y.device)
    guided = cfg_scale != 1.0
    if guided:
        y = torch.cat([y, torch.zeros_like(y)])
        y_mask = None if y_mask is None else torch.cat([y_mask, torch.ones_like(y_mask)])  # None: nothing padded

    def denoise(x_cur: torch.Tensor, sigma: float) -> torch.Tensor:
        xin = torch.cat([x_cur, x_cur]) if guided else x_cur
        s = torch.full((xin.shape[0],), sigma, device=x_cur.device)
        d = edm.denoise(model, xin.float(), s, y, y_mask).double()
        if guided:
            cond, uncond = d.chunk(2)
            d = uncond + cfg_scale * (cond - uncond)
        return d

    sigmas = karras_sigmas(edm, steps).tolist()
    x = x.double() * sigmas[0]
    for i, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d_cur = (x - denoise(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur  # Euler step
        if s_next > 0:  # Heun correction, except into sigma = 0
            d_next = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.float()
