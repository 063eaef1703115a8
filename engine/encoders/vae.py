"""Diffusers AutoencoderKL (SDXL's VAE for MicroDiT), imported where used: load, encode images to the latents
training reads, decode latents to images."""
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


def load_vae(name: str, subfolder: str | None, device: torch.device):
    """AutoencoderKL from a hub id or folder (its root, else its vae/ subfolder), frozen, bf16 on GPU."""
    from diffusers import AutoencoderKL

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # fp16 overflows in the SDXL VAE
    try:
        vae = AutoencoderKL.from_pretrained(name, torch_dtype=dtype, **({"subfolder": subfolder} if subfolder else {}))
    except OSError:
        if subfolder:
            raise
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=dtype)  # a whole pipeline's repo
    vae = vae.to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        vae = vae.to(memory_format=torch.channels_last)  # cuDNN's fast conv layout
    return vae


def vae_info(vae, name: str) -> dict:
    cfg = vae.config
    return {"name": name, "scaling_factor": float(cfg.scaling_factor),
            "shift_factor": None if getattr(cfg, "shift_factor", None) is None else float(cfg.shift_factor),
            "latent_channels": int(cfg.latent_channels), "downsample": 2 ** (len(cfg.block_out_channels) - 1)}


@torch.inference_mode()
def encode_latents(vae, pixels: torch.Tensor, info: dict) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] → float16 (B, C, H/f, W/f) on CPU: (posterior mean - shift) * scale."""
    p = next(vae.parameters())
    x = pixels.to(p.device, p.dtype, non_blocking=True)
    if p.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    z = vae.encode(x).latent_dist.mean.float()  # (B, C, h, w)
    if info["shift_factor"] is not None:  # SD3/Flux-style VAEs; None for SD/SDXL
        z = z - info["shift_factor"]
    return (z * info["scaling_factor"]).half().cpu()
