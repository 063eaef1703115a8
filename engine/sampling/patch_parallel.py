"""Patch parallelism for a built MicroDiT (DistriFusion, Li et al. CVPR 2024): each process computes one band of
contiguous token rows. The model's code is unchanged; `BandModel` swaps a few of its submodules while it is entered:

  patch embedding   the input given is the band's pixel rows, so the stride-p convolution makes the band's tokens;
                    the position embedding is sliced to the band
  per-token layers  (norms, adaLN, MLPs, the final layer) need nothing
  caption side      replicated on every process; the caption projection, refiner and each block's cross-attention
                    keys/values are computed once per sampling run (cached on the caption tensor)
  self-attention    queries of the band's tokens; keys/values of all tokens: the band's fresh ones, the others' from
                    the exchange (engine/sampling/exchange.py), in every patch-mixer and backbone block
  expert choice     routed across the bands (engine/sampling/band_moe.py)
  pixel head        run on the whole image from the gathered bands (BandPixelHead)

Modes: 'full_sync' and 'patch' exchange keys/values (patch: displaced after the warm-up); 'naive_patch' never does:
the band attends to its own tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from engine.config import ConfigError
from engine.sampling.band_moe import BandExpertChoice
from engine.sampling.exchange import Exchange
from models.config import ModelConfig
from models.layers import SelfAttention, attend
from models.moe import ExpertChoiceMoE


@dataclass(frozen=True)
class Band:
    """Token rows [first_row, first_row + rows) of a grid of `grid_rows` x `cols` tokens of p x p pixels."""

    first_row: int
    rows: int
    cols: int
    patch: int

    @property
    def first_token(self) -> int:
        return self.first_row * self.cols

    @property
    def tokens(self) -> slice:
        return slice(self.first_token, self.first_token + self.rows * self.cols)

    @property
    def pixels(self) -> slice:
        """The band's rows of the input image (H axis)."""
        return slice(self.first_row * self.patch, (self.first_row + self.rows) * self.patch)


def band_of(cfg: ModelConfig, rank: int, world: int) -> Band:
    """Process `rank`'s band of `world` equal bands; a world size that does not divide the token rows is an error."""
    grid = cfg.input_size // cfg.patch_size
    if grid % world:
        fits = ", ".join(str(n) for n in range(1, grid + 1) if grid % n == 0)
        raise ConfigError(f"--parallel (sample.parallel): {world} processes cannot split the {grid} token rows of a "
                          f"{cfg.input_size}-pixel input with patch {cfg.patch_size} into equal bands; launch a "
                          f"number of processes that divides {grid}: {fits}")
    rows = grid // world
    return Band(rank * rows, rows, grid, cfg.patch_size)


class CachedByInput(nn.Module):
    """Runs `inner` once for as long as it is called with the same tensors (same objects, not modified in place):
    the caption side of a sampling run, whose inputs the guided denoiser builds once."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.args, self.versions, self.out = inner, None, None, None

    def forward(self, *args):
        versions = [a._version if torch.is_tensor(a) else None for a in args]
        same = self.args is not None and len(args) == len(self.args) and all(a is b for a, b in zip(args, self.args))
        if not (same and versions == self.versions):
            self.args, self.versions, self.out = args, versions, self.inner(*args)
        return self.out


class DisplacedSelfAttention(nn.Module):
    """A built SelfAttention for one band: queries of the band, keys/values of the whole image from the exchange."""

    def __init__(self, inner: SelfAttention, exchange: Exchange, key: str):
        super().__init__()
        self.inner, self.exchange, self.key = inner, exchange, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.inner
        hidden = attn.heads * attn.head_dim
        q, kv = attn.qkv(x).split([hidden, 2 * hidden], dim=-1)  # (B, n, hidden), (B, n, 2·hidden)
        kv = self.exchange.all_bands(self.key, kv)  # (B, T, 2·hidden)
        k, v = kv.chunk(2, dim=-1)
        return attn.proj(attend(attn, q, k, v, None))  # (B, n, dim)


class BandPixelHead(nn.Module):
    """A built PixelHead for one band. Its 3x3 convolutions read the neighbouring rows and its group norms take
    statistics over the whole image, so in the exchanging modes the bands' patch outputs and inputs are gathered
    (blocking: they are the evaluation's own output, never displaced) and every process runs the head on the whole
    image, keeping its band's rows: exact, at the price of the head's FLOPs on every process. naive_patch runs it on
    the band alone, zero-padded at the band's edges, as DistriFusion's naive baseline does its convolutions."""

    def __init__(self, inner: nn.Module, band: Band, exchange: Exchange, mode: str):
        super().__init__()
        self.inner, self.band, self.exchange, self.mode = inner, band, exchange, mode

    def forward(self, out: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """out, x (B, C, band rows·p, W) -> (B, C, band rows·p, W)."""
        if self.mode == "naive_patch":
            return self.inner(out, x, c)
        whole = self.exchange.gather_now(torch.cat([out, x.to(out.dtype)], dim=1), dim=2)  # (B, 2C, H, W)
        return self.inner(*whole.chunk(2, dim=1), c)[:, :, self.band.pixels]


class BandModel:
    """What engine/diffusion/edm.py calls as the model while entered: forward, patchify and unpatchify of one band.

    Entering swaps the submodules listed in the module docstring into `model` (in place; leaving puts the originals
    back). Each call is one model evaluation; it tells the exchange where evaluations begin and end."""

    def __init__(self, model, band: Band, exchange: Exchange, mode: str, moe_routing: str):
        if mode not in ("patch", "full_sync", "naive_patch"):
            raise ValueError(f"BandModel: mode {mode!r} is not a band mode")
        self.model, self.band, self.exchange, self.mode, self.moe_routing = model, band, exchange, mode, moe_routing
        self.cfg = model.cfg
        self.swapped: list[tuple[nn.Module, str, object]] = []

    def __enter__(self) -> "BandModel":
        m, cfg = self.model, self.model.cfg
        self._swap(m, "pos_embed", m.pos_embed[:, self.band.tokens])  # (1, n, dim)
        self._swap(m.y_embedder, "y_proj", CachedByInput(m.y_embedder.y_proj))
        if cfg.caption_refiner:
            self._swap(m, "y_emb_preprocess", CachedByInput(m.y_emb_preprocess))
        if cfg.mixer_depth > 0:
            self._swap(m, "patch_mixer_map_y", CachedByInput(m.patch_mixer_map_y))
        if cfg.pixel_head:
            self._swap(m, "pixel_head", BandPixelHead(m.pixel_head, self.band, self.exchange, self.mode))
        for key, block in self.blocks():
            if cfg.cross_attention:
                self._swap(block.cross_attn, "kv_linear", CachedByInput(block.cross_attn.kv_linear))
            if self.mode != "naive_patch":
                self._swap(block, "attn", DisplacedSelfAttention(block.attn, self.exchange, f"{key}.attn"))
            if isinstance(block.mlp, ExpertChoiceMoE) and self.moe_routing != "local":
                moe = BandExpertChoice(block.mlp, self.exchange, f"{key}.mlp", self.moe_routing, self.band.first_token)
                self._swap(block, "mlp", moe)
        return self

    def __exit__(self, *exc) -> None:
        while self.swapped:
            owner, name, original = self.swapped.pop()
            setattr(owner, name, original)
        self.exchange.finish()

    def _swap(self, owner: nn.Module, name: str, new) -> None:
        self.swapped.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def blocks(self):
        """(name, block) of every patch-mixer and backbone block."""
        mixer = self.model.patch_mixer if self.model.cfg.mixer_depth > 0 else []
        return [*((f"patch_mixer.{i}", b) for i, b in enumerate(mixer)),
                *((f"blocks.{i}", b) for i, b in enumerate(self.model.blocks))]

    # ---- the model interface edm.denoise uses -----------------------------------------------------------------
    def __call__(self, x, c_noise, y, y_mask=None, keep_idx=None) -> torch.Tensor:
        """x (B, C, band rows·p, W): the band of the preconditioned input. Returns (B, n, p²·C) of the band."""
        if keep_idx is not None:
            raise ValueError("BandModel samples every token; deferred masking is for training")
        self.exchange.begin_eval()
        out = self.model(x, c_noise, y, y_mask)
        self.exchange.end_eval()
        return out

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.patchify(x)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.unpatchify(tokens, rows=self.band.rows)  # (B, C, band rows·p, W)
