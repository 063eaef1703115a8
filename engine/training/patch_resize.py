"""Start a network with k-times-wider patches from a checkpoint of the same network (train.init_resize_patches).

A p-patch network at H px and a kp-patch network at kH px have the same token grid. The grown patch embedding spreads
each of its weights over a k×k block of pixels, divided by k², so a token reads the k×k average-pooled image exactly
as the checkpoint's network read an H-px image; the grown output layer repeats each value over a k×k block, so the
network's patch output is the checkpoint's upsampled by pixel replication. Only these tensors change shape; every
other weight carries over, and the position embedding (rebuilt from the config, never loaded) is the checkpoint's where
the grid and model.pos_interp_scale are. For an integer factor the embedding's growth is FlexiViT's pseudo-inverse
resize with pixel replication as the resize: of all k×k-patch weights that give every replicated patch the token of
the patch it came from, the one of least norm.
"""
from __future__ import annotations

import torch

# the state-dict keys, under any prefix, whose shape follows the patch size
_EMBED, _OUT_WEIGHT, _OUT_BIAS = "x_embedder.proj.weight", "final_layer.linear.weight", "final_layer.linear.bias"
PATCH_KEYS = (_EMBED, _OUT_WEIGHT, _OUT_BIAS)


def _is(key: str, name: str) -> bool:
    return key == name or key.endswith("." + name)


def is_patch_key(key: str) -> bool:
    return any(_is(key, k) for k in PATCH_KEYS)


def is_embed_key(key: str) -> bool:
    """The patch embedding's weight, whose shape gives the growth factor."""
    return _is(key, _EMBED)


def growth_factor(saved: tuple[int, ...], target: tuple[int, ...]) -> int:
    """k from the saved and target patch-embedding shapes (dim, C, p, p) and (dim, C, kp, kp); ValueError if none."""
    same_rest = saved[:2] == target[:2] and len(saved) == len(target) == 4
    p, q = saved[-1], target[-1]
    if not same_rest or saved[-2] != p or target[-2] != q or q % p or q == p:
        raise ValueError(f"cannot grow patches {saved} into {target}: the new patch side must be an integer multiple "
                         "(> 1) of the old, with the same width and channels")
    return q // p


def grow(key: str, saved: torch.Tensor, p: int, k: int) -> torch.Tensor:
    """The tensor of `key` for patches of side k·p instead of p."""
    if is_embed_key(key):  # (dim, C, p, p) -> (dim, C, kp, kp)
        return saved.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3) / (k * k)
    channels = saved.shape[0] // (p * p)
    if channels * p * p != saved.shape[0]:
        raise ValueError(f"{key}: {saved.shape[0]} output values are not {p} x {p} patches")
    # rows ordered (p, q, C) as models.microdit.patchify writes them
    grid = saved.reshape(p, p, channels, *saved.shape[1:])
    grown = grid.repeat_interleave(k, dim=0).repeat_interleave(k, dim=1)
    return grown.reshape(k * k * saved.shape[0], *saved.shape[1:])
