"""Generate images from a trained run: `python engine/sample.py --run-dir runs/tiny --prompt "a red circle"`.

Loads the run's resolved config and the EMA weights of its newest checkpoint (or --checkpoint), embeds the prompts
with the run's text encoder, samples with the run's sampler settings (default: EDM Heun + classifier-free guidance;
the sampler flags override them) and writes a PNG grid. Across processes:
`torchrun --standalone --nproc_per_node=2 engine/sample.py --run-dir runs/tiny --prompt "a red circle" --parallel patch`
(engine/sampling/parallel_sample.py); process 0 writes the grid."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not engine/'s files, by name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from engine.config import load_config
from engine.diffusion.edm import EDM
from engine.sampling.parallel_sample import parallel_sample, process_group
from engine.sampling.sampler import build_sampler, initial_noise, sample
from engine.sampling.settings import SamplerSettings, add_parallel_args, add_sampler_args
from engine.training.errors import run_cli
from engine.training.run_folder import embed_captions, load_run_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --run-dir and --per-prompt survive launchers: torchrun reads "--run" and "--num" as its own abbreviations.
    p.add_argument("--run-dir", "--run", dest="run", required=True, help="run folder (holds config.yaml and "
                                                                          "checkpoints/)")
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat for several")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the run's newest complete one)")
    p.add_argument("--per-prompt", "--num", dest="num", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, help="solver steps without --nfe (default: the run's sample.steps)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the run's sample.cfg_scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="PNG path (default: <run>/samples/sample_<seed>.png)")
    p.add_argument("--raw-weights", action="store_true", help="use the trained weights instead of the EMA")
    p.add_argument("--vae", help="diffusers AutoencoderKL to decode latents (default: the run's data.vae)")
    p.add_argument("--text-encoder", help="text encoder (hub id or folder) instead of the run's data.text_encoder")
    add_sampler_args(p)
    add_parallel_args(p)
    return p.parse_args(argv)


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    run = Path(args.run)  # bad sampler flags and launches fail before anything is loaded, alike on every process
    cfg = load_config(run / "config.yaml")
    settings = SamplerSettings.from_args(args, cfg, str(run.parent / ".cache"))
    with process_group(settings, cfg) as group:  # None: one process
        return generate(args, run, settings, group)


def generate(args, run: Path, settings: SamplerSettings, group) -> Path | None:
    cfg, model, ckpt = load_run_model(run, args.checkpoint, not args.raw_weights, text_encoder=args.text_encoder)
    device = group.device if group else next(model.parameters()).device
    sampler = build_sampler(settings, cfg, device)
    captions = [p for p in args.prompt for _ in range(args.num)]
    y, y_mask = embed_captions(cfg, captions, device)
    edm = EDM.from_config(cfg.diffusion)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if group is None:
        images = sample(model, edm, y, y_mask, generator=gen, sampler=sampler).cpu()
        return write(args, run, cfg, sampler, ckpt, captions, images, device)
    noise = initial_noise(model.cfg, len(captions), gen, device)  # the draw one process makes: the same images
    images, stats = parallel_sample(model, edm, y, y_mask, sampler, noise)
    if not group.is_main:
        return None
    print(f"{stats.mode} on {stats.world} processes: {stats.seconds:.2f} s, {stats.comm_wait_s:.2f} s of it waiting "
          "on communication (process 0)")
    return write(args, run, cfg, sampler, ckpt, captions, images.cpu(), device)


def write(args, run: Path, cfg, sampler, ckpt, captions, images: torch.Tensor, device) -> Path:
    """The PNG grid (and a latent run's latents) of `images`; one line saying what was made."""
    scale = sampler.settings.cfg_scale
    if not torch.isfinite(images).all():  # a PNG would clamp NaN to black and hide it
        raise FloatingPointError(f"sampling from {ckpt} gave non-finite values (the weights or --cfg {scale} diverge)")
    out = Path(args.out) if args.out else run / "samples" / f"sample_{args.seed}.png"
    vae = args.vae or cfg.data.vae
    if cfg.data.channels != 3:
        torch.save(images, out.with_suffix(".latents.pt"))  # keep the latents: decoding is lossy to look at
        if vae:
            from engine.encoders.vae import LatentDecoder
            images = LatentDecoder(vae, device)(images.to(device)).cpu()
        else:
            print(f"latent run without --vae: the PNG shows 3 raw latent channels; latents in {out.with_suffix('.latents.pt')}")
    from engine.outputs.images import save_grid_with_captions
    save_grid_with_captions(out, images, captions, nrow=args.num)
    s, rec = sampler.settings.sample, sampler.record()
    low = f" after {rec['cascade_nfe']} at {rec['cascade_size']} px from {s.cascade_run}" if s.init == "cascade" else ""
    guidance = f"autoguidance {scale} by {rec['guide_checkpoint']}" if s.guide_run else f"cfg {scale}"
    print(f"wrote {out} ({len(captions)} images, {s.solver} on {s.schedule} steps, {sampler.plan.nfe} NFE{low}, "
          f"init {s.init}, {guidance}, from {ckpt})")
    return out


if __name__ == "__main__":
    run_cli(main)
