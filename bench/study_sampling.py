"""Sampling study of a trained synthetic run: solvers x schedules x NFE against a 500-step Heun reference, and the
initial-step model (SingDiffusion) against pure-noise and mean-image starts. Writes <out>/study.json and plots.

    python bench/study_sampling.py --run runs/X --out DIR --part steps                 # solvers and time steps
    python bench/study_sampling.py --run runs/DATA --sing-run runs/INIT --out DIR --part init

Every setting samples the same held-out prompts (SyntheticShapes, seed run.seed + 1e6, as engine/evaluate.py) from
the same noise (paired). steps: RMSE and PSNR of each image against the reference (Heun on 500 Karras points, 999
NFE, same noise and guidance), GenEval-style all-correct, a Fréchet distance on 8x8-pooled pixels against the
prompts' own data images, and the optimization time of each optimized schedule; optimized vs Karras as the paired
ratio of mean RMSE, and all-correct as paired differences against Karras and against the many-step Heun. init:
per-image per-channel mean of each image minus its paired data image's (brightness bias), the median pixel
(background level) and GenEval-style all-correct, per background of the prompted-backgrounds data.
95% intervals: a percentile bootstrap over images (`bootstrap`), to be swapped for the comparison protocol's.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

SOLVER_SETS = {  # name -> sample.* keys
    "heun": dict(solver="heun"),
    "dpmpp2m": dict(solver="dpmpp", order=2, dpmpp_variant="midpoint"),
    "dpmpp3m": dict(solver="dpmpp", order=3, dpmpp_variant="midpoint"),
    "dpmpp3m_lagrange": dict(solver="dpmpp", order=3, dpmpp_variant="lagrange"),
    "unipc2_bh2": dict(solver="unipc", order=2, unipc_variant="bh2"),
    "unipc3_bh1": dict(solver="unipc", order=3, unipc_variant="bh1"),
    "unipc3_bh2": dict(solver="unipc", order=3, unipc_variant="bh2"),
}
SCHEDULE_SETS = {
    "karras": dict(schedule="karras"), "logsnr": dict(schedule="logsnr"), "uniform": dict(schedule="uniform"),
    "opt_p1": dict(schedule="optimized", stepopt_power=1), "opt_p2": dict(schedule="optimized", stepopt_power=2),
}
INIT_SETS = {
    "noise": dict(init="noise"), "data_mean": dict(init="data_mean"),
    "sing": dict(init="sing", sing_guidance="normalized"), "sing_plain": dict(init="sing", sing_guidance="plain"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", "--run", dest="run", required=True,
                   help="run folder of a model trained on the synthetic data")
    p.add_argument("--out", required=True, help="output folder (study.json, steps.png, init.png)")
    p.add_argument("--part", choices=["steps", "init", "all"], default="steps")
    p.add_argument("--num-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cfg", type=float, help="guidance scale (default: the run's sample.cfg_scale)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10])
    p.add_argument("--solvers", nargs="+", default=list(SOLVER_SETS), choices=list(SOLVER_SETS))
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULE_SETS), choices=list(SCHEDULE_SETS))
    p.add_argument("--lower-order-final", default="always")
    p.add_argument("--reference-steps", type=int, default=500, help="Heun reference: Karras points (+ 0)")
    p.add_argument("--heun-baseline-nfe", type=int, default=60, help="the many-step baseline GenEval is held to")
    p.add_argument("--sing-run", help="init part: the initial-step run (diffusion.objective=init_step)")
    p.add_argument("--sigma-max", type=float, nargs="+", default=[80.0, 40.0, 20.0, 10.0])
    p.add_argument("--init-nfe", type=int, nargs="+", default=[10, 30])
    p.add_argument("--init-solver", default="dpmpp2m", choices=list(SOLVER_SETS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 thrash on a shared 2-core machine)")
    return p.parse_args(argv)


def bootstrap(values, stat=np.mean, n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of stat(values) over images resampled with replacement. values: (N,) or (K, N) of
    paired rows (stat gets the resampled rows)."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.shape[-1], size=(n, v.shape[-1]))
    stats = [stat(v[..., i]) for i in idx]
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def ratio_of_means(rows) -> float:
    return float(np.mean(rows[0]) / np.mean(rows[1]))


class Study:
    """One run's model, prompts, paired data images and noise; `generate` samples them with sample.* overrides."""

    def __init__(self, args, run: str):
        from engine.data.synthetic import SyntheticShapes
        from engine.data.train_data import load_text_encoder
        from engine.diffusion.edm import EDM
        from engine.eval.geneval import spec_from_describe
        from engine.training.run_folder import load_run_model

        self.args, self.run = args, Path(run)
        self.cfg, self.model, self.ckpt = load_run_model(self.run, None, use_ema=True)
        if self.cfg.data.source != "synthetic":
            raise SystemExit(f"--run {run}: the study needs a run trained on the synthetic data")
        self.device = next(self.model.parameters()).device
        self.edm = EDM.from_config(self.cfg.diffusion)
        d = self.cfg.data
        ds = SyntheticShapes(args.num_images, d.image_size, self.cfg.run.seed + 1_000_000, d.backgrounds)
        idx = range(args.num_images)
        self.prompts, self.data = ds.captions(idx), ds.images(idx)  # data: (N, 3, H, W) in [-1, 1]
        self.facts = [ds.describe(i) for i in idx]
        self.specs = [spec_from_describe(f) for f in self.facts]
        self.y, self.mask = load_text_encoder(self.cfg).encode(self.prompts)
        self.cfg_scale = self.cfg.sample.cfg_scale if args.cfg is None else args.cfg

    def settings(self, sample_keys: dict, sigma_max: float | None = None):
        from engine.sampling.settings import SamplerSettings

        cfg = copy.deepcopy(self.cfg)
        fixed = {"cfg_scale": self.cfg_scale, "lower_order_final": self.args.lower_order_final}
        for k, v in {**sample_keys, **fixed}.items():
            setattr(cfg.sample, k, v)
        if sigma_max is not None:
            cfg.diffusion.sigma_max = sigma_max
        return SamplerSettings.from_config(cfg.validate(), cache_dir=str(self.run.parent / ".cache")), cfg

    @torch.no_grad()
    def generate(self, sample_keys: dict, sigma_max: float | None = None) -> tuple[torch.Tensor, dict, float]:
        """(images (N, 3, H, W) clamped to [-1, 1], sampler record, seconds)."""
        from engine.sampling.sampler import build_sampler, sample
        from engine.training.seeding import derive_seed

        settings, cfg = self.settings(sample_keys, sigma_max)
        t0 = time.perf_counter()
        sampler = build_sampler(settings, cfg, self.device)
        out, bs, nfe = [], self.args.batch_size, 0
        for i in range(0, len(self.prompts), bs):
            gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.args.seed, "study", i))
            y, m = self.y[i:i + bs].to(self.device), self.mask[i:i + bs].to(self.device)
            out.append(sample(self.model, self.edm, y, m, generator=gen, sampler=sampler).clamp(-1, 1).cpu())
            nfe = sampler.last_nfe
        record = sampler.record()
        record["measured_nfe"] = nfe
        return torch.cat(out), record, time.perf_counter() - t0

    def geneval(self, images: torch.Tensor) -> np.ndarray:
        """(N,) all-correct per image (prompted backgrounds: the detector estimates each image's background)."""
        from engine.eval.geneval import GenEvalScorer, ShapeDetector

        mode = "fixed" if self.cfg.data.backgrounds == "fixed" else "estimate"
        scorer = GenEvalScorer(ShapeDetector(background=mode))
        scorer.update(images, self.prompts, self.specs)
        return np.array([r["all"] for r in scorer.records], dtype=np.float64)

    def pooled_fd(self, images: torch.Tensor) -> float:
        """Fréchet distance of 8x8 average-pooled pixels (192 features) to the prompts' own data images."""
        from engine.eval.fid import FeatureStats, fid_from_stats

        feats = lambda x: torch.nn.functional.adaptive_avg_pool2d(x.double(), 8).flatten(1)
        return fid_from_stats(FeatureStats.of(feats(images)), FeatureStats.of(feats(self.data)))


def summary(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "ci95": bootstrap(values)}


def steps_part(study: Study, args) -> dict:
    """Solvers x schedules x NFE against the Heun reference (paired noise)."""
    ref, ref_rec, ref_s = study.generate({"solver": "heun", "schedule": "karras", "steps": args.reference_steps,
                                          "nfe": None})
    cells, per_image, per_image_ok = [], {}, {}

    def add(name: str, keys: dict, sched: str):
        t0 = time.perf_counter()
        images, rec, seconds = study.generate(keys)
        rmse = (images - ref).double().pow(2).mean((1, 2, 3)).sqrt().numpy()  # (N,) in [-1, 1] units
        psnr = 20 * np.log10(2.0 / np.maximum(rmse, 1e-12))  # peak-to-peak 2 in [-1, 1] = PSNR of [0, 1] images
        ok = study.geneval(images)
        per_image[(name, sched, rec["nfe"])], per_image_ok[(name, sched, rec["nfe"])] = rmse, ok
        cells.append({"solver": name, "schedule": sched, "nfe": rec["nfe"], "measured_nfe": rec["measured_nfe"],
                      "rmse": summary(rmse), "psnr": summary(psnr), "geneval_all": summary(ok),
                      "fd_pooled8": study.pooled_fd(images), "stepopt": rec.get("stepopt"), "sigmas": rec["sigmas"],
                      "sample_seconds": round(seconds, 2), "settings": keys})
        print(f"{name:17s} {sched:8s} NFE {rec['nfe']:2d}: RMSE {np.mean(rmse):.4f} PSNR {np.mean(psnr):.2f} "
              f"all {np.mean(ok):.3f} ({time.perf_counter() - t0:.1f}s)", flush=True)

    for nfe in args.nfe:
        for name in args.solvers:
            for sched in args.schedules:
                if name == "heun" and SCHEDULE_SETS[sched]["schedule"] == "optimized":
                    continue  # optimized schedules are made for multistep solvers
                add(name, {**SOLVER_SETS[name], **SCHEDULE_SETS[sched], "nfe": nfe}, sched)
    add("heun", {"solver": "heun", "schedule": "karras", "nfe": args.heun_baseline_nfe}, "karras")
    comparisons = []
    for (name, sched, nfe), rmse in per_image.items():
        if sched.startswith("opt") and (name, "karras", nfe) in per_image:
            rows = np.stack([rmse, per_image[(name, "karras", nfe)]])
            r, ci = ratio_of_means(rows), bootstrap(rows, ratio_of_means)
            comparisons.append({"solver": name, "schedule": sched, "nfe": nfe, "rmse_ratio_vs_karras": r,
                                "ci95": ci, "reduction": 1 - r})
    ref_ok = study.geneval(ref)
    return {"reference": {"nfe": ref_rec["nfe"], "seconds": round(ref_s, 1), "geneval_all": summary(ref_ok),
                          "fd_pooled8": study.pooled_fd(ref)},
            "cells": cells, "optimized_vs_karras": comparisons,
            "geneval_paired": geneval_paired(per_image_ok, ("heun", "karras", args.heun_baseline_nfe))}


def geneval_paired(per_image_ok: dict, baseline: tuple) -> list[dict]:
    """All-correct differences per image (same prompts and noise): each schedule against Karras for the same solver
    and NFE, and every cell against the many-step Heun baseline, each with a bootstrap 95% interval."""
    rows = []
    for (name, sched, nfe), ok in per_image_ok.items():
        against = [("karras", (name, "karras", nfe))] if sched != "karras" else []
        if (name, sched, nfe) != baseline:
            against.append(("heun_baseline", baseline))
        for label, key in against:
            if key not in per_image_ok:  # --schedules without karras: nothing to pair with
                continue
            diff = ok - per_image_ok[key]
            rows.append({"solver": name, "schedule": sched, "nfe": nfe, "against": label,
                         "difference": float(diff.mean()), "ci95": bootstrap(diff)})
    return rows


def init_part(study: Study, args) -> dict:
    """Start states x sigma_max x NFE: brightness bias against the paired data images, per background."""
    if not args.sing_run:
        raise SystemExit("--part init needs --sing-run (a run trained with diffusion.objective=init_step)")
    groups = [f.get("background", "fixed") for f in study.facts]
    data_mean = study.data.double().mean((2, 3))  # (N, 3)
    data_bg = study.data.double().flatten(2).median(2).values.mean(1)  # (N,)
    cells = []
    for nfe in args.init_nfe:
        for smax in args.sigma_max:
            for init, keys in INIT_SETS.items():
                extra = {"sing_run": args.sing_run} if keys["init"] == "sing" else {}
                images, rec, _ = study.generate({**SOLVER_SETS[args.init_solver], "schedule": "karras", "nfe": nfe,
                                                 **keys, **extra}, sigma_max=smax)
                bias = (images.double().mean((2, 3)) - data_mean).numpy()  # (N, 3) per image, per channel
                bg = images.double().flatten(2).median(2).values.mean(1)  # (N,) median pixel, mean over RGB
                ok = study.geneval(images)
                per_group = {}
                for g in sorted(set(groups)):
                    sel = np.array([x == g for x in groups])
                    per_group[g] = {"n": int(sel.sum()), "bias": summary(bias[sel].mean(1)),
                                    "background": float(bg[sel].mean()), "data_background": float(data_bg[sel].mean()),
                                    "geneval_all": float(ok[sel].mean())}
                cells.append({"init": init, "sigma_max": smax, "nfe": nfe, "bias": summary(bias.mean(1)),
                              "abs_group_bias": float(np.mean([abs(v["bias"]["mean"]) for v in per_group.values()])),
                              "per_background": per_group, "geneval_all": summary(ok)})
                print(f"NFE {nfe:2d} sigma_max {smax:5.1f} {init:10s}: bias {bias.mean():+.4f} "
                      f"|group bias| {cells[-1]['abs_group_bias']:.4f} all {ok.mean():.3f}", flush=True)
    return {"cells": cells, "bias_removed_vs_noise": bias_removed(cells), "solver": args.init_solver}


def bias_removed(cells: list[dict]) -> list[dict]:
    """Per start state, sigma_max and NFE, the share of pure noise's brightness bias it removes, measured two ways:
    total: 1 - mean_b |bias_b(init)| / mean_b |bias_b(noise)| over backgrounds b, the model's own bias included;
    truncation: the same for the part that lowering sigma_max adds, bias_b(., sigma_max) - bias_b(noise, largest
    sigma_max) at the same NFE (at the largest sigma_max it is 0 for noise by construction)."""
    def group_bias(c):
        return {g: v["bias"]["mean"] for g, v in c["per_background"].items()}

    out = []
    for c in cells:
        if c["init"] == "noise":
            continue
        same = [b for b in cells if b["init"] == "noise" and b["nfe"] == c["nfe"]]
        noise = next(b for b in same if b["sigma_max"] == c["sigma_max"])
        top = group_bias(max(same, key=lambda b: b["sigma_max"]))
        mine, base = group_bias(c), group_bias(noise)
        excess = lambda g: float(np.mean([abs(g[k] - top[k]) for k in g]))
        rec = {"init": c["init"], "sigma_max": c["sigma_max"], "nfe": c["nfe"],
               "total_removed": 1 - c["abs_group_bias"] / max(noise["abs_group_bias"], 1e-12),
               "noise_truncation_bias": excess(base), "truncation_bias": excess(mine)}
        if rec["noise_truncation_bias"] > 0:
            rec["truncation_removed"] = 1 - rec["truncation_bias"] / rec["noise_truncation_bias"]
        out.append(rec)
    return out


def plot_steps(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solvers = sorted({c["solver"] for c in res["cells"]}, key=list(SOLVER_SETS).index)
    cols = min(4, len(solvers))
    rows = -(-len(solvers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(solvers):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, solvers):
        for sched in SCHEDULE_SETS:
            pts = sorted((c["nfe"], c["rmse"]["mean"]) for c in res["cells"]
                         if c["solver"] == name and c["schedule"] == sched and c["nfe"] <= 12)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=sched)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("NFE")
        ax.set_yscale("log")
    for row in axes:
        row[0].set_ylabel("RMSE vs 999-NFE Heun")
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes.flat), key=lambda hl: len(hl[0]))
    fig.legend(handles, labels, loc="lower right", fontsize=8)  # the panel with every schedule's lines
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_init(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfes = sorted({c["nfe"] for c in res["cells"]})
    fig, axes = plt.subplots(1, len(nfes), figsize=(4 * len(nfes), 3.2), sharey=True, squeeze=False)
    for ax, nfe in zip(axes[0], nfes):
        for init in INIT_SETS:
            pts = sorted((c["sigma_max"], c["abs_group_bias"]) for c in res["cells"]
                         if c["init"] == init and c["nfe"] == nfe)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=init)
        ax.set_xscale("log")
        ticks = sorted({c["sigma_max"] for c in res["cells"]})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_title(f"{res['solver']}, NFE {nfe}", fontsize=9)
        ax.set_xlabel("sigma_max")
    axes[0][0].set_ylabel("|bias| per background, mean")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = Study(args, args.run)
    result = {"command": " ".join(sys.argv), "run": str(study.run), "checkpoint": str(study.ckpt),
              "model": study.cfg.model.name, "num_images": args.num_images, "cfg_scale": study.cfg_scale,
              "seed": args.seed, "lower_order_final": args.lower_order_final, "data_backgrounds":
              study.cfg.data.backgrounds, "device": str(study.device), "torch_threads": args.threads}
    if args.part in ("steps", "all"):
        result["steps"] = steps_part(study, args)
        plot_steps(result["steps"], out / "steps.png")
    if args.part in ("init", "all"):
        result["init"] = init_part(study, args)
        plot_init(result["init"], out / "init.png")
    (out / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'study.json'}")
    return result


if __name__ == "__main__":
    main()
