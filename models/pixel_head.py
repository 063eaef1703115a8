"""A convolutional pixel head: a few 3×3 convolutions at full resolution after the transformer's patch output.

A transformer with p×p patches writes each patch from one token through one linear map, so at small p·p·C budgets
(patch 4 on 32-px pixels: 48 values per token) a sample is a mosaic of flat patches whose edges do not meet; the
head sees the unpatchified output next to the network's (preconditioned) input and corrects it across patch
borders. The last convolution starts at zero, so a fresh head leaves the transformer's output unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, width), width)


class ConvBlock(nn.Module):
    """Pre-norm residual block of two 3×3 convolutions; the condition (timestep + pooled caption) scales and shifts
    the hidden channels between them."""

    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(width), nn.Conv2d(width, width, 3, padding=1)
        self.modulation = nn.Linear(cond_dim, 2 * width)
        self.norm2, self.conv2 = group_norm(width), nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        r = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.modulation(F.silu(c)).chunk(2, dim=-1)  # (B, width) each
        r = self.norm2(r) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return h + self.conv2(F.silu(r))


class PixelHead(nn.Module):
    """(transformer output image, network input, condition) -> refined output image, all (B, C, H, W)."""

    # oneDNN's 3x3 convolutions and their backward run faster on channels-last tensors on a CPU: the head alone took
    # 0.83x as long at the reference's 32 px, its phase-2 step 0.90-0.93x in bench/test_train_step.py
    # (test_pixel_head_channels_last_step_ratio) and 0.97x in training runs. Not measured on a GPU: a GPU keeps NCHW.
    channels_last_on_cpu = True

    def __init__(self, channels: int, width: int, blocks: int, cond_dim: int, extra_in: int = 0):
        super().__init__()
        # the output image, and the network input: the noisy image and `extra_in` channels of a conditioning image
        self.conv_in = nn.Conv2d(2 * channels + extra_in, width, 3, padding=1)
        self.blocks = nn.ModuleList(ConvBlock(width, cond_dim) for _ in range(blocks))
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero modulation and last convolutions: every block and the head start as the identity."""
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
            nn.init.zeros_(block.conv2.weight)
            nn.init.zeros_(block.conv2.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, out: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = torch.cat([out, x.to(out.dtype)], dim=1)
        if self.channels_last_on_cpu and h.device.type == "cpu":
            h = h.contiguous(memory_format=torch.channels_last)  # every later activation keeps the layout
        h = self.conv_in(h)
        c = c.to(out.dtype)
        for block in self.blocks:
            h = block(h, c)
        return out + self.conv_out(F.silu(self.norm_out(h)))
