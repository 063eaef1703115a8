"""Decode latents to images with a diffusers AutoencoderKL (SDXL's VAE for MicroDiT), imported where used."""
from __future__ import annotations

from pathlib import Path

import torch


class LatentDecoder:
    """`decoder(latents)`: latents (B, C, h, w) as trained (multiplied by the VAE's scaling factor) -> images
    (B, 3, H, W) in [-1, 1]. `name`: hub id or folder; a repository with a `vae/` subfolder works too."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL

        sub = "vae" if (Path(name) / "vae").is_dir() else None
        self.vae = AutoencoderKL.from_pretrained(name, subfolder=sub, torch_dtype=dtype).to(device).eval()
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)  # SD3/Flux-style VAEs have one

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scale + self.shift  # precompute stored (mean - shift) * scale
        return self.vae.decode(z).sample.float().clamp(-1, 1)
