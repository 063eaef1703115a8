"""SADM fine-tuning study: held-out denoising loss of several runs on the same images and noise, and a summary of
their evaluations (engine/evaluate.py eval.json / --compare) over seeds.

    python bench/study_sadm.py loss --runs A B ... --out DIR      # held-out EDM loss, paired with A, 95% CIs
    python bench/study_sadm.py summary --evals GROUP=E1,E2,E3 ... --out DIR   # per-group means over seeds

loss: the final EMA model of each run denoises the same held-out images (SyntheticShapes, engine/eval/protocol.py's
held-out seed) at the same noise levels and noise (drawn from the runs' training distribution, no masking, captions
kept): the mean EDM-weighted error per image, and each run minus the first with a percentile bootstrap over images.
summary: the per-seed values of GenEval-style scores, attribute FD and the structure gaps of each group's
evaluations, their mean and their min..max over seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch


def heldout_losses(run: Path, num_images: int, batch: int, seed: int) -> np.ndarray:
    """(num_images,) EDM loss per held-out image of the run's final EMA model."""
    from engine.data.synthetic import SyntheticShapes
    from engine.diffusion.edm import EDM
    from engine.diffusion.noise import draw_step_noise
    from engine.eval.protocol import HELD_OUT_SEED
    from engine.training.run_folder import embed_captions, load_run_model

    cfg, model, _ = load_run_model(run, None, use_ema=True)
    edm = EDM.from_config(cfg.diffusion)
    ds = SyntheticShapes(num_images, cfg.data.image_size, HELD_OUT_SEED, cfg.data.backgrounds)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    out = []
    with torch.no_grad():
        for k, lo in enumerate(range(0, num_images, batch)):
            idx = list(range(lo, min(num_images, lo + batch)))
            x0 = ds.images(idx)
            y, y_mask = embed_captions(cfg, ds.captions(idx), x0.device)
            n = draw_step_noise(edm, seed, k, len(idx), shape, model.cfg.num_patches, 0.0, 0.0, x0.device)
            x_noisy = x0 + n.noise * n.sigma.view(-1, 1, 1, 1)
            denoised = edm.denoise_tokens(model, x_noisy, n.sigma, y, y_mask)  # (B, N, P)
            err = (denoised - model.patchify(x0)) ** 2
            out.append((edm.loss_weight(n.sigma).view(-1, 1, 1) * err).mean(dim=(1, 2)).numpy())
    return np.concatenate(out)


def loss_study(args) -> dict:
    from engine.eval.protocol import bootstrap_indices, percentile_ci

    losses = {str(r): heldout_losses(Path(r), args.num_images, args.batch_size, args.seed) for r in args.runs}
    base = losses[str(args.runs[0])]
    idx = bootstrap_indices(len(base))
    rows = {}
    for run, v in losses.items():
        rel = (v - base).mean() / base.mean()
        boot = (v - base)[idx].mean(1) / base[idx].mean(1)
        rows[run] = {"loss": float(v.mean()), "vs_first_rel": float(rel), "ci": list(percentile_ci(boot))}
        print(f"{run}: held-out loss {v.mean():.4f}, vs first {100 * rel:+.2f}% "
              f"[{100 * rows[run]['ci'][0]:+.2f}, {100 * rows[run]['ci'][1]:+.2f}]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "losses.npz", **{Path(r).name: v for r, v in losses.items()})  # per image, for other pairings
    return {"baseline": str(args.runs[0]), "num_images": args.num_images, "noise_seed": args.seed, "runs": rows}


def metric_values(eval_json: Path) -> dict:
    m = json.loads(eval_json.read_text())["metrics"]
    out = {f"geneval_{k}": m["geneval"][k] for k in ("colour", "shape", "count", "position", "all")}
    for k in ("fd_attr", "struct_attr", "pdist_w1"):
        if k in m:
            out[k] = m[k]["value"]
    return out


def summary(args) -> dict:
    groups = {}
    for spec in args.evals:
        name, _, folders = spec.partition("=")
        per_seed = [metric_values(Path(f) / "eval.json") for f in folders.split(",")]
        groups[name] = {k: {"mean": float(np.mean([p[k] for p in per_seed])),
                            "min": float(np.min([p[k] for p in per_seed])),
                            "max": float(np.max([p[k] for p in per_seed])),
                            "per_seed": [p[k] for p in per_seed]} for k in per_seed[0] if per_seed[0][k] is not None}
    keys = list(next(iter(groups.values())))
    print("| group | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, g in groups.items():
        print(f"| {name} | " + " | ".join(f"{g[k]['mean']:.3f} ({g[k]['min']:.3f}..{g[k]['max']:.3f})" for k in keys)
              + " |")
    return groups


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    lp = sub.add_parser("loss")
    lp.add_argument("--runs", nargs="+", required=True)
    lp.add_argument("--num-images", type=int, default=512)
    lp.add_argument("--batch-size", type=int, default=128)
    lp.add_argument("--seed", type=int, default=12345, help="noise seed of the held-out loss (same for every run)")
    sp = sub.add_parser("summary")
    sp.add_argument("--evals", nargs="+", required=True, help="NAME=evalfolder,evalfolder,...")
    for q in (lp, sp):
        q.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = loss_study(args) if args.part == "loss" else summary(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.part}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
