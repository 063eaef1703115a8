"""Patched diffusion study (Luhman & Luhman 2022): prediction target × patch size at equal training FLOPs.

    python bench/study_targets.py --out DIR [--config configs/tiny_32px.yaml] [--set diffusion.mask_ratio=0 ...]
        [--budget-steps 600] [--patches 2 4 8] [--targets eps x0 v edm] [--image-sizes 32] [--seeds 0 1 2]

Every arm trains the recipe with one diffusion.target and model.patch_size, for as many steps as the FLOP budget
buys at that patch size (the budget: --budget-steps of the patch-4 model at the recipe's batch; the engine's FLOP
counter prices each arm), with diffusion.weighting left as the recipe has it, so only the parameterisation differs.
Arms of one seed share run.seed: the same data order, noise levels, noise and masks (paired). Each final EMA is
scored by the comparison protocol (GenEval-style, attribute Fréchet distance, paired prompts and noise) and the
held-out denoising loss; per patch size, each target is compared with eps image by image (paired bootstrap CIs).
Writes <out>/study.json, targets.png and a markdown table (targets.md).

The claim checked: with large patches (p = 8 at 32 px: 192 values per token) eps-prediction degrades while x0 and v
hold; at p = 4 the gap shrinks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_runs import (
    checkpoints,
    common_args,
    evaluate,
    finish,
    fmt_ci,
    previous,
    scores,
    start,
    steps_for,
    train,
    train_flops,
)

REFERENCE_PATCH = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    p.add_argument("--patches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--targets", nargs="+", default=["eps", "x0", "v", "edm"])
    p.add_argument("--image-sizes", type=int, nargs="+", default=[32])
    return p.parse_args(argv)


def arm_overrides(size: int, patch: int, target: str, seed: int) -> list[str]:
    return [f"data.image_size={size}", f"model.patch_size={patch}", f"diffusion.target={target}", f"run.seed={seed}"]


def run_arms(args) -> list[dict]:
    arms = []
    for size in args.image_sizes:
        ref_flops, cfg = train_flops(args, f"data.image_size={size}", f"model.patch_size={REFERENCE_PATCH}")
        batch = cfg.train.global_batch
        budget = args.budget_steps * batch * ref_flops
        for seed in args.seeds:
            for patch in args.patches:
                if size % patch:
                    continue
                flops, _ = train_flops(args, *arm_overrides(size, patch, "edm", seed))
                steps = steps_for(budget, flops, batch)
                for target in args.targets:
                    name = f"s{size}_p{patch}_{target}_seed{seed}"
                    run = train(args, name, *arm_overrides(size, patch, target, seed), f"train.steps={steps}",
                                f"train.ckpt_every={steps}")
                    step = int(checkpoints(run)[-1].name.split("_")[1])
                    ev = evaluate(args, run, step, name)
                    arms.append({"name": name, "image_size": size, "patch": patch, "target": target, "seed": seed,
                                 "steps": steps, "train_flops_per_image": flops, "train_tflops": steps * batch * flops
                                 / 1e12, "tokens": (size // patch) ** 2, "values_per_token": patch * patch * 3,
                                 **scores(ev), "heldout": ev["heldout"], "eval_folder": ev["folder"]})
    return arms


def paired_vs_eps(arms: list[dict]) -> list[dict]:
    """Each target minus eps on the same seed, size and patch, image by image (engine/eval/compare.py)."""
    from engine.eval.compare import compare_pair, load_evaluation

    out = []
    for a in arms:
        base = [b for b in arms if b["target"] == "eps" and (b["image_size"], b["patch"], b["seed"]) ==
                (a["image_size"], a["patch"], a["seed"])]
        if a["target"] == "eps" or not base:
            continue
        diff = compare_pair(load_evaluation(base[0]["eval_folder"]), load_evaluation(a["eval_folder"]))
        out.append({"arm": a["name"], "vs": base[0]["name"], "all": diff["all"], "fd_attr": diff.get("fd_attr")})
    return out


def high_noise_mse(heldout: dict, lo: float = 2.0) -> float:
    """Mean held-out MSE over the noise levels >= lo (where eps errors are amplified by sigma)."""
    vals = [m["mean"] for s, m in zip(heldout["sigmas"], heldout["mse"]) if s >= lo]
    return sum(vals) / len(vals) if vals else float("nan")


def table(arms: list[dict], diffs: list[dict]) -> str:
    lines = ["| size | patch | values/token | target | seed | steps | GenEval all [95% CI] | attribute FD [95% CI] | "
             "held-out EDM loss [95% CI] | held-out MSE, sigma >= 2 | all - eps [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        d = [x for x in diffs if x["arm"] == a["name"]]
        vs = "" if not d else fmt_ci(d[0]["all"]["diff"], d[0]["all"]["ci"])
        lines.append(f"| {a['image_size']} | {a['patch']} | {a['values_per_token']} | {a['target']} | {a['seed']} | "
                     f"{a['steps']} | {fmt_ci(a['geneval_all'], a['geneval_all_ci'])} | "
                     f"{fmt_ci(a['fd_attr'], a['fd_attr_ci'], 1)} | {fmt_ci(a['heldout_edm'], a['heldout_edm_ci'])} | "
                     f"{high_noise_mse(a['heldout']):.4f} | {vs} |")
    return "\n".join(lines)


def seed_means(arms: list[dict]) -> str:
    """Per size, patch and target: the mean over seeds of the held-out EDM loss, the high-noise MSE and GenEval colour,
    each with every seed's value (seed-to-seed spread is the honest error bar across trainings; the per-arm CIs above
    are over images only)."""
    lines = ["| size | patch | target | seeds | held-out EDM loss: mean (per seed) | held-out MSE, sigma >= 2 | "
             "GenEval colour |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(a["image_size"], a["patch"], a["target"]) for a in arms})
    for size, patch, target in keys:
        group = [a for a in arms if (a["image_size"], a["patch"], a["target"]) == (size, patch, target)]
        cols = []
        for values, digits in (([a["heldout_edm"] for a in group], 3),
                               ([high_noise_mse(a["heldout"]) for a in group], 4),
                               ([a.get("geneval_colour") for a in group], 3)):
            if any(v is None for v in values):
                cols.append("n/a")
                continue
            each = ", ".join(f"{v:.{digits}f}" for v in values)
            cols.append(f"{sum(values) / len(values):.{digits}f} ({each})")
        lines.append(f"| {size} | {patch} | {target} | {len(group)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot(arms: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("geneval_all", "GenEval all-correct"), ("fd_attr", "attribute FD (lower is better)"),
               ("heldout_edm", "held-out EDM loss (lower is better)")]
    sizes = sorted({a["image_size"] for a in arms})
    colour = {t: f"C{i}" for i, t in enumerate(sorted({a["target"] for a in arms}))}
    fig, axes = plt.subplots(len(sizes), len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.4 * len(sizes)),
                             squeeze=False)
    for row, size in zip(axes, sizes):
        for ax, (key, title) in zip(row, metrics):
            for target in sorted({a["target"] for a in arms}):
                pts = [(a["patch"], a[key]) for a in arms if a["image_size"] == size and a["target"] == target
                       and a[key] is not None]
                patches = sorted({p for p, _ in pts})  # line through the seed means, each seed a dot
                means = [sum(v for p, v in pts if p == q) / sum(1 for p, _ in pts if p == q) for q in patches]
                ax.plot(patches, means, "-", color=colour[target], label=target, alpha=0.8)
                ax.plot([p for p, _ in pts], [v for _, v in pts], "o", color=colour[target], ms=4, alpha=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{size} px: {title}", fontsize=9)
            ax.set_xlabel("patch size")
        ax = row[-1]  # held-out MSE against sigma at the largest patch
        big = max(a["patch"] for a in arms if a["image_size"] == size)
        for a in (a for a in arms if a["image_size"] == size and a["patch"] == big and a["seed"] == arms[0]["seed"]):
            ax.loglog(a["heldout"]["sigmas"], [m["mean"] for m in a["heldout"]["mse"]], "o-", color=colour[a["target"]],
                      label=a["target"])
        ax.set_title(f"{size} px, patch {big}: held-out MSE of D per sigma", fontsize=9)
        ax.set_xlabel("sigma")
    axes[0][0].legend(fontsize=8)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, result = start(args, budget={"reference_patch": REFERENCE_PATCH, "steps": args.budget_steps})
    if args.report_only:
        out, result = Path(args.out), previous(args)
    else:
        result["arms"] = run_arms(args)
        result["paired_vs_eps"] = paired_vs_eps(result["arms"])
    return finish(out, "targets", result, table(result["arms"], result["paired_vs_eps"]) + "\n\n" +
                  seed_means(result["arms"]), lambda path: plot(result["arms"], path))


if __name__ == "__main__":
    main()
