"""What the training-method studies (bench/study_targets.py, study_experts.py, study_matryoshka.py) share: arms trained
through engine/train.py at a FLOP budget the engine's own counter sets, and each checkpoint scored by the comparison
protocol (engine/eval: GenEval-style, the attribute Fréchet distance, both with bootstrap CIs on paired prompts and
noise) and the held-out denoising loss. Not a test module: nothing here is collected by pytest."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def common_args(p: argparse.ArgumentParser) -> None:
    """The recipe (a base config and overrides), the budget and the evaluation, as every study takes them."""
    p.add_argument("--out", required=True, help="study folder: runs/, evals/, study.json, plots")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_32px.yaml"), help="base recipe (YAML)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides applied to every arm")
    p.add_argument("--budget-steps", type=int, default=600,
                   help="training FLOP budget of each arm, as steps of the reference model at the recipe's batch")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="run.seed of each repetition (paired arms)")
    p.add_argument("--num-images", type=int, default=128, help="held-out prompts per evaluation")
    p.add_argument("--heldout-images", type=int, default=128, help="held-out images of the denoising loss")
    p.add_argument("--sample-steps", type=int, default=None, help="Heun points of evaluation (default: recipe's)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the table and plot from <out>/study.json (as this version writes them); train nothing")


def load(args, *overrides: str):
    from engine.config import load_config

    return load_config(args.config, [*args.set, *overrides])


def train_flops(args, *overrides: str) -> tuple[float, object]:
    """Training FLOPs per image of the network these overrides make (the engine's count), and the config."""
    from engine.training.network import network_config
    from models.flops import train_flops_per_image

    cfg = load(args, *overrides)
    return train_flops_per_image(network_config(cfg), cfg.data.caption_len, cfg.diffusion.mask_ratio), cfg


def steps_for(budget_flops: float, flops_per_image: float, batch: int) -> int:
    return max(1, round(budget_flops / (flops_per_image * batch)))


def train(args, name: str, *overrides: str) -> Path:
    """Train (or finish) one arm with engine/train.py under torchrun; its log goes to <out>/logs/<name>.log. An arm
    whose final checkpoint (train.steps) is already there is not started again (a rerun of a cut study)."""
    out = Path(args.out)
    steps = [o.split("=", 1)[1] for o in overrides if o.startswith("train.steps=")]
    if steps and (out / "runs" / name / "checkpoints" / f"step_{int(steps[-1]):08d}").is_dir():
        return out / "runs" / name
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "engine" / "train.py"), "--config", args.config, *args.set, f"run.out_dir={out / 'runs'}",
           f"run.name={name}", "train.progress_bar=false", "sample.final_eval_images=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(out / "logs" / f"{name}.log", "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"trained {name} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out / "runs" / name


def checkpoints(run: Path) -> list[Path]:
    from engine.training.checkpoint import Checkpointer

    return Checkpointer(run / "checkpoints").checkpoints()


def evaluate(args, run: Path, step: int | None, label: str) -> dict:
    """engine/evaluate.py on one checkpoint (cached: an existing eval.json is read back), plus the held-out loss."""
    from engine.evaluate import main as evaluate_main

    folder = Path(args.out) / "evals" / label
    if (folder / "eval.json").is_file() and (folder / "heldout.json").is_file():
        return {"eval": json.loads((folder / "eval.json").read_text()), "folder": str(folder),
                "heldout": json.loads((folder / "heldout.json").read_text())}
    argv = ["--run", str(run), "--num-images", str(args.num_images), "--out", str(folder), "--grid", "32"]
    argv += [] if step is None else ["--step", str(step)]
    argv += [] if args.sample_steps is None else ["--steps", str(args.sample_steps)]
    result = evaluate_main(argv)
    heldout = heldout_loss(run, step, args.heldout_images)
    (folder / "heldout.json").write_text(json.dumps(heldout, indent=1) + "\n")
    return {"eval": result, "folder": str(folder), "heldout": heldout}


def heldout_loss(run: Path, step: int | None, num_images: int) -> dict:
    from engine.data.train_data import load_text_encoder
    from engine.diffusion.edm import EDM
    from engine.eval.denoising import heldout_denoising_loss
    from engine.training.run_folder import load_run_model

    ckpt = None if step is None else str(run / "checkpoints" / f"step_{step:08d}")
    cfg, model, _ = load_run_model(run, ckpt, use_ema=True)
    return heldout_denoising_loss(model, EDM.from_config(cfg.diffusion), cfg, load_text_encoder(cfg), num_images)


def scores(ev: dict) -> dict:
    """The numbers a study records for one evaluation (colour and shape too: at a few hundred steps "all" sits at 0)."""
    m, h = ev["eval"]["metrics"], ev["heldout"]
    g = m.get("geneval", {})
    return {"geneval_all": g.get("all"), "geneval_all_ci": g.get("ci", {}).get("all"),
            "geneval_colour": g.get("colour"), "geneval_colour_ci": g.get("ci", {}).get("colour"),
            "geneval_shape": g.get("shape"), "geneval_shape_ci": g.get("ci", {}).get("shape"),
            "fd_attr": m.get("fd_attr", {}).get("value"), "fd_attr_ci": m.get("fd_attr", {}).get("ci"),
            "heldout_edm": h["edm_weighted"]["mean"], "heldout_edm_ci": h["edm_weighted"]["ci"]}


def machine() -> dict:
    import torch

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(), "torch": torch.__version__, "threads": os.environ.get(
                "OMP_NUM_THREADS"), "commit": commit.stdout.strip(), "date": time.strftime("%Y-%m-%d %H:%M")}


def start(args, **extra) -> tuple[Path, dict]:
    """The study folder (made) and the head of its study.json: the command, the recipe, `extra`, the machine."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, {"command": " ".join(sys.argv), "recipe": {"config": args.config, "set": args.set}, **extra,
                 "machine": machine()}


def previous(args) -> dict:
    """<out>/study.json of an earlier run of the study (--report-only)."""
    return json.loads((Path(args.out) / "study.json").read_text())


def finish(out: Path, name: str, result: dict, table: str, plot) -> dict:
    """<out>/<name>.md (the table), <name>.png (`plot(path)`) and study.json; the table is printed."""
    (out / f"{name}.md").write_text(table + "\n")
    plot(out / f"{name}.png")
    (out / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table)
    print(f"wrote {out / 'study.json'}", flush=True)
    return result


def fmt_ci(value, ci, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")
