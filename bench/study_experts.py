"""Split networks study (Luhman & Luhman 2022, section 4.1): two networks split by noise level against one network of
the same total training FLOPs and the same sampling cost.

    python bench/study_experts.py --out DIR [--config configs/tiny_32px.yaml] [--set ...] [--budget-steps 600]
        [--split median|loss|SIGMA] [--seeds 0 1 2]

The single arm trains the recipe for --budget-steps; the pair (model.experts, engine/training/experts.py) trains a
high-noise expert on sigma >= split and then a low-noise one on sigma < split, started from the first one's EMA, each
for half the steps: the same network, so the same FLOPs per step and, at sampling, one network evaluation per solver
step as the single one. The split point must suit the training distribution of sigma (EDM's log-normal puts only ~6%
of draws above the paper's SNR = 0.25, sigma = 2):
  median  exp(p_mean), the log-normal's median: each expert sees exactly the noise levels, and as many samples of
          each, as the single network did on its side, so any difference comes from the split alone;
  loss    where the single network's held-out EDM loss, summed over the training distribution, is split in half
          (each expert takes half of what there is to learn, by that measure);
  SIGMA   a number.
Both arms are scored by the protocol (GenEval-style, attribute FD, paired) and the held-out denoising loss, also
within each expert's range. Writes <out>/study.json, experts.png and experts.md.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_runs import (
    common_args,
    evaluate,
    finish,
    fmt_ci,
    load,
    previous,
    scores,
    start,
    train,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    p.add_argument("--split", default="median", help="median | loss | a noise level")
    return p.parse_args(argv)


def loss_balanced_split(heldout: dict) -> float:
    """The sigma below which half of the held-out EDM loss lies, over the log-normal quantiles (equal mass each),
    interpolated in log sigma."""
    sd = heldout["sigma_data"]
    losses = [(s**2 + sd**2) / (s * sd) ** 2 * m["mean"] for s, m in zip(heldout["sigmas"], heldout["mse"])]
    half, acc = sum(losses) / 2, 0.0
    for i, (s, loss) in enumerate(zip(heldout["sigmas"], losses)):
        if acc + loss >= half:
            frac = (half - acc) / loss  # how far into this quantile's mass (centred on s) the half lies
            lo = heldout["sigmas"][i - 1] if i else s
            hi = heldout["sigmas"][i + 1] if i + 1 < len(losses) else s
            edge_lo, edge_hi = math.sqrt(lo * s), math.sqrt(s * hi)
            return math.exp(math.log(edge_lo) + frac * (math.log(edge_hi) - math.log(edge_lo)))
        acc += loss
    return heldout["sigmas"][-1]


def range_losses(heldout: dict, split: float) -> dict:
    from engine.eval.denoising import weighted_loss_between

    return {"below": weighted_loss_between(heldout, None, split), "above": weighted_loss_between(heldout, split, None)}


def run_seed(args, seed: int) -> dict:
    cfg = load(args)
    steps = args.budget_steps
    single_run = train(args, f"single_seed{seed}", f"run.seed={seed}", f"train.steps={steps}",
                       f"train.ckpt_every={steps}")
    single = evaluate(args, single_run, steps, f"single_seed{seed}")
    d = cfg.diffusion
    split = {"median": lambda: math.exp(d.p_mean), "loss": lambda: loss_balanced_split(single["heldout"])}.get(
        args.split, lambda: float(args.split))()
    above = 0.5 * math.erfc((math.log(split) - d.p_mean) / (d.p_std * math.sqrt(2)))
    half = max(1, steps // 2)
    name = f"pair_seed{seed}"
    pair_run = train(args, name, f"run.seed={seed}", f"train.steps={half}", f"train.ckpt_every={half}",
                     f"model.experts=[{name}_hi, {name}_lo]", f"sample.expert_sigmas=[{split}]")
    pair = evaluate(args, pair_run, None, name)
    from engine.eval.compare import compare_pair, load_evaluation

    diff = compare_pair(load_evaluation(single["folder"]), load_evaluation(pair["folder"]))
    return {"seed": seed, "split_sigma": split, "split_rule": args.split, "train_draws_above_split": above,
            "loss_balanced_split": loss_balanced_split(single["heldout"]),
            "single": {"steps": steps, **scores(single), "by_range": range_losses(single["heldout"], split),
                       "heldout": single["heldout"], "nfe": single["eval"]["sampler"]["nfe"]},
            "pair": {"steps_each": half, **scores(pair), "by_range": range_losses(pair["heldout"], split),
                     "heldout": pair["heldout"], "nfe": pair["eval"]["sampler"]["nfe"]},
            "pair_minus_single": {"all": diff["all"], "fd_attr": diff.get("fd_attr")}}


def table(rows: list[dict]) -> str:
    lines = ["| seed | split sigma (rule) | draws above | arm | steps | GenEval all [95% CI] | attribute FD [95% CI] | "
             "held-out EDM loss [95% CI] | ... below split | ... above split | NFE |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for arm in ("single", "pair"):
            a = r[arm]
            steps = a["steps"] if arm == "single" else f"2 x {a['steps_each']}"
            split = f"{r['split_sigma']:.3f} ({r['split_rule']}) | {r['train_draws_above_split']:.1%}"
            lines.append(f"| {r['seed']} | {split} | {arm} | {steps} | "
                         f"{fmt_ci(a['geneval_all'], a['geneval_all_ci'])} | "
                         f"{fmt_ci(a['fd_attr'], a['fd_attr_ci'], 1)} | {fmt_ci(a['heldout_edm'], a['heldout_edm_ci'])}"
                         f" | {a['by_range']['below']:.3f} | {a['by_range']['above']:.3f} | {a['nfe']} |")
        d = r["pair_minus_single"]
        fd = d["fd_attr"]
        lines.append(f"| {r['seed']} | | | pair - single | | {fmt_ci(d['all']['diff'], d['all']['ci'])} | "
                     f"{fmt_ci(fd['diff'], fd['ci'], 1) if fd else 'n/a'} | | | | |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        for arm, style in (("single", "o-"), ("pair", "s--")):
            h = r[arm]["heldout"]
            ax.loglog(h["sigmas"], [m["mean"] for m in h["mse"]], style, label=f"{arm}, seed {r['seed']}")
        ax.axvline(r["split_sigma"], color="grey", lw=0.8)
    ax.set_xlabel("sigma")
    ax.set_ylabel("held-out MSE of D")
    ax.set_title("split pair vs one network at equal training FLOPs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, result = start(args, budget_steps=args.budget_steps)
    if args.report_only:
        out, result = Path(args.out), previous(args)
    else:
        result["seeds"] = [run_seed(args, s) for s in args.seeds]
    return finish(out, "experts", result, table(result["seeds"]), lambda path: plot(result["seeds"], path))


if __name__ == "__main__":
    main()
