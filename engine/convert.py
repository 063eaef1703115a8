"""Convert an official MicroDiT checkpoint (SonyResearch/micro_diffusion) into a Tessera run folder.

    python engine/convert.py dit_4_channel_37M_real_and_synthetic_data.pt runs/microdit_official [--step 0]

Writes `<out>/config.yaml` and `<out>/checkpoints/step_XXXXXXXX/` holding the weights as both model and EMA; then
`engine/sample.py --run <out>` samples from it and `train.init_from=<out>/checkpoints/step_XXXXXXXX` starts a new
training phase from it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not engine/'s files, by name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine.training.errors import run_cli
from engine.training.official_checkpoint import convert


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="official checkpoint (.pt or .safetensors)")
    p.add_argument("out", help="Tessera run folder to write")
    p.add_argument("--step", type=int, default=0, help="step number of the written checkpoint (default 0)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a .pt that torch.load(weights_only=True) refuses (only for files you trust)")
    args = p.parse_args(argv)
    ckpt, name, model = convert(args.src, args.out, args.step, args.allow_pickle)
    cfg, out = model.cfg, Path(args.out)
    print(f"converted {args.src} -> {ckpt}\n  size {name}, {model.num_params() / 1e6:.1f}M parameters, "
          f"input {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, captions {cfg.caption_channels} wide, "
          f"pos_interp_scale {cfg.pos_interp_scale:g}\n  sample: python engine/sample.py --run {out} "
          "[--text-encoder <folder or id of the same width, if the run's is not at hand>]\n"
          # A new run name: this folder's checkpoint has no optimizer state to resume from.
          f"  fine-tune: python engine/train.py --config {out / 'config.yaml'} run.name={out.name}_finetune "
          f"train.init_from={ckpt}")
    return ckpt


if __name__ == "__main__":
    run_cli(main)
