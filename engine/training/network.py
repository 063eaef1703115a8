"""The network a run's config describes: a MicroDiT of model.name at the data's size (or the lowest of
diffusion.resolutions, or with model.patch_size), or the nested model of model.name inside model.outer."""
from __future__ import annotations

import torch.nn as nn

from engine.config import Config
from models.config import ModelConfig
from models.nested import NestedConfig
from models.sizes import build_network, model_config, outer_config


def network_config(cfg: Config) -> ModelConfig | NestedConfig:
    d, m, res = cfg.data, cfg.model, cfg.diffusion.resolutions
    extra = {"patch_size": m.patch_size} if m.patch_size else {}
    if m.pixel_head >= 0:
        extra["pixel_head"] = m.pixel_head
    inner = model_config(m.name, input_size=res[0] if res else d.image_size, in_channels=d.channels,
                         caption_channels=d.caption_channels, pos_interp_scale=m.pos_interp_scale, init=m.init,
                         pooled_caption=m.pooled_caption,
                         time_free=cfg.diffusion.objective == "init_step",
                         cond_channels=d.channels if cfg.diffusion.lowres_condition else 0, **extra)
    if len(res) < 2:
        return inner
    return NestedConfig(inner, outer_config(m.outer, input_size=res[-1], in_channels=d.channels))


def build_run_network(cfg: Config, kernel_backends: dict[str, str]) -> nn.Module:
    return build_network(network_config(cfg), kernel_backends)


def stream_shapes(net_cfg: ModelConfig | NestedConfig) -> list[tuple[int, int, int]]:
    """(C, r, r) of every stream the network denoises, low first."""
    sizes = net_cfg.resolutions if isinstance(net_cfg, NestedConfig) else [net_cfg.input_size]
    return [(net_cfg.in_channels, r, r) for r in sizes]
