"""Patch-parallel sampling (engine/sampling/parallel_sample.py): quality against one process, and speed.

    python bench/study_patch_parallel.py --run-dir runs/X --out DIR --part quality [--num-images 64] [--worlds 2 4]
    python bench/study_patch_parallel.py --out DIR --part speed [--tokens 64 256 1024]
    python bench/study_patch_parallel.py --out DIR --part merge --inputs A/quality.json B/quality.json ...

quality   the comparison protocol's held-out prompts and per-image paired noise (engine/eval/protocol.py). For each
          sampler (Heun 10/20/40 steps, DPM-Solver++(2M) at NFE 10) the one-process images, then every mode and MoE
          routing on each world size, as gloo processes on this machine: PSNR and max |difference| against the
          one-process images, GenEval-style scores, and the seam score (mean |vertical gradient| across the band
          boundaries over the same across the other token-row boundaries), each with a 95% bootstrap CI over images.
          Writes quality.json and quality.png.
merge     quality parts run apart (other world sizes, modes or samplers on the same prompts and noise) into one
          quality.json and plot.
speed     random weights (MicroDiT_Nano_4, patch 4) at 32, 64, 128 px = 64, 256, 1024 tokens; seconds per image of
          one process on 1 thread, 2 processes on 1 thread each (every mode; compute and waiting on communication
          apart), and one process on 2 threads, the honest CPU competitor. Each row also gives the CPU seconds of
          the busiest process (cpu_s, all its threads): on a machine shared with other work, wall time measures the
          load as much as the code, while cpu_s is the work a process did. Writes speed.json and speed.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SAMPLERS = {"heun10": dict(solver="heun", steps=10), "heun20": dict(solver="heun", steps=20),
            "heun40": dict(solver="heun", steps=40), "dpmpp2m_nfe10": dict(solver="dpmpp", order=2, nfe=10)}
# name -> (sample.parallel, sample.moe_routing)
MODES = {"full_sync": ("full_sync", "sync"), "patch": ("patch", "displaced"), "patch_moe_sync": ("patch", "sync"),
         "patch_moe_local": ("patch", "local"), "naive_patch": ("naive_patch", "local"),
         "cfg_split": ("cfg_split", "sync")}
PSNR_CAP = 120.0  # dB given to identical images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["quality", "speed", "merge"], required=True)
    p.add_argument("--run-dir", "--run", dest="run", help="quality: run folder of a model trained on synthetic data")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="quality: process counts")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--cfg", type=float, help="guidance scale (default: the run's sample.cfg_scale; speed: 3)")
    p.add_argument("--seed", type=int, default=0, help="paired-noise seed")
    p.add_argument("--inputs", nargs="+", help="merge: quality.json files of one run, prompts and noise")
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024], help="speed: token counts (squares)")
    p.add_argument("--speed-steps", type=int, default=10, help="speed: Heun steps (2·steps − 1 evaluations)")
    p.add_argument("--repeats", type=int, default=3, help="speed: timed runs after one warm-up (median)")
    p.add_argument("--one-process-threads", type=int, nargs="+", default=[1, 2],
                   help="speed: thread counts of the one-process rows")
    args = p.parse_args(argv)
    if args.part == "quality" and not args.run:
        p.error("--part quality needs --run-dir")
    if args.part == "merge" and not args.inputs:
        p.error("--part merge needs --inputs")
    return args


# ---------------------------------------------------------------- processes


def spawn(world: int, threads: int, jobs: list[dict], shared: dict) -> list[dict]:
    """Run `jobs` in `world` gloo processes of `threads` threads each; every process's results, job by job."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, threads, jobs, shared, tmp), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def worker(rank: int, world: int, threads: int, jobs: list[dict], shared: dict, tmp: str) -> None:
    import torch.distributed as dist

    from engine.sampling.parallel_sample import parallel_sample
    from engine.sampling.sampler import build_sampler

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    model, edm = shared["model"](), shared["edm"]
    out = []
    for job in jobs:
        sampler = build_sampler(job["settings"])
        runs = []
        for y, mask, noise in shared["batches"]:
            dist.barrier()  # start together: the timing is one sampling call, not who was late
            images, stats = parallel_sample(model, edm, y, mask, sampler, noise)
            runs.append((images if rank == 0 else None, stats.record()))
        out.append(runs)
    torch.save(out, Path(tmp) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- quality


class RunModel:
    """A picklable way for spawned processes to load the run's EMA model."""

    def __init__(self, run: str):
        self.run = run

    def __call__(self):
        from engine.training.run_folder import load_run_model

        return load_run_model(Path(self.run), None)[1]


def settings_for(cfg, sampler: str, mode: str | None, cfg_scale: float):
    import copy

    from engine.sampling.settings import SamplerSettings

    cfg = copy.deepcopy(cfg)
    for key, value in SAMPLERS[sampler].items():
        setattr(cfg.sample, key, value)
    parallel, routing = MODES[mode] if mode else ("none", "displaced")
    cfg.sample.parallel, cfg.sample.moe_routing, cfg.sample.cfg_scale = parallel, routing, cfg_scale
    return SamplerSettings.from_config(cfg.validate())


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per image, of [0, 1] images (distrifuser's convention), from [-1, 1] ones; identical images get PSNR_CAP."""
    mse = ((a - b) / 2).double().pow(2).flatten(1).mean(1).numpy()
    return np.where(mse > 0, 10 * np.log10(1 / np.maximum(mse, 1e-30)), PSNR_CAP).clip(max=PSNR_CAP)


def seam(images: torch.Tensor, bands: int, patch: int) -> np.ndarray:
    """Per image: mean |vertical gradient| across the band boundaries over the same across the other token-row
    boundaries (both are patch edges, so the blockiness of patches cancels)."""
    grad = (images[:, :, 1:] - images[:, :, :-1]).abs().mean(dim=(1, 3))  # (B, H - 1): rows r | r + 1
    H = images.shape[2]
    edges = [r for r in range(patch - 1, H - 1, patch)]  # r: the last row of a token row
    cut = {H // bands * k - 1 for k in range(1, bands)}
    at = grad[:, [r for r in edges if r in cut]].mean(1)
    rest = grad[:, [r for r in edges if r not in cut]].mean(1)
    return (at / rest.clamp_min(1e-12)).numpy()


GENEVAL = ("colour", "shape", "count", "position", "all")


def geneval(images: torch.Tensor, prompts) -> dict[str, np.ndarray]:
    """Per-image GenEval-style scores (NaN where a metric does not apply to the prompt)."""
    from engine.eval.geneval import GenEvalScorer, ShapeDetector

    scorer = GenEvalScorer(ShapeDetector(background="fixed" if prompts.backgrounds == "fixed" else "estimate"))
    scorer.update(images, prompts.prompts, prompts.specs)
    return {k: np.array([np.nan if r[k] is None else float(r[k]) for r in scorer.records]) for k in GENEVAL}


def geneval_summary(scores: dict[str, np.ndarray]) -> dict:
    from engine.eval.protocol import mean_ci

    return {k: mean_ci([None if np.isnan(x) else x for x in v]) for k, v in scores.items()}


def geneval_vs(reference: dict[str, np.ndarray], scores: dict[str, np.ndarray]) -> dict:
    """Paired difference (this cell − one process) per metric over the same prompts and noise, with a bootstrap CI."""
    from engine.eval.compare import paired_difference
    from engine.eval.protocol import bootstrap_indices

    idx = bootstrap_indices(len(reference["all"]))
    return {k: paired_difference(reference[k], scores[k], idx) for k in GENEVAL}


def quality(args) -> dict:
    from engine.config import load_config
    from engine.diffusion.edm import EDM
    from engine.eval.protocol import HELD_OUT_SEED, mean_ci, paired_noise, synthetic_prompt_set
    from engine.sampling.sampler import build_sampler, sample
    from engine.training.run_folder import embed_captions

    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    model = RunModel(str(run))()
    edm = EDM.from_config(cfg.diffusion)
    cfg_scale = cfg.sample.cfg_scale if args.cfg is None else args.cfg
    prompts = synthetic_prompt_set(args.num_images, cfg.data.image_size, HELD_OUT_SEED, None, cfg.data.backgrounds)
    c = model.cfg
    batches = []
    for i in range(0, args.num_images, args.batch_size):
        y, mask = embed_captions(cfg, prompts.prompts[i:i + args.batch_size], "cpu")
        noise = paired_noise(args.seed, i, len(y), (c.in_channels, c.input_size, c.input_size))
        batches.append((y, mask, noise))
    torch.set_num_threads(1)
    result = {"run": str(run), "cfg_scale": cfg_scale, "num_images": args.num_images, "prompts": prompts.record(),
              "seed": args.seed, "psnr_cap_db": PSNR_CAP, "one_process": {}, "cells": []}
    reference, ref_scores = {}, {}
    for name in args.samplers:
        sampler = build_sampler(settings_for(cfg, name, None, cfg_scale))
        t0 = time.perf_counter()
        images = [sample(model, edm, y, m, sampler=sampler, noise=n) for y, m, n in batches]
        reference[name] = torch.cat(images).clamp(-1, 1)
        ref_scores[name] = geneval(reference[name], prompts)
        result["one_process"][name] = {"nfe": sampler.plan.nfe, "seconds": time.perf_counter() - t0,
                                       "geneval": geneval_summary(ref_scores[name])}
        print(f"1 process {name}: {result['one_process'][name]['geneval']['all']}", flush=True)
    shared = {"model": RunModel(str(run)), "edm": edm, "batches": batches}
    for world in args.worlds:
        modes = [m for m in args.modes if m != "cfg_split" or world == 2]
        cells = [(s, m) for s in args.samplers for m in modes]
        jobs = [{"settings": settings_for(cfg, s, m, cfg_scale)} for s, m in cells]
        runs = spawn(world, 1, jobs, shared)[0]
        for (name, mode), job_runs in zip(cells, runs):
            images = torch.cat([img for img, _ in job_runs]).clamp(-1, 1)
            ref, scores = reference[name], geneval(images, prompts)
            bands = 1 if mode == "cfg_split" else world
            cell = {"world": world, "sampler": name, "mode": mode, "parallel": MODES[mode][0],
                    "moe_routing": MODES[mode][1], "psnr_db": mean_ci(psnr(images, ref)),
                    "max_abs": float((images - ref).abs().max()),
                    "mean_abs": float((images - ref).abs().mean()), "geneval": geneval_summary(scores),
                    "geneval_vs_one_process": geneval_vs(ref_scores[name], scores),
                    "comm_wait_s": sum(st["comm_wait_s"] for _, st in job_runs),
                    "seconds": sum(st["seconds"] for _, st in job_runs)}
            if bands > 1:
                cell["seam"] = mean_ci(seam(images, bands, c.patch_size))
                cell["seam_one_process"] = mean_ci(seam(ref, bands, c.patch_size))
            result["cells"].append(cell)
            print(f"{world} processes {name:14s} {mode:16s} PSNR {cell['psnr_db']['mean']:6.2f} dB "
                  f"max|d| {cell['max_abs']:.3f} all {cell['geneval']['all']['mean']:.3f}", flush=True)
    return result


def merge(args) -> dict:
    """One quality result from parts that sampled the same prompts and noise from the same run."""
    parts = [json.loads(Path(f).read_text()) for f in args.inputs]
    same = ("run", "cfg_scale", "num_images", "prompts", "seed")
    for f, part in zip(args.inputs[1:], parts[1:]):
        differ = [k for k in same if part[k] != parts[0][k]]
        if differ:
            raise SystemExit(f"--inputs {f}: differs from {args.inputs[0]} in {', '.join(differ)}")
    merged = {k: parts[0][k] for k in (*same, "psnr_cap_db")}
    merged |= {"one_process": {k: v for part in parts for k, v in part["one_process"].items()},
               "cells": [c for part in parts for c in part["cells"]],
               "parts": [{"file": f, "command": part["command"], "date": part["date"]}
                         for f, part in zip(args.inputs, parts)]}
    return merged


def plot_quality(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    heun = {"heun10": 10, "heun20": 20, "heun40": 40}
    for (world, mode), style in zip(sorted({(c["world"], c["mode"]) for c in result["cells"]}), range(99)):
        cells = [c for c in result["cells"] if (c["world"], c["mode"]) == (world, mode) and c["sampler"] in heun]
        if cells:
            xs = [heun[c["sampler"]] for c in cells]
            ax.plot(xs, [c["psnr_db"]["mean"] for c in cells], "o-" if world == 2 else "s--", label=f"{mode} ×{world}")
    ax.set(xlabel="Heun steps", ylabel="PSNR vs 1 process (dB)", title="patch-parallel sampling: agreement")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- speed


class RandomModel:
    """Picklable: MicroDiT_Nano_4 at `side` px with every weight random (the zero-initialised ones too)."""

    def __init__(self, side: int):
        self.side = side

    def __call__(self):
        from models.sizes import build_model, model_config

        torch.manual_seed(0)
        model = build_model(model_config("MicroDiT_Nano_4", input_size=self.side, in_channels=3, caption_channels=384))
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
        return model.eval()


def speed(args) -> dict:
    from engine.config import Config
    from engine.diffusion.edm import EDM
    from engine.sampling.parallel_sample import BAND_MODES
    from engine.sampling.sampler import build_sampler, sample
    from engine.sampling.settings import SamplerSettings

    cfg_scale = 3.0 if args.cfg is None else args.cfg
    edm = EDM(sigma_data=0.5)
    result = {"load_avg_start": os.getloadavg(), "cpu_count": os.cpu_count(), "steps": args.speed_steps,
              "cfg_scale": cfg_scale, "images_per_call": 1, "repeats": args.repeats, "rows": []}

    def settings(parallel: str):
        cfg = Config()
        cfg.sample.steps, cfg.sample.cfg_scale, cfg.sample.parallel = args.speed_steps, cfg_scale, parallel
        cfg.sample.moe_routing = "local" if parallel == "naive_patch" else "displaced"
        return SamplerSettings.from_config(cfg.validate())

    for tokens in args.tokens:
        side = int(round(tokens**0.5)) * 4
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(1, 16, 384, generator=g), torch.ones(1, 16, dtype=torch.bool),
                 torch.randn(1, 3, side, side, generator=g))
        model = RandomModel(side)()
        for threads in args.one_process_threads:  # one process: 1 thread, and 2 threads (intra-op parallelism)
            torch.set_num_threads(threads)
            sampler = build_sampler(settings("none"))
            times, cpu = [], []
            for _ in range(args.repeats + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                sample(model, edm, batch[0], batch[1], sampler=sampler, noise=batch[2])
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            result["rows"].append({"tokens": tokens, "config": f"1 process x {threads} thread", "processes": 1,
                                   "threads": threads, "seconds": float(np.median(times[1:])),
                                   "cpu_s": float(np.median(cpu[1:]))})
            print(result["rows"][-1], flush=True)
        modes = [m for m in (*BAND_MODES, "cfg_split")]
        jobs = [{"settings": settings(m)} for m in modes for _ in range(args.repeats + 1)]
        runs = spawn(2, 1, jobs, {"model": RandomModel(side), "edm": edm, "batches": [batch]})
        for i, mode in enumerate(modes):
            per_rank = [[r[j][0][1] for j in range(i * (args.repeats + 1) + 1, (i + 1) * (args.repeats + 1))]
                        for r in runs]  # stats of the timed repeats, per rank
            med = lambda key: float(np.median([max(ranks[k][key] for ranks in per_rank)
                                               for k in range(args.repeats)]))
            result["rows"].append({"tokens": tokens, "config": "2 processes x 1 thread", "processes": 2, "threads": 1,
                                   "mode": mode, "seconds": med("seconds"), "comm_wait_s": med("comm_wait_s"),
                                   "compute_s": med("compute_s"), "cpu_s": med("cpu_s"),
                                   "sent_bytes_per_eval": per_rank[0][0]["sent_bytes"] / per_rank[0][0]["evals"]})
            print(result["rows"][-1], flush=True)
    result["load_avg_end"] = os.getloadavg()
    return result


def plot_speed(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = sorted({(r["config"], r.get("mode", "")) for r in result["rows"]})
    for ax, key, what in zip(axes, ("seconds", "cpu_s"), ("wall seconds", "CPU seconds of the busiest process")):
        for config, mode in labels:
            rows = [r for r in result["rows"] if (r["config"], r.get("mode", "")) == (config, mode)]
            ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], "o-", label=f"{config} {mode}".strip())
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel=f"{what} per image")
    load = result["load_avg_start"][0], result["load_avg_end"][0]
    fig.suptitle(f"Heun {result['steps']} steps, CFG, 2-core CPU shared with other work (load {load[0]:.1f}, "
                 f"{load[1]:.1f})", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"quality": quality, "speed": speed, "merge": merge}[args.part](args)
    result |= {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "torch": torch.__version__}
    name = "speed" if args.part == "speed" else "quality"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (plot_speed if name == "speed" else plot_quality)(result, out / f"{name}.png")
    print(f"wrote {out / name}.json and .png")
    return result


if __name__ == "__main__":
    main()
