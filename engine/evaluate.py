"""Evaluate a trained run: `python engine/evaluate.py --run runs/tiny [--inception inception-2015-12-05.pt]
[--features facebook/dinov2-small] [--clip openai/clip-vit-base-patch32]`.

Generates --num-images images with the run's EMA weights and sampler settings (default EDM Heun + CFG; the sampler
flags --solver, --schedule, --nfe, --init, ... override them; eval.json records them), batched, and computes:
  * GenEval-style accuracy (colour, shape, count, position, all) for runs trained on the built-in synthetic
    dataset: always (engine/eval/geneval.py);
  * FID against --reference with each feature extractor given (--inception TorchScript file and/or --features
    transformers vision model; engine/eval/fid.py). FIDs are comparable only with the same extractor, number of
    images and reference, which eval.json records;
  * CLIP score with --clip (engine/eval/clip_score.py).
Synthetic runs take prompts (and reference images, paired with the prompts) from SyntheticShapes with a held-out
seed (--data-seed, default run.seed + 1000000; the run trained on run.seed). Other runs take prompts from a text
file (--prompts-from, one per line, cycled to --num-images) and need --reference for FID.

Writes <out>/eval.json, <out>/grid.png (captioned), <out>/geneval.jsonl (per image), the reference statistics
<out>/reference_<inception|features>.npz (pass one back as --reference to skip recomputing it) and, with
--save-images, every image as <out>/images/NNNNN.png. Images depend on (seed, batch size, steps, cfg).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not engine/'s files, by name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine.eval.evaluation import evaluate_run
from engine.sampling.settings import add_sampler_args
from engine.training.errors import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the run's newest complete one)")
    p.add_argument("--raw-weights", action="store_true", help="use the trained weights instead of the EMA")
    p.add_argument("--num-images", type=int, default=256, help="images to generate")
    p.add_argument("--prompts-from", default=None,
                   help="'synthetic' (default for synthetic runs) or a text file with one prompt per line")
    p.add_argument("--data-seed", type=int, help="SyntheticShapes seed of prompts/reference (default run.seed+1e6)")
    p.add_argument("--reference", help="FID reference: 'synthetic' (default for synthetic runs), a folder of images "
                                       "(center-cropped and resized to the generated size) or an .npz of mu/sigma")
    p.add_argument("--num-reference", type=int, help="reference images (default: --num-images; folder: all)")
    p.add_argument("--inception", help="TorchScript Inception file, e.g. inception-2015-12-05.pt")
    p.add_argument("--inception-input", default="0-255", choices=["0-255", "0-1", "-1-1"],
                   help="float range the TorchScript module expects (inception-2015-12-05.pt: 0-255)")
    p.add_argument("--inception-resize", type=int, help="resize to this side before the module (default: it does)")
    p.add_argument("--features", help="transformers vision model (hub id or path) as FID feature extractor")
    p.add_argument("--clip", help="transformers CLIP model (hub id or path) for the CLIP score")
    p.add_argument("--no-geneval", action="store_true", help="skip the GenEval-style score of synthetic runs")
    p.add_argument("--vae", help="latent runs: diffusers AutoencoderKL to decode with (default: the run's data.vae)")
    p.add_argument("--text-encoder", help="text encoder (hub id or folder) instead of the run's data.text_encoder")
    p.add_argument("--steps", type=int, help="solver steps without --nfe (default: the run's sample.steps)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the run's sample.cfg_scale)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch")
    p.add_argument("--grid", type=int, default=64, help="images in grid.png")
    p.add_argument("--save-images", action="store_true", help="also write every image to <out>/images/")
    p.add_argument("--out", help="output folder (default: <run>/eval/<checkpoint name>)")
    add_sampler_args(p)
    args = p.parse_args(argv)
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict:
    return evaluate_run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
