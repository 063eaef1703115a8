"""Several resolutions of one image (Matryoshka Diffusion, Gu et al. 2024, in EDM form).

Each resolution r of diffusion.resolutions is the data average-pooled to r × r. Training draws one noise level sigma
for the lowest resolution; resolution r sees sigma_r = sigma · s_r^(p/2), s_r = r / r_lowest, p =
diffusion.schedule_shift_power (MDM's SNR_r = SNR / s_r^p with SNR = 1 / sigma²: pooling s × s pixels averages their
noise down by s, so p = 2 keeps a pooled high resolution as noisy as the low one). Each resolution gets fresh,
independent noise (pooled noise would tie the streams together: MDM's code draws it fresh too). Each stream is
preconditioned with its own sigma_r; the network's time embedding is that of the shared sigma. The loss is
sum_r w_r · (the stream's weighted error, mean over its values).

Sampling runs any solver on the shared sigma: with sigma_r = k_r · sigma every stream's probability-flow ODE reads
dx_r / dsigma = (x_r - D_r) / sigma, so the streams, packed into one state (B, D) with stream r started from
k_r · sigma_max · n_r, move together under the single-stream solvers unchanged. The image is the highest stream.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.diffusion.noise import StepNoise

if TYPE_CHECKING:
    from engine.diffusion.edm import EDM


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, H) average-pooled to (B, C, size, size); H must be a multiple of size."""
    return x if x.shape[-1] == size else F.avg_pool2d(x, x.shape[-1] // size)


def shifts(edm: "EDM") -> list[float]:
    """k_r = (r / r_lowest)^(p/2) of each resolution, low to high: sigma_r = k_r · sigma."""
    base = edm.resolutions[0]
    return [(r / base) ** (edm.schedule_shift_power / 2) for r in edm.resolutions]


def loss_weights(edm: "EDM") -> list[float]:
    return list(edm.resolution_loss_weights) or [1.0] * len(edm.resolutions)


def denoise_streams(edm: "EDM", model, xs_noisy: list[torch.Tensor], sigma: torch.Tensor, y, y_mask,
                    keep_idx=None) -> list[torch.Tensor]:
    """D of every stream of the nested model: [(B, N_r or K, P_r)], low first; xs_noisy low first, each at its
    sigma_r = k_r · sigma (B,); keep_idx applies to the highest stream."""
    pre = [edm.precondition(k * sigma) for k in shifts(edm)]
    c_noise = edm.precondition(sigma)[3]  # the shared noise level's time embedding
    fs = model([x * p[2].view(-1, 1, 1, 1) for x, p in zip(xs_noisy, pre)], c_noise, y, y_mask, keep_idx)
    out = []
    for r, (x, f, (c_skip, c_out, _, _)) in enumerate(zip(xs_noisy, fs, pre)):
        skip = model.patchify(x, r)  # (B, N_r, P_r)
        if keep_idx is not None and r == len(fs) - 1:
            skip = model.gather_fn(skip, keep_idx)  # (B, K, P)
        out.append(c_skip.view(-1, 1, 1) * skip + c_out.view(-1, 1, 1) * f.float())
    return out


def multires_loss(edm: "EDM", model, x0: torch.Tensor, y, y_mask, noise: StepNoise) -> torch.Tensor:
    """A plain model at one pooled resolution, or the nested model's weighted sum of its streams' losses."""
    weights = loss_weights(edm)
    if not edm.nested:
        loss = edm.stream_loss(model, pool_to(x0, edm.resolutions[0]), y, y_mask, noise)
        return loss * weights[0] if edm.resolution_loss_weights else loss
    sigma, k = noise.sigma, shifts(edm)
    x0s = [pool_to(x0, r) for r in edm.resolutions]
    unit = [*noise.stream_noise, noise.noise]  # low first; the highest stream's noise is noise.noise
    xs = [x + n * (kr * sigma).view(-1, 1, 1, 1) for x, n, kr in zip(x0s, unit, k)]
    denoised = denoise_streams(edm, model, xs, sigma, y, y_mask, noise.keep_idx)
    total = torch.zeros((), device=x0.device)
    for r, (d, x, kr, w) in enumerate(zip(denoised, x0s, k, weights)):
        target = model.patchify(x, r)
        if noise.keep_idx is not None and r == len(x0s) - 1:
            target = model.gather_fn(target, noise.keep_idx)  # the loss covers kept patches only
        err = (d - target.float()) ** 2
        total = total + w * (edm.loss_weight(kr * sigma).view(-1, 1, 1) * err).mean()
    return total


# ---------------------------------------------------------------- the packed state of sampling


def pack(streams: list[torch.Tensor]) -> torch.Tensor:
    """[(B, C, r, r)] -> (B, sum C·r²)."""
    return torch.cat([s.flatten(1) for s in streams], dim=1)


def unpack(x: torch.Tensor, channels: int, sizes: list[int]) -> list[torch.Tensor]:
    """(B, sum C·r²) -> [(B, C, r, r)]: inverse of pack."""
    parts = x.split([channels * r * r for r in sizes], dim=1)
    return [p.reshape(x.shape[0], channels, r, r) for p, r in zip(parts, sizes)]


def initial_state(edm: "EDM", noise: list[torch.Tensor]) -> torch.Tensor:
    """The packed unit-sigma start: stream r's unit noise times k_r (the solver multiplies by sigma_max)."""
    return pack([n * k for n, k in zip(noise, shifts(edm))])


def denoise_packed(edm: "EDM", model, x: torch.Tensor, sigma: torch.Tensor, y, y_mask) -> torch.Tensor:
    """D of every stream at the shared sigma (B,), packed like the state x (B, D)."""
    channels = model.cfg.in_channels
    xs = unpack(x, channels, list(edm.resolutions))
    denoised = denoise_streams(edm, model, xs, sigma, y, y_mask)
    return pack([model.unpatchify(d, r) for r, d in enumerate(denoised)])


def highest(edm: "EDM", x: torch.Tensor, channels: int) -> torch.Tensor:
    """The image of a packed state: its highest stream (B, C, R, R)."""
    return unpack(x, channels, list(edm.resolutions))[-1]
