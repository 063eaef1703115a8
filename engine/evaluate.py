"""Evaluate a trained run, or compare evaluations, by one protocol.

    python engine/evaluate.py --run-dir runs/tiny [--step 300] [--inception inception-2015-12-05.pt] [--clip ...]
    python engine/evaluate.py --compare runs/a runs/b [--out DIR]            # two runs on identical inputs
    python engine/evaluate.py --compare runs/a/eval/x runs/a/eval/y ...      # evaluation folders (e.g. two samplers)
    python engine/evaluate.py --compare runs/a0,runs/a1 runs/b0,runs/b1       # two recipes, each trained with 2 seeds
    python engine/evaluate.py --caption-value 200000 [--out DIR]           # the synthetic set's own ceiling, no run

Generates --num-images images with the run's EMA weights and sampler settings (default EDM Heun + CFG; the sampler
flags --solver, --schedule, --nfe, --init, ... override them; eval.json records them). Image i is made for prompt i of
a fixed prompt set from the initial noise fixed by (--seed, i), whatever the batch size, so two runs or two sampler
settings see identical inputs. Synthetic runs take the prompts from SyntheticShapes with a held-out seed
(--data-seed, default 1000000 for every run, so runs of any seed see the same prompts; eval.json records how many
captions training also saw); other runs take them from a text file (--prompts-from, one per line, cycled to
--num-images) and need --reference for FID.
Scores, each with a bootstrap 95% confidence interval over images:
  * GenEval-style accuracy (colour, shape, count, position, all) for synthetic runs (engine/eval/geneval.py);
  * the attribute Fréchet distance for synthetic runs: features of a small network trained (once, cached under
    <run.out_dir>/.cache) on the synthetic data's attributes, against the prompts' own held-out images
    (engine/eval/attribute_net.py);
  * FID against --reference with each extractor given (--inception TorchScript file and/or --features transformers
    vision model; engine/eval/reference.py), comparable only with the same extractor, image count and reference;
  * CLIP score with --clip (engine/eval/clip_score.py).
--caption-value N needs no run: on N SyntheticShapes images, the lowest x0 error any denoiser can reach at sigma -> inf
knowing nothing, the colours, ... the whole caption (engine/eval/caption_value.py): what reading each word can earn.
With --caption-use and --train-gap, two denoising checks that need no sampling: how much each caption word is relied on
(engine/eval/caption_use.py) and the training vs held-out error (engine/eval/train_gap.py).

Writes <out>/eval.json (everything a number depends on), grid.png, geneval.jsonl and the attribute features (per
image, for --compare), reference_<extractor>.npz (pass one back as --reference to skip recomputing it) and, with
--save-images, every image. --compare writes compare.json, compare.md (a table of paired differences with CIs) and,
for a series, compare.png (metric against --x step|nfe); --caption-value writes caption_value.json (default folder
./caption_value). A run folder given to --compare is evaluated first with this command's settings.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not engine/'s files, by name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine.eval.evaluation import evaluate_run
from engine.sampling.settings import add_sampler_args
from engine.training.errors import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run-dir", "--run", dest="run", help="run folder (holds config.yaml and checkpoints/); "
                                                            "--run is the old spelling, which torchrun misreads")
    what.add_argument("--compare", nargs="+", metavar="RUN_OR_EVAL",
                      help="two or more run folders or evaluation folders (holding eval.json); each is compared with "
                           "the first. An item may join several with commas: one recipe trained with seeds 0, 1, ..., "
                           "paired by position with the other items' (the CI then covers the seeds too)")
    what.add_argument("--caption-value", type=int, metavar="SAMPLES",
                      help="no run: the synthetic set's lowest possible x0 error at sigma -> inf for each level of "
                           "caption knowledge, on SAMPLES 32-px images (200000: about two minutes, 3.3 GB)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the run's newest complete one)")
    p.add_argument("--step", type=int, help="evaluate the run's checkpoint of this step")
    p.add_argument("--raw-weights", action="store_true", help="use the trained weights instead of the EMA")
    p.add_argument("--num-images", type=int, default=256, help="images to generate")
    p.add_argument("--prompts-from", default=None,
                   help="'synthetic' (default for synthetic runs) or a text file with one prompt per line")
    p.add_argument("--data-seed", type=int, help="SyntheticShapes seed of prompts/reference (default 1000000)")
    p.add_argument("--reference", help="FID reference: 'synthetic' (default for synthetic runs), a folder of images "
                                       "(center-cropped and resized to the generated size) or an .npz of mu/sigma")
    p.add_argument("--num-reference", type=int, help="reference images (default: --num-images; folder: all)")
    p.add_argument("--inception", help="TorchScript Inception file, e.g. inception-2015-12-05.pt")
    p.add_argument("--inception-input", default="0-255", choices=["0-255", "0-1", "-1-1"],
                   help="float range the TorchScript module expects (inception-2015-12-05.pt: 0-255)")
    p.add_argument("--inception-resize", type=int, help="resize to this side before the module (default: it does)")
    p.add_argument("--features", help="transformers vision model (hub id or path) as FID feature extractor")
    p.add_argument("--clip", help="transformers CLIP model (hub id or path) for the CLIP score")
    p.add_argument("--no-geneval", action="store_true",
                   help="skip the GenEval-style score and the attribute Fréchet distance of synthetic runs")
    p.add_argument("--vae", help="latent runs: diffusers AutoencoderKL to decode with (default: the run's data.vae)")
    p.add_argument("--text-encoder", help="text encoder (hub id or folder) instead of the run's data.text_encoder")
    p.add_argument("--steps", type=int, help="solver steps without --nfe (default: the run's sample.steps)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the run's sample.cfg_scale)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: image i starts from the noise of (seed, i)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (does not change images)")
    p.add_argument("--grid", type=int, default=64, help="images in grid.png")
    p.add_argument("--save-images", action="store_true", help="also write every image to <out>/images/")
    p.add_argument("--score-size", type=int, metavar="SIDE",
                   help="replicate each sample's pixels up to SIDE px before scoring and saving (a multiple of the "
                        "run's data.image_size; default: that size): e.g. 32 scores a run drawn at 16 px as a run "
                        "pooled from 32 px is scored, so --compare can pair the two on a --prompts-from file (no "
                        "attribute FD there)")
    p.add_argument("--out", help="output folder (default: <run>/eval/<checkpoint name>; --compare: ./compare)")
    p.add_argument("--caption-use", action="store_true",
                   help="also measure how much the denoiser relies on each caption attribute (synthetic runs): the "
                        "MSE ratio when a word is changed, per noise level (engine/eval/caption_use.py)")
    p.add_argument("--train-gap", action="store_true",
                   help="also compare the denoising error on the run's first --num-images training images with as "
                        "many held-out ones, per noise level (synthetic runs): has it memorised its training set? "
                        "(engine/eval/train_gap.py)")
    p.add_argument("--check-sigmas", type=noise_levels, metavar="S1,S2,...",
                   help="noise levels of --caption-use and --train-gap (default 0.25,0.5,1,2,4,8; e.g. 80 to compare "
                        "with --caption-value's ceiling)")
    p.add_argument("--x", default="step", choices=["step", "nfe"], help="--compare: x axis of the series plot")
    p.add_argument("--cascade-from-data", type=int, metavar="SIZE",
                   help="sample through the cascade with an ideal first stage: each prompt's own held-out image, "
                        "average-pooled to SIZE px (synthetic runs; --cascade-until/--cascade-restart as usual): "
                        "what this run's model keeps of a right layout")
    add_sampler_args(p)
    args = p.parse_args(argv)
    for name in ("num_images", "batch_size", "score_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.caption_value is not None and args.caption_value < 2:
        p.error("--caption-value needs at least 2 samples")
    if args.compare is not None and len(args.compare) < 2:
        p.error("--compare needs at least two run or evaluation folders")
    return args


def noise_levels(text: str) -> tuple[float, ...]:
    """"0.5,2,80" -> (0.5, 2.0, 80.0); each must be a positive number."""
    try:
        levels = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated numbers") from None
    if not all(math.isfinite(v) and v > 0 for v in levels):
        raise argparse.ArgumentTypeError(f"{text!r}: noise levels must be finite and > 0")
    return levels


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.caption_value is not None:
        return write_caption_value(args)
    if args.compare:
        from engine.eval.compare import compare_folders
        return compare_folders(args, evaluate_run)
    return evaluate_run(args)


def write_caption_value(args) -> dict:
    import json

    from engine.eval.caption_value import caption_value, caption_value_table
    result = caption_value(args.caption_value)
    out = Path(args.out or "caption_value")
    out.mkdir(parents=True, exist_ok=True)
    (out / "caption_value.json").write_text(json.dumps(result, indent=2) + "\n")
    print(caption_value_table(result))
    print(f"-> {out / 'caption_value.json'}")
    return result


if __name__ == "__main__":
    run_cli(main)
