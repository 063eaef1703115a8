"""Image outputs: tensors → uint8 arrays, grids, PNG files, captioned sample sheets and loss curves.

PIL and matplotlib are imported inside the functions that use them, so importing this module needs numpy and torch
only. Every file is written atomically (temporary file + os.replace), so a killed run never leaves half a PNG.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

PAD = 2  # pixels between (and around) grid tiles


def to_uint8(images) -> np.ndarray:
    """(B, C, H, W) float in [-1, 1] (tensor or array) → uint8 (B, H, W, C), C in {1, 3}.

    C=4 (latents, not in [-1, 1]) shows the first 3 channels, each image min-max rescaled to [-1, 1].
    """
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 4:
        x = x[:, :3]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1
    elif x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1, 3 or 4 channels, got {x.shape[1]}")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)


def _as_uint8_rgb(images) -> np.ndarray:
    """Float (B, C, H, W) in [-1, 1] or uint8 (B, H, W, C) → uint8 (B, H, W, 3)."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        arr = images if images.ndim == 4 else images[..., None]  # (B, H, W) grey → (B, H, W, 1)
    else:
        arr = to_uint8(images)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3]


def make_grid(images, nrow: int = 8) -> np.ndarray:
    """Tile images into uint8 (H', W', 3), `nrow` tiles per row, PAD black pixels between and around tiles.

    H' = rows * (H + PAD) + PAD and W' = min(nrow, B) * (W + PAD) + PAD, rows = ceil(B / nrow).
    """
    arr = _as_uint8_rgb(images)
    b, h, w, _ = arr.shape
    if b == 0 or nrow < 1:
        raise ValueError(f"need at least one image and nrow >= 1, got {b} images, nrow={nrow}")
    cols, rows = min(nrow, b), math.ceil(b / nrow)
    grid = np.zeros((rows * (h + PAD) + PAD, cols * (w + PAD) + PAD, 3), dtype=np.uint8)
    for k in range(b):
        y, x = PAD + (k // cols) * (h + PAD), PAD + (k % cols) * (w + PAD)
        grid[y:y + h, x:x + w] = arr[k]
    return grid


def _atomic_target(path) -> tuple[Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_png(path, array: np.ndarray) -> Path:
    """Write uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) to `path` as PNG, atomically; returns the path."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"array must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    path, tmp = _atomic_target(path)
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than a line stays whole."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def save_grid_with_captions(path, images, captions: list[str], nrow: int = 8, tile: int = 128) -> Path:
    """Grid of images with each caption wrapped under its tile; tiles are upscaled (nearest, integer factor)
    to about `tile` pixels wide so captions of 32×32 samples stay readable. Written atomically as PNG."""
    from PIL import Image, ImageDraw, ImageFont

    arr = _as_uint8_rgb(images)
    b, h, w, _ = arr.shape
    if len(captions) != b:
        raise ValueError(f"captions has {len(captions)} entries for {b} images")
    if b == 0 or nrow < 1:
        raise ValueError(f"need at least one image and nrow >= 1, got {b} images, nrow={nrow}")
    k = max(1, tile // w)
    tw, th = w * k, h * k
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, c, font, tw) for c in captions]
    left, top, right, bottom = probe.textbbox((0, 0), "Ag", font=font)
    line_h = bottom - top + 2
    text_h = max(len(lines) for lines in wrapped) * line_h + 4
    cols, rows = min(nrow, b), math.ceil(b / nrow)
    cell_w, cell_h = tw + PAD, th + text_h + PAD
    sheet = Image.new("RGB", (cols * cell_w + PAD, rows * cell_h + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i in range(b):
        x, y = PAD + (i % cols) * cell_w, PAD + (i // cols) * cell_h
        sheet.paste(Image.fromarray(arr[i]).resize((tw, th), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x, y + th + 2 + j * line_h - top), line, fill=(0, 0, 0), font=font)
    return save_png(path, np.asarray(sheet))


def ema(values, span: int | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average; span defaults to len/20 (at least 1, i.e. no smoothing)."""
    v = np.asarray(values, dtype=np.float64)
    span = span or max(1, len(v) // 20)
    a = 1 - 2 / (span + 1)
    out, s = np.empty_like(v), 0.0
    for t, x in enumerate(v):
        s = a * s + (1 - a) * x
        out[t] = s / (1 - a ** (t + 1))
    return out


def plot_loss_curve(steps, losses, path, title: str = "") -> Path:
    """PNG of the raw loss (faint) and its EMA against step; log-y when all losses are positive.

    Uses matplotlib's Figure + Agg canvas directly, so it never touches a display or global pyplot state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, losses = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if steps.shape != losses.shape or steps.ndim != 1 or len(steps) == 0:
        raise ValueError(f"steps and losses must be equal-length 1-D and non-empty, got {steps.shape}, {losses.shape}")
    ok = np.isfinite(losses)
    steps, losses = steps[ok], losses[ok]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    if len(losses):
        ax.plot(steps, ema(losses), color="tab:blue", linewidth=1.8, label="EMA")
        if (losses > 0).all():
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path, tmp = _atomic_target(path)
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
