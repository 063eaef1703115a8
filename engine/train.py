"""Train a MicroDiT: `torchrun --nproc_per_node=N engine/train.py [--config configs/tiny.yaml] [key=value ...]`
(or `python -m engine.train ...`). Parse, validate, start the process group, call the training run."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not engine/'s files, by name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch.distributed as dist

from engine.config import describe, load_config
from engine.training.errors import run_cli
from engine.training.loop import train
from engine.training.parallel import init_distributed

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file (default: configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 train.steps=100")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return
    cfg = load_config(args.config, args.overrides)
    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", 1)))  # before the process group: torchrun's or ours
    d = init_distributed()
    try:
        run_dir = train(cfg, d)
        dist.barrier()  # leave together: tearing gloo down while another rank still talks can abort it
        if d.is_main:
            print(f"done: {run_dir}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
