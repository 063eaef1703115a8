"""Where sampling starts: x = x0_hat + sigma_max · n, with the same unit noise n the solver would otherwise scale.

noise      x0_hat = 0: today's start (x = sigma_max · n)
data_mean  x0_hat = the training set's mean image: no network, the baseline that shows whether conditioning matters
sing       x0_hat = f(n, c), SingDiffusion's initial-step model (engine/diffusion/init_step.py), with guidance
           normalised as in the paper's code, (u + w (c - u)) / w, plain, u + w (c - u), or none (c)
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.sampling.settings import SamplerSettings, SamplerSettingsError, check_sing_run


class MeanImageStart:
    def __init__(self, mean: torch.Tensor):
        self.mean = mean  # (C, H, W)

    def __call__(self, n: torch.Tensor, y, y_mask, cfg_scale: float) -> torch.Tensor:
        return self.mean.to(n.device, n.dtype).expand_as(n)


class InitStepStart:
    """The initial-step model of a trained run (its EMA weights)."""

    def __init__(self, model, edm, guidance: str):
        self.model, self.edm, self.guidance = model, edm, guidance

    @torch.no_grad()
    def __call__(self, n: torch.Tensor, y, y_mask, cfg_scale: float) -> torch.Tensor:
        from engine.diffusion.init_step import predict

        if self.guidance == "none" or cfg_scale == 1.0:
            return predict(self.edm, self.model, n.float(), y, y_mask)
        mask = None if y_mask is None else torch.cat([y_mask, torch.ones_like(y_mask)])  # None: nothing padded
        # the unconditional half gets the null caption training dropped to (all-zero, every position valid)
        both = predict(self.edm, self.model, torch.cat([n, n]).float(), torch.cat([y, torch.zeros_like(y)]), mask)
        cond, uncond = both.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return guided / cfg_scale if self.guidance == "normalized" else guided


def data_mean_image(cfg, num: int = 4096) -> torch.Tensor:
    """(C, H, W) mean of the run's training images (synthetic runs: the first `num` samples of its set)."""
    if cfg.data.source != "synthetic":
        raise SamplerSettingsError(f"sample.init=data_mean (--init data_mean) needs a synthetic run; this one trained "
                                   f"on data.source={cfg.data.source}")
    from engine.data.synthetic import synthetic_train_set

    d = cfg.data
    ds = synthetic_train_set(cfg)
    return ds.images(range(min(num, d.num_samples))).mean(0)


def load_init_step(settings: SamplerSettings, cfg, device) -> InitStepStart:
    """The initial-step model of sample.sing_run, checked against the run it starts (same captions and image shape)."""
    from engine.diffusion.edm import EDM
    from engine.training.run_folder import load_run_model

    run = Path(settings.sample.sing_run)
    where = f"sample.sing_run / --sing-run {run}"
    check_sing_run(str(run))
    try:
        scfg, model, _ = load_run_model(run, None, use_ema=True)
    except (FileNotFoundError, ValueError) as e:
        raise SamplerSettingsError(f"{where}: {e}") from None
    for key in ("text_encoder", "caption_len", "caption_channels", "image_size", "channels", "attend_to_padding"):
        if getattr(scfg.data, key) != getattr(cfg.data, key):
            raise SamplerSettingsError(f"{where}: data.{key}={getattr(scfg.data, key)!r} differs from this run's "
                                       f"{getattr(cfg.data, key)!r}")
    return InitStepStart(model.to(device), EDM.from_config(scfg.diffusion), settings.sample.sing_guidance)


def build_start(settings: SamplerSettings, cfg, device):
    """The x0_hat callable of settings.sample.init (None for 'noise')."""
    init = settings.sample.init
    if init == "noise":
        return None
    if init == "data_mean":
        return MeanImageStart(data_mean_image(cfg))
    return load_init_step(settings, cfg, device)
