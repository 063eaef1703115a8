"""The TiF few-shot learner on a trained run (Yue et al., CVPR 2024), with its baselines, on synthetic few-shot tasks.

    python engine/fewshot.py --run runs/tiny --shots 1 4 --seeds 3 --weighting tif uniform window:0.02,0.5

Per (K, seed): one LoRA per class trained together (saved as <adapters>/fewshot_<kind>_K<K>_seed<s>.pt, with
the hash of the weights under it), the test images' per-class errors over a sigma grid with shared noise, and every
weighting scored on the same errors. Baselines on the same shots: nearest class mean on frozen Tessera features, pixel
1-NN. Writes a JSON file: accuracy on aligned and swapped colours per K and method (mean and 95% t-interval over
seeds) and the per-sigma margin (correct minus best wrong error).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not engine/'s files, by name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from engine.config import ConfigError
from engine.training.errors import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the run's newest complete one)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 4], help="shots per class K")
    p.add_argument("--seeds", type=int, default=3, help="tasks (seeds 0 .. n-1) per K")
    p.add_argument("--weighting", nargs="+", default=["tif", "uniform"], help="tif | uniform | window:a,b")
    p.add_argument("--kind", default="shape", help="shape (circle/square/triangle) | notch (square vs notched)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--steps", type=int, default=150, help="LoRA training steps")
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--num-sigmas", type=int, default=16, help="log-spaced sigmas of the scoring grid")
    p.add_argument("--sigma-range", default="0.01,20", help="lo,hi of the scoring grid")
    p.add_argument("--delta", type=float, default=None, help="TiF ladder step (default: d / 10)")
    p.add_argument("--ladder", type=int, default=50, help="TiF ladder length J")
    p.add_argument("--out", help="JSON file (default: <run>/fewshot.json)")
    p.add_argument("--adapters", help="folder for the LoRA files (default: <run>/adapters)")
    return p.parse_args(argv)


def check(args) -> tuple[float, float]:
    from engine.adapters.fewshot_task import KINDS, MAX_SHOTS
    from engine.adapters.tif import weights

    if args.kind not in KINDS:
        raise ConfigError(f"--kind {args.kind!r} must be one of {', '.join(KINDS)}")
    if args.rank < 1:
        raise ConfigError(f"--rank {args.rank}: LoRA rank must be >= 1")
    bad = [k for k in args.shots if not 1 <= k <= MAX_SHOTS]
    if bad:
        raise ConfigError(f"--shots {bad[0]}: a task has {MAX_SHOTS} shots per class available "
                          f"(K must be 1..{MAX_SHOTS})")
    if args.seeds < 1 or args.steps < 1 or args.test_per_class < 1 or args.num_sigmas < 2:
        raise ConfigError("--seeds, --steps and --test-per-class must be >= 1 and --num-sigmas >= 2")
    try:
        lo, hi = (float(v) for v in args.sigma_range.split(","))
    except ValueError:
        raise ConfigError(f"--sigma-range {args.sigma_range!r} must be lo,hi") from None
    if not 0 < lo < hi:
        raise ConfigError(f"--sigma-range {args.sigma_range!r} needs 0 < lo < hi")
    grid = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), args.num_sigmas)
    for w in args.weighting:
        weights(w, grid, 1.0, 0.1, 2)  # raises ConfigError on a bad name or an empty window
    return lo, hi


def main(argv=None) -> Path:
    args = parse_args(argv)
    lo, hi = check(args)
    from engine.adapters.fewshot_task import make_task
    from engine.adapters.tif import (
        accuracy,
        class_distance,
        class_errors,
        classify,
        frozen_features,
        margin_by_sigma,
        nearest_class_mean,
        pixel_nn,
        seed_ci,
        train_class_loras,
        weights,
    )
    from engine.data.synthetic import synthetic_train_set
    from engine.diffusion.edm import EDM
    from engine.sampling.debias_predictor import weights_hash
    from engine.training.run_folder import load_run_model, make_embedder

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run {run}: no config.yaml there (not a run folder)")
    try:
        cfg, model, ckpt = load_run_model(run, args.checkpoint)
    except FileNotFoundError as e:
        raise ConfigError(f"--run {run}: {e}") from None
    if cfg.data.source != "synthetic" or cfg.data.channels != 3:
        raise ConfigError(f"--run {run}: few-shot tasks are rendered in pixels; this run trained on {cfg.data.source}")
    if cfg.diffusion.lowres_condition:
        raise ConfigError(f"--run {run}: a super-resolution stage (diffusion.lowres_condition) is not supported: its "
                          "condition comes from the cascade's low model")
    edm = EDM.from_config(cfg.diffusion)
    embed = make_embedder(cfg, next(model.parameters()).device)
    ds = synthetic_train_set(cfg)
    prior = (ds.images(range(256)), ds.captions(range(256)))
    sigmas = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), args.num_sigmas)
    base_hash = weights_hash(model)
    adapters = Path(args.adapters) if args.adapters else run / "adapters"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for K in args.shots:
        acc: dict[str, dict[str, list]] = {}
        margins = {"aligned": [], "swapped": []}
        for seed in range(args.seeds):
            t0 = time.time()
            task = make_task(seed, K, args.kind, args.test_per_class, cfg.data.image_size)
            torch.manual_seed(seed)
            lora = train_class_loras(model, edm, task, embed, prior, args.rank, args.steps, seed=seed)
            lora.save(adapters / f"fewshot_{args.kind}_K{K}_seed{seed}.pt", weights_hash=base_hash,
                      classes=list(task.classes), shots=K, seed=seed)
            d = class_distance(task)
            delta = args.delta if args.delta is not None else d / 10
            f_train = frozen_features(model, edm, task.shots, embed)
            for split in ("aligned", "swapped"):
                images = getattr(task, split)
                err = class_errors(model, edm, lora, images, embed, sigmas, seed)
                margins[split].append(margin_by_sigma(err, task.test_labels))
                for w in args.weighting:
                    pred = classify(err, weights(w, sigmas, d, delta, args.ladder))
                    acc.setdefault(w, {}).setdefault(split, []).append(accuracy(pred, task.test_labels))
                ncm = nearest_class_mean(f_train, task.shot_labels, frozen_features(model, edm, images, embed))
                acc.setdefault("feature_ncm", {}).setdefault(split, []).append(accuracy(ncm, task.test_labels))
                acc.setdefault("pixel_1nn", {}).setdefault(split, []).append(
                    accuracy(pixel_nn(task, images), task.test_labels))
            model.load_state_dict(state)  # nothing was merged; a guard that every task starts from the base weights
            print(f"K={K} seed={seed}: " + ", ".join(f"{m} {v['aligned'][-1]:.2f}/{v['swapped'][-1]:.2f}"
                                                     for m, v in acc.items()) + f" (aligned/swapped, d={d:.2f}, "
                  f"{time.time() - t0:.0f} s)", flush=True)
        results[f"K={K}"] = {
            "accuracy": {m: {s: seed_ci(v) for s, v in by.items()} for m, by in acc.items()},
            "margin_by_sigma": {s: torch.stack(v).mean(0).round(decimals=5).tolist() for s, v in margins.items()}}
    out = Path(args.out) if args.out else run / "fewshot.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(run), "checkpoint": str(ckpt), "kind": args.kind, "seeds": args.seeds,
                               "rank": args.rank, "steps": args.steps, "test_per_class": args.test_per_class,
                               "sigmas": sigmas.tolist(), "ladder": args.ladder, "delta": args.delta,
                               "results": results}, indent=1))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
