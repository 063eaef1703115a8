"""Autoguidance (Karras et al., NeurIPS 2024, "Guiding a diffusion model with a bad version of itself"): guidance
extrapolates from a weaker model of the same task instead of from the run's own unconditional output,

    D = D_guide + w (D - D_guide),

at the noise levels where guidance runs (sample.cfg_sigma_min/max). The paper's weaker model is smaller or trained
for less; here it is any run folder making the same images from the same captions (sample.guide_run), typically the
sampled run at an earlier checkpoint (sample.guide_step). Where the weak model errs more than the strong one (the
paper's argument: in the same directions, only more) the difference points toward what the strong model does better,
so the extrapolation sharpens it, without classifier-free guidance's pull toward the caption's most typical image.
With sample.guide_caption='uncond' the weak model reads the null caption, which keeps CFG's pull and replaces only
its unconditional model. Either way the weak model costs the evaluation the unconditional branch cost: the same NFE.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.sampling.settings import SamplerSettings, SamplerSettingsError, check_companion


@dataclass
class Guide:
    """The guiding model (EMA weights, eval mode) and its denoiser; `caption`: 'cond' or 'uncond' (which caption it
    reads)."""

    model: object
    edm: object
    caption: str
    run: str
    checkpoint: str

    def record(self) -> dict:
        return {"guide_run": self.run, "guide_checkpoint": self.checkpoint, "guide_caption": self.caption}


def guide_of(settings: SamplerSettings, cfg, device) -> Guide | None:
    """The guiding model the settings name (load_guide), or None: classifier-free guidance."""
    return load_guide(settings, cfg, device) if settings.sample.guide_run else None


def load_guide(settings: SamplerSettings, cfg, device) -> Guide:
    """The guiding model of sample.guide_run at sample.guide_step (else its newest checkpoint), checked against the
    sampled run's config `cfg`: a plain denoiser of one resolution, the same image size and captions."""
    from engine.diffusion.edm import EDM
    from engine.training.network import network_config
    from engine.training.run_folder import load_run_model, resolve_checkpoint

    s = settings.sample
    run = Path(s.guide_run)
    where = f"sample.guide_run / --guide-run {run}"
    own_edm = EDM.from_config(cfg.diffusion)
    if own_edm.nested or own_edm.objective != "edm":
        raise SamplerSettingsError(f"{where}: guides a plain denoiser of one resolution; this run is nested or an "
                                   "initial-step model")
    if not (run / "config.yaml").is_file():
        raise SamplerSettingsError(f"{where}: not a run folder (no config.yaml)")
    try:
        ckpt = resolve_checkpoint(run, None, s.guide_step)
        gcfg, model, ckpt = load_run_model(run, str(ckpt), use_ema=True)
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError: no checkpoint, or not that step
        raise SamplerSettingsError(f"{where}: {str(e).replace('--step', 'sample.guide_step / --guide-step')}") \
            from None
    edm = EDM.from_config(gcfg.diffusion)
    check_companion(where, gcfg, edm, cfg)
    size, own = network_config(gcfg).input_size, network_config(cfg).input_size
    if size != own:
        raise SamplerSettingsError(f"{where}: makes {size}x{size} images; the run makes {own}x{own}")
    return Guide(model.to(device), edm, s.guide_caption, str(run), str(ckpt))
