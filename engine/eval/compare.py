"""Paired comparison of evaluations made with the same protocol (engine/evaluate.py --compare).

Each evaluation folder holds eval.json, the per-image GenEval-style records (geneval.jsonl) and the per-image
attribute features of the generated and the paired reference images. Two evaluations of the same prompt set with the
same noise are compared image by image: for each metric, the mean of (B - A) over images with a bootstrap CI that
resamples images (the same resamples for every metric), and for the Fréchet distance the difference of the two
distances recomputed on each resample. A series of evaluations (checkpoints of one run, NFEs of one sampler) is
compared each against the first and plotted against its step or NFE.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import ConfigError
from engine.eval.attribute_net import frechet_of_features
from engine.eval.protocol import bootstrap_indices, percentile_ci
from engine.eval.replicates import compare_replicates
from engine.eval.structure_gap import STATISTICS

METRICS = ("colour", "shape", "count", "position", "all")
FD_RESAMPLES = 200


@dataclass
class Evaluation:
    folder: Path
    record: dict  # eval.json
    per_image: dict[str, np.ndarray]  # metric -> (N,) float with NaN where the metric does not apply
    features: np.ndarray | None  # (N, D) attribute features of the generated images
    reference: np.ndarray | None  # (N, D) of the paired reference images

    @property
    def label(self) -> str:
        return self.record.get("label") or str(self.folder)


def load_evaluation(folder: str | Path) -> Evaluation:
    folder = Path(folder)
    if not (folder / "eval.json").is_file():
        raise ConfigError(f"--compare {folder}: no eval.json there (give an evaluation folder, or a run folder to "
                         "evaluate)")
    record = json.loads((folder / "eval.json").read_text())
    n = record["num_images"]
    per_image = {m: np.full(n, np.nan) for m in METRICS}
    if (folder / "geneval.jsonl").is_file():
        for line in (folder / "geneval.jsonl").read_text().splitlines():
            rec = json.loads(line)
            for m in METRICS:
                if rec.get(m) is not None:
                    per_image[m][rec["index"]] = float(rec[m])
    feats = folder / "features_attr.npy"
    ref = folder / "reference_attr.npy"
    return Evaluation(folder, record, per_image, np.load(feats) if feats.is_file() else None,
                      np.load(ref) if ref.is_file() else None)


def check_comparable(a: Evaluation, b: Evaluation) -> None:
    """Paired differences need identical inputs: refuse evaluations that differ in any of them, naming it."""
    def get(e, *keys):
        v = e.record
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    for keys, what in [(("image_size",), "image size"), (("num_images",), "image count"),
                       (("prompts", "sha256"), "prompt set"), (("noise", "seed"), "noise seed"),
                       (("metrics", "fd_attr", "extractor"), "attribute feature extractor")]:
        va, vb = get(a, *keys), get(b, *keys)
        if va != vb:
            raise ConfigError(f"--compare: {a.folder} and {b.folder} differ in {what} ({va!r} vs {vb!r}); paired "
                             "comparison needs the same prompts, noise, image size and count")


def paired_difference(a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> dict:
    """Mean of b - a over the images where both apply, with the bootstrap CI of that mean."""
    diff = b - a
    ok = ~np.isnan(diff)
    if not ok.any():
        return {"a": None, "b": None, "diff": None, "ci": None, "n": 0}
    d = np.where(ok, diff, 0.0)
    counts = ok[idx].sum(axis=1)
    boot = d[idx].sum(axis=1) / np.maximum(counts, 1)
    return {"a": float(np.nanmean(a)), "b": float(np.nanmean(b)), "diff": float(d[ok].mean()),
            "ci": list(percentile_ci(boot)), "n": int(ok.sum())}


def fd_difference(a: Evaluation, b: Evaluation, resamples: int = FD_RESAMPLES, seed: int = 0,
                  statistic=frechet_of_features) -> dict | None:
    """Fréchet distance (or another statistic of generated vs reference features) of each to the paired reference
    images, and B - A with a paired bootstrap CI."""
    if a.features is None or b.features is None or a.reference is None:
        return None
    n = len(a.features)

    def fd(e: Evaluation, i: np.ndarray) -> float:
        return statistic(e.features[i], a.reference[i])

    everything = np.arange(n)
    boot = np.array([fd(b, i) - fd(a, i) for i in bootstrap_indices(n, resamples, seed)])
    fa, fb = fd(a, everything), fd(b, everything)
    return {"a": fa, "b": fb, "diff": fb - fa, "ci": list(percentile_ci(boot)), "n": n, "resamples": resamples}


def compare_pair(a: Evaluation, b: Evaluation, seed: int = 0) -> dict:
    check_comparable(a, b)
    n = a.record["num_images"]
    idx = bootstrap_indices(n, seed=seed)
    out = {m: paired_difference(a.per_image[m], b.per_image[m], idx) for m in METRICS}
    fd = fd_difference(a, b, seed=seed)
    if fd is not None:
        out["fd_attr"] = fd
        for name, statistic in STATISTICS.items():  # pairwise structure in the same feature space
            out[name] = fd_difference(a, b, seed=seed, statistic=statistic)
    return out


def compare_arms(a: list[Evaluation], b: list[Evaluation], seed: int = 0) -> dict:
    """Arm B against arm A, each one evaluation or several of one recipe trained with seeds paired by position
    (engine/eval/replicates.py); one seed per arm is compare_pair."""
    if len(a) == len(b) == 1:
        return compare_pair(a[0], b[0], seed)  # which checks the pair
    for e in (*a[1:], *b):
        check_comparable(a[0], e)
    return compare_replicates(a, b, METRICS, FD_RESAMPLES, seed)


def compare_folders(args, evaluate_run) -> dict:
    """engine/evaluate.py --compare: every item is an evaluation folder or a run folder, which is evaluated first with
    the command's settings, or several of them joined by commas: the same recipe trained with different seeds, paired
    by position with the other items' (engine/eval/replicates.py). All checks (folders exist, image sizes agree,
    evaluations are comparable, every item has as many seeds) come before any evaluation or file is written."""
    import copy

    from engine.config import load_config

    groups = [[Path(p) for p in item.split(",")] for item in args.compare]
    if len({len(g) for g in groups}) > 1:
        raise ConfigError("--compare: items of " + " and ".join(sorted({str(len(g)) for g in groups}))
                          + " comma-joined folders; replicates are paired by position, so every item needs as many")
    items, sizes, given = [p for g in groups for p in g], {}, []
    for p in items:
        if (p / "eval.json").is_file():
            e = load_evaluation(p)
            sizes[p] = tuple(e.record["image_size"])
            given.append(e)
        elif (p / "config.yaml").is_file():
            size = load_config(p / "config.yaml").data.image_size
            sizes[p] = (size, size)
        else:
            raise ConfigError(f"--compare {p}: neither an evaluation folder (eval.json) nor a run folder (config.yaml)")
    if len(set(sizes.values())) > 1:
        (a, sa), (b, sb) = [(p, s) for p, s in sizes.items() if s != next(iter(sizes.values()))][:1] + \
            [next(iter(sizes.items()))]
        raise ConfigError(f"--compare: {b} makes {sb[0]}x{sb[1]} images but {a} makes {sa[0]}x{sa[1]}; images of "
                          "different sizes cannot be compared pairwise")
    for e in given[1:]:
        check_comparable(given[0], e)
    evaluated = {}
    for p in items:
        if (p / "eval.json").is_file():
            evaluated[p] = p
        else:
            one = copy.copy(args)
            one.run, one.out, one.compare = str(p), None, None
            evaluated[p] = Path(evaluate_run(one)["folder"])
    result = compare([[evaluated[p] for p in g] for g in groups], Path(args.out or "compare"), args.x)
    print(table(result))
    return result


def x_value(e: Evaluation, x: str):
    if x == "step":
        return e.record.get("step")
    if x == "nfe":
        return e.record.get("sampler", {}).get("nfe")
    return None


def compare(folders: list, out: Path, x: str = "step") -> dict:
    """Compare every evaluation with the first; write compare.json, compare.md and (for a series of single runs)
    compare.png. An entry of `folders` may be a list: one arm's evaluations of runs trained with seeds paired by
    position with the other entries' (engine/eval/replicates.py)."""
    groups = [[load_evaluation(f) for f in (entry if isinstance(entry, (list, tuple)) else [entry])]
              for entry in folders]
    name = lambda g: ",".join(str(e.folder) for e in g)
    base = groups[0]
    rows = [{"folder": name(g), "step": g[0].record.get("step"), "nfe": g[0].record.get("sampler", {}).get("nfe"),
             "seeds": len(g), "vs_first": compare_arms(base, g)} for g in groups[1:]]
    result = {"baseline": name(base), "x": x, "seeds": len(base), "comparisons": rows,
              "protocol": {k: base[0].record.get(k) for k in ("prompts", "noise", "num_images", "image_size")}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compare.md").write_text(table(result) + "\n")
    if len(groups) >= 2 and len(base) == 1:
        plot_series([g[0] for g in groups], rows, out / "compare.png", x)
    return result


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table(result: dict) -> str:
    """Markdown: one row per (evaluation, metric) with A, B, B - A and its 95% CI; with replicates, A and B are means
    over seeds and a last column holds each seed pair's B - A."""
    seeds = result.get("seeds", 1) > 1
    head = "| B | metric | A | B | B - A | 95% CI |" + (" per seed pair |" if seeds else "")
    lines = [f"baseline A = {result['baseline']}" + (f" ({result['seeds']} seeds per arm, paired)" if seeds else ""),
             "", head, "|---" * (head.count("|") - 1) + "|"]
    for row in result["comparisons"]:
        for metric, d in row["vs_first"].items():
            ci = "n/a" if d["ci"] is None else f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
            diff = "n/a" if d["diff"] is None else f"{d['diff']:+.3f}"
            line = f"| {row['folder']} | {metric} | {_fmt(d['a'])} | {_fmt(d['b'])} | {diff} | {ci} |"
            if seeds:
                line += " " + (", ".join(f"{v:+.3f}" for v in d["per_pair"]) if d.get("per_pair") else "n/a") + " |"
            lines.append(line)
    return "\n".join(lines)


def plot_series(evals: list[Evaluation], rows: list[dict], path: Path, x: str) -> None:
    """GenEval-style means (with bootstrap CIs) and the attribute Fréchet distance against step or NFE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.eval.protocol import mean_ci

    xs = [x_value(e, x) for e in evals]
    if any(v is None for v in xs):
        xs, x = list(range(len(evals))), "evaluation"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in ("colour", "shape", "count", "all"):
        stats = [mean_ci(e.per_image[m][~np.isnan(e.per_image[m])]) for e in evals]
        means = np.array([s["mean"] if s["mean"] is not None else np.nan for s in stats])
        err = np.array([[s["mean"] - s["ci"][0], s["ci"][1] - s["mean"]] if s["ci"] else [0, 0] for s in stats]).T
        ax1.errorbar(xs, means, yerr=err, marker="o", capsize=3, label=m)
    ax1.set(xlabel=x, ylabel="GenEval-style accuracy", ylim=(0, 1))
    ax1.legend()
    fds = [evals[0].record.get("metrics", {}).get("fd_attr", {}).get("value")]
    fds += [r["vs_first"].get("fd_attr", {}).get("b") for r in rows]
    if any(v is not None for v in fds):
        ax2.plot(xs, [np.nan if v is None else v for v in fds], marker="o")
    ax2.set(xlabel=x, ylabel="attribute Fréchet distance")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
