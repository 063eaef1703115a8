"""Debiasing study: every method on the same colour-free prompts, seeds and paired noise, at equal NFE.

    python bench/study_debias.py --run RUN --out DIR --seeds 3 --num 128 --batch 64 \
        --method none --method prompt --method sample:4 --method distribution:1 --method distribution:4@1,80

A method is none | prompt | sample:SCALE | distribution:SCALE, optionally @LO,HI for the sigma window and /kl for
KL(target || p) instead of chi-squared. Writes
study.json (per method: pooled summary with 95% bootstrap CIs over images, per-seed FD and red fraction, NFE) and
study.md (the table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.eval.attributes import fairness_discrepancy, read_images, summarise  # noqa: E402
from engine.sampling.debias_predictor import load_predictor  # noqa: E402
from engine.sampling.debias_sample import GuidanceSettings, generate  # noqa: E402
from engine.sampling.distribution_guidance import parse_target  # noqa: E402
from engine.training.run_folder import load_run_model, make_embedder  # noqa: E402


def parse_method(text: str, temperature: float, max_ratio: float) -> GuidanceSettings:
    """none | prompt | sample:SCALE | distribution:SCALE, then optionally @LO,HI (sigma window) and /kl."""
    text, _, div = text.partition("/")
    name, _, rest = text.partition(":")
    scale, _, window = rest.partition("@")
    lo, hi = (float(v) for v in window.split(",")) if window else (0.0, float("inf"))
    return GuidanceSettings(name, float(scale or 0), (lo, hi), div or "chi2", temperature, max_ratio)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--target", default="uniform")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num", type=int, default=128, help="images per seed (prompts cycled)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--method", action="append", required=True)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-ratio", type=float, default=0.2)
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's sample.steps), the same for all")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg, model, ckpt = load_run_model(Path(args.run), None)
    if args.steps:
        cfg.sample.steps = args.steps
    adp, bundle = load_predictor(Path(args.run) / "debias" / "predictor.pt", model)
    embed = make_embedder(cfg, next(model.parameters()).device)
    target = parse_target(args.target)
    base = args.prompt or ["a circle", "a square", "a triangle"]
    prompts = [base[i % len(base)] for i in range(args.num)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for m in args.method:
        g = parse_method(m, args.temperature, args.max_ratio)
        t0, records, per_seed, nfe = time.time(), [], [], None
        for seed in range(args.seeds):
            images, used, rec = generate(model, cfg, embed, adp, bundle["layer"], prompts, target, g, seed, args.batch)
            r = read_images(images, prompts)
            records += r
            colours = [x["colour"] for x in r]
            per_seed.append({"seed": seed, "fd": round(fairness_discrepancy(colours, target), 4),
                             "red_fraction": round(np.mean([c == "red" for c in colours if c is not None]), 4)})
            nfe = rec["nfe"]
            if seed == 0:
                from engine.outputs.images import save_grid_with_captions
                save_grid_with_captions(out / f"{m.replace(':', '_').replace('@', '_w').replace('/', '_')}.png", images[:32], used[:32],
                                        nrow=8)
        results[m] = {**g.record(), "nfe": nfe, "seconds": round(time.time() - t0, 1), "per_seed": per_seed,
                      **summarise(records, target)}
        s = results[m]
        print(f"{m:>28}: FD {s['fd']['value']:.3f} {s['fd']['ci']} red {s['red_fraction']['mean']:.3f} "
              f"nodet {s['no_detection']['mean']:.3f} fg {s['foreground']['mean']:.3f} "
              f"objects {s['objects']['mean']:.2f} shape {s['shape']['mean']:.3f} count {s['count']['mean']:.3f} "
              f"per-seed FD {[x['fd'] for x in per_seed]} ({s['seconds']} s)", flush=True)
        (out / "study.json").write_text(json.dumps({"run": args.run, "checkpoint": str(ckpt), "layer": bundle["layer"],
                                                    "target": target.tolist(), "prompts": base, "seeds": args.seeds,
                                                    "num_per_seed": args.num, "batch": args.batch,
                                                    "steps": cfg.sample.steps, "cfg_scale": cfg.sample.cfg_scale,
                                                    "temperature": args.temperature, "max_ratio": args.max_ratio,
                                                    "methods": results}, indent=1))
    write_table(out, results)


def write_table(out: Path, results: dict) -> None:
    def ci(d, key="mean"):
        return f"{d[key]:.3f} ({d['ci'][0]:.3f}-{d['ci'][1]:.3f})"

    rows = ["| method | FD | red fraction | no detection | foreground | shape | count | NFE | colour histogram |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m, s in results.items():
        hist = " ".join(f"{k[:2]} {v:.2f}" for k, v in s["histogram"].items())
        rows.append(f"| {m} | {ci(s['fd'], 'value')} | {ci(s['red_fraction'])} | {ci(s['no_detection'])} | "
                    f"{ci(s['foreground'])} | {ci(s['shape'])} | {ci(s['count'])} | {s['nfe']} | {hist} |")
    (out / "study.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
