"""Nested multi-resolution (Matryoshka) study: a single-resolution baseline, progressive nested training and nested
training from scratch, at equal total training FLOPs, scored against cumulative FLOPs.

    python bench/study_matryoshka.py --out DIR [--config configs/tiny_32px.yaml] [--set ...] [--budget-steps 600]
        [--low 16] [--high 32] [--outer Outer_Nano_4] [--phase1-share 0.5] [--eval-every 50] [--seeds 0 1 2]

Arms of one seed (same run.seed: same data order and draws where the shapes agree):
  baseline     the recipe at --high px, --budget-steps steps: the FLOP budget;
  progressive  phase 1: the recipe's model at --low px on the data average-pooled to it (diffusion.resolutions=[low])
               for --phase1-share of the budget; phase 2: the nested model (model.outer around it) with phase 1's
               final checkpoint loaded into its inner model (train.init_prefix=inner., strict), for the rest;
  scratch      the nested model from scratch for the whole budget.
Each arm checkpoints every --eval-every baseline-steps' worth of FLOPs, and every checkpoint is scored by the
comparison protocol (GenEval-style and the attribute Fréchet distance, paired prompts and noise, at --high px:
phase 1's images are upsampled) and the held-out denoising loss (at --high px; phase 1's is at --low px and left out
of that plot). Cumulative FLOPs are the engine's count (both streams of a nested model). The claim checked:
progressive nested training reaches the baseline's final score with clearly fewer FLOPs (<= 60% is convincing).
Writes <out>/study.json, matryoshka.png and matryoshka.md.
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

METRICS = {"geneval_all": max, "fd_attr": min, "heldout_edm": min}  # and which way is better


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    p.add_argument("--low", type=int, default=16)
    p.add_argument("--high", type=int, default=32)
    p.add_argument("--outer", default="Outer_Nano_4", help="model.outer of the nested arms")
    p.add_argument("--phase1-share", type=float, default=0.5, help="share of the budget spent in phase 1")
    p.add_argument("--eval-every", type=int, default=50, help="checkpoint spacing, in baseline steps' FLOPs")
    p.add_argument("--arms", nargs="+", default=["baseline", "progressive", "scratch"])
    return p.parse_args(argv)


def nested_keys(args) -> list[str]:
    return [f"diffusion.resolutions=[{args.low}, {args.high}]", f"model.outer={args.outer}"]


def curve(args, run: Path, label: str, flops_per_step: float, offset: float, stage: str) -> list[dict]:
    """Every checkpoint of `run` scored, at its cumulative training TFLOP."""
    points = []
    for ckpt in checkpoints(run):
        step = int(ckpt.name.split("_")[1])
        ev = evaluate(args, run, step, f"{label}_step{step:06d}")
        points.append({"stage": stage, "step": step, "tflops": (offset + step * flops_per_step) / 1e12,
                       **scores(ev), "heldout_resolution": ev["heldout"]["resolution"]})
    return points


def run_seed(args, seed: int) -> dict:
    # every arm without a pixel head: the nested model has none, so the single-stream arms go without the recipe's
    size = [f"data.image_size={args.high}", "model.pixel_head=0"]
    base_flops, cfg = train_flops(args, *size)
    batch = cfg.train.global_batch
    budget = args.budget_steps * batch * base_flops
    every = args.eval_every * batch * base_flops  # FLOPs between checkpoints
    keep = ["train.keep_checkpoints=100000", f"run.seed={seed}", *size]
    arms = {}

    def run_arm(name: str, flops: float, share: float, *keys: str, offset: float = 0.0, stage: str = "") -> list:
        steps = steps_for(budget * share, flops, batch)
        ckpt_every = max(1, steps_for(every, flops, batch))
        run = train(args, f"{name}_seed{seed}", *keep, *keys, f"train.steps={steps}", f"train.ckpt_every={ckpt_every}")
        return curve(args, run, f"{name}_seed{seed}", flops * batch, offset, stage or name), steps, run

    if "baseline" in args.arms:
        arms["baseline"], _, _ = run_arm("baseline", base_flops, 1.0)
    nested_flops, _ = train_flops(args, *size, *nested_keys(args))
    if "progressive" in args.arms:
        low_flops, _ = train_flops(args, *size, f"diffusion.resolutions=[{args.low}]")
        p1, steps1, run1 = run_arm("prog1", low_flops, args.phase1_share, f"diffusion.resolutions=[{args.low}]",
                                   stage="phase 1")
        used = steps1 * batch * low_flops
        init = f"train.init_from={run1 / 'checkpoints' / f'step_{steps1:08d}'}"
        p2, _, _ = run_arm("prog2", nested_flops, 1 - used / budget, *nested_keys(args), init,
                           "train.init_prefix=inner.", offset=used, stage="phase 2")
        arms["progressive"] = p1 + p2
    if "scratch" in args.arms:
        arms["scratch"], _, _ = run_arm("scratch", nested_flops, 1.0, *nested_keys(args))
    return {"seed": seed, "budget_tflops": budget / 1e12,
            "train_mflops_per_image": {"baseline": base_flops / 1e6, "nested": nested_flops / 1e6},
            "arms": arms, "reach": reach(arms)}


def reach(arms: dict) -> dict:
    """For each arm and metric, the first cumulative TFLOP at which it is as good as the baseline's final value, and
    that as a share of the baseline's budget (None: never within the budget)."""
    if "baseline" not in arms:
        return {}
    base = arms["baseline"][-1]
    out = {}
    for name, points in arms.items():
        out[name] = {}
        for metric, better in METRICS.items():
            target = base[metric]
            if target is None or (metric == "geneval_all" and target <= 0):
                out[name][metric] = {"tflops": None, "share_of_budget": None, "note": "the baseline ends at 0"}
                continue
            hit = [p for p in points if p[metric] is not None and better(p[metric], target) == p[metric]
                   and (metric != "heldout_edm" or p["stage"] != "phase 1")]
            first = hit[0]["tflops"] if hit else None
            out[name][metric] = {"tflops": first, "share_of_budget": None if first is None else first / base["tflops"]}
    return out


def table(rows: list[dict]) -> str:
    lines = ["| seed | arm | stage | step | TFLOP | GenEval all [95% CI] | attribute FD [95% CI] | held-out EDM loss "
             "(res) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, points in r["arms"].items():
            for p in points:
                fd = fmt_ci(p['fd_attr'], p['fd_attr_ci'], 1)
                lines.append(f"| {r['seed']} | {name} | {p['stage']} | {p['step']} | {p['tflops']:.2f} | "
                             f"{fmt_ci(p['geneval_all'], p['geneval_all_ci'])} | {fd}"
                             f" | {fmt_ci(p['heldout_edm'], p['heldout_edm_ci'])} ({p['heldout_resolution']}) |")
    lines += ["", "| seed | arm | metric | first TFLOP at the baseline's final value | share of the budget |",
              "|---|---|---|---|---|"]
    for r in rows:
        for name, metrics in r["reach"].items():
            for metric, v in metrics.items():
                share = v.get("note") or ("never" if v["share_of_budget"] is None else f"{v['share_of_budget']:.0%}")
                tf = "n/a" if v["tflops"] is None else f"{v['tflops']:.2f}"
                lines.append(f"| {r['seed']} | {name} | {metric} | {tf} | {share} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"geneval_all": "GenEval all-correct", "fd_attr": "attribute FD (lower is better)",
              "heldout_edm": "held-out EDM loss at full size (lower is better)"}
    fig, axes = plt.subplots(1, len(titles), figsize=(5 * len(titles), 3.8))
    colours = {"baseline": "C0", "progressive": "C1", "scratch": "C2"}
    for ax, (metric, title) in zip(axes, titles.items()):
        for r in rows:
            for name, points in r["arms"].items():
                pts = [p for p in points if p[metric] is not None
                       and not (metric == "heldout_edm" and p["stage"] == "phase 1")]  # phase 1's is at low res
                ax.plot([p["tflops"] for p in pts], [p[metric] for p in pts], "o-", ms=3, color=colours.get(name),
                        alpha=0.8, label=f"{name}, seed {r['seed']}")
                low = [p for p in pts if p["stage"] == "phase 1"]
                if low:  # phase 1: images of the low resolution, upsampled
                    ax.plot([p["tflops"] for p in low], [p[metric] for p in low], "o", ms=6, mfc="white",
                            color=colours.get(name), label=f"{name} phase 1 (low res, upsampled), seed {r['seed']}")
        ax.set_xlabel("cumulative training TFLOP")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, result = start(args, low=args.low, high=args.high, outer=args.outer, phase1_share=args.phase1_share,
                        budget_steps=args.budget_steps)
    if args.report_only:
        out, result = Path(args.out), previous(args)
    else:
        result["seeds"] = [run_seed(args, s) for s in args.seeds]
    return finish(out, "matryoshka", result, table(result["seeds"]), lambda path: plot(result["seeds"], path))


if __name__ == "__main__":
    main()
