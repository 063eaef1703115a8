"""Distribution-guided debiasing of a trained run (Balancing Act, Parihar et al. CVPR 2024).

    python engine/debias.py train-predictor --run runs/tiny_colour_biased
    python engine/debias.py sample --run runs/tiny_colour_biased --prompt "a circle" --target uniform --scale 1 --num 64

train-predictor probes the model's layers, fits the colour-distribution predictor on the chosen one and writes
<run>/debias/predictor.pt (with a hash of the weights it read). sample generates --num images per prompt with the
chosen method and writes a grid and debias.json (detector colour histogram, FD to the target, red fraction,
no-detection rate, shape and count accuracy, with 95% CIs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not engine/'s files, by name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from engine.config import ConfigError
from engine.training.errors import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-predictor", help="fit the attribute distribution predictor of a run")
    s = sub.add_parser("sample", help="generate with (or without) debiasing guidance")
    for q in (t, s):
        q.add_argument("--run", required=True, help="run folder (holds config.yaml and checkpoints/)")
        q.add_argument("--checkpoint", help="checkpoint folder (default: the run's newest complete one)")
        q.add_argument("--predictor", help="predictor file (default: <run>/debias/predictor.pt)")
        q.add_argument("--seed", type=int, default=0)
    t.add_argument("--layer", help="layer to read (default: chosen by the probe): mixer or a backbone block index")
    t.add_argument("--per-class", type=int, default=600,
                   help="trajectories (or dataset images, or noised pairs) per colour")
    t.add_argument("--features", default="noised",
                   help="noised (dataset images + noise) | trajectory (the sampler on colour-named prompts) | inverted")
    t.add_argument("--steps", type=int, default=600, help="Adam steps of the predictor")
    s.add_argument("--prompt", action="append", required=True, help="a caption; repeat for several")
    s.add_argument("--num", type=int, default=64, help="images per prompt")
    s.add_argument("--batch", type=int, default=64, help="images per batch: the set the distribution is enforced on")
    s.add_argument("--method", default="distribution", help="none | prompt | sample | distribution")
    s.add_argument("--target", default="uniform", help="'uniform' or colour=weight,... summing to 1")
    s.add_argument("--scale", type=float, default=1.0, help="guidance scale (0 = the unguided images)")
    s.add_argument("--window", default="0,inf", help="guide only at sigma in [lo, hi]")
    s.add_argument("--divergence", default="chi2", help="chi2 | kl")
    s.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the predictor's logits")
    s.add_argument("--max-ratio", type=float, default=0.2, help="edit norm bound relative to the features' norm")
    s.add_argument("--out", help="output folder (default: <run>/debias/<method>_<seed>)")
    return p.parse_args(argv)


def load(args):
    from engine.training.run_folder import load_run_model

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run {run}: no config.yaml there (not a run folder)")
    try:
        cfg, model, ckpt = load_run_model(run, args.checkpoint)
    except FileNotFoundError as e:
        raise ConfigError(f"--run {run}: {e}") from None
    if cfg.diffusion.lowres_condition:
        raise ConfigError(f"--run {run}: a super-resolution stage (diffusion.lowres_condition) is not supported: its "
                          "condition comes from the cascade's low model")
    return cfg, model, ckpt


def train(args) -> Path:
    from engine.sampling.debias_predictor import train_predictor
    from engine.training.run_folder import make_embedder

    if args.per_class < 4 or args.steps < 1:
        raise ConfigError("--per-class must be >= 4 and --steps >= 1")
    cfg, model, ckpt = load(args)
    if cfg.data.source != "synthetic":
        raise ConfigError(f"--run {args.run}: trained on data.source={cfg.data.source}; the predictor's labels come "
                          "from the synthetic set's detector")
    bundle = train_predictor(cfg, model, make_embedder(cfg, next(model.parameters()).device), args.per_class,
                             args.seed, args.layer, args.steps, args.features)
    bundle["checkpoint"] = str(ckpt)
    out = Path(args.predictor) if args.predictor else Path(args.run) / "debias" / "predictor.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(bundle, out)
    summary = {k: v for k, v in bundle.items() if k != "state_dict"}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} (layer {bundle['layer']}, balanced accuracy per sigma band {bundle['accuracy']})")
    return out


def guidance_settings(args):
    from engine.sampling.debias_sample import METHODS, GuidanceSettings
    from engine.sampling.distribution_guidance import DIVERGENCES

    if args.method not in METHODS:
        raise ConfigError(f"--method {args.method!r} must be one of {', '.join(METHODS)}")
    if args.divergence not in DIVERGENCES:
        raise ConfigError(f"--divergence {args.divergence!r} must be one of {', '.join(DIVERGENCES)}")
    try:
        lo, hi = (float(v) for v in args.window.split(","))
    except ValueError:
        raise ConfigError(f"--window {args.window!r} must be lo,hi (two numbers, e.g. 1,80)") from None
    checks = [(args.scale >= 0, "--scale must be >= 0"), (0 <= lo <= hi, "--window needs 0 <= lo <= hi"),
              (args.temperature > 0, "--temperature must be > 0"), (args.max_ratio > 0, "--max-ratio must be > 0"),
              (args.num >= 1 and args.batch >= 1, "--num and --batch must be >= 1")]
    for ok, why in checks:
        if not ok:
            raise ConfigError(why)
    return GuidanceSettings(args.method, args.scale, (lo, hi), args.divergence, args.temperature, args.max_ratio)


def sample_cmd(args) -> Path:
    from engine.eval.attributes import read_images, summarise
    from engine.outputs.images import save_grid_with_captions
    from engine.sampling.debias_predictor import load_predictor
    from engine.sampling.debias_sample import generate
    from engine.training.run_folder import make_embedder
    from engine.sampling.distribution_guidance import parse_target

    g = guidance_settings(args)
    try:
        target = parse_target(args.target)
    except ValueError as e:
        raise ConfigError(f"--target {args.target!r}: {e}") from None
    cfg, model, ckpt = load(args)
    adp, bundle = load_predictor(Path(args.predictor) if args.predictor else Path(args.run) / "debias" / "predictor.pt",
                                 model)
    prompts = [p for p in args.prompt for _ in range(args.num)]
    embed = make_embedder(cfg, next(model.parameters()).device)
    images, used, rec = generate(model, cfg, embed, adp, bundle["layer"], prompts, target, g, args.seed, args.batch)
    out = Path(args.out) if args.out else Path(args.run) / "debias" / f"{g.method}_{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    save_grid_with_captions(out / "grid.png", images, used, nrow=min(args.num, 16))
    result = {"run": str(args.run), "checkpoint": str(ckpt), "layer": bundle["layer"], "target": target.tolist(),
              "prompts": args.prompt, "num": args.num, "batch": args.batch, "seed": args.seed, **g.record(), **rec,
              **summarise(read_images(images, prompts), target)}
    (out / "debias.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out}/grid.png and debias.json: FD {result['fd']['value']:.3f}, red fraction "
          f"{result['red_fraction']['mean']}, no detection {result['no_detection']['mean']:.3f}, {rec['nfe']} NFE")
    return out


def main(argv=None):
    args = parse_args(argv)
    return train(args) if args.command == "train-predictor" else sample_cmd(args)


if __name__ == "__main__":
    run_cli(main)
