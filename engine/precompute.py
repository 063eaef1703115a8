"""Precompute VAE latents and caption embeddings once, so training never runs the VAE or the text encoder.

    python engine/precompute.py --source /data/cc12m --source s3://b/shards/*.tar --out /data/pre \\
        --vae stabilityai/sdxl-vae --text-encoder all-MiniLM-L6-v2 --resolutions 256 512
    torchrun --nproc_per_node=8 engine/precompute.py ...      # each rank takes records i with i % world == rank

Latents are the posterior MEAN (`latent_dist.mean`), not a sample: the SDXL VAE's posterior std is tiny (well
below the fp16 storage step for most values) next to the diffusion noise added in training, so a frozen sample
would only bake one fixed draw of noise into the data set, while the mean is deterministic, the same on every rank,
world size and resume, and can be checked exactly. Bad inputs are reported in <out>/report.jsonl, never fatal; a
killed run is resumed by running the same command again (engine/data/precompute.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not engine/'s files, by name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch.distributed as dist

from engine.data.precompute import run, setup
from engine.encoders.text_encoder import DEFAULT_TEXT_ENCODER
from engine.training.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", required=True,
                   help="folder, .tar/.parquet file or glob; local or fsspec URL; repeat for several")
    p.add_argument("--out", required=True, help="output folder (local)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL: hub id or local folder")
    p.add_argument("--vae-subfolder", default=None,
                   help="subfolder of --vae holding the VAE (default: its root, else vae/)")
    p.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER, help="transformers text encoder: id or folder")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256])
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward")
    p.add_argument("--max-caption-len", type=int, default=77, help="tokens per caption before truncation")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    p.add_argument("--min-side", type=int, default=0,
                   help="skip (and report) images whose short side is under this many pixels (default 0: keep all; "
                        "tiny and extreme images are stored and noted in report.jsonl)")
    p.add_argument("--decoder", choices=("pil", "dali"), default="pil")
    p.add_argument("--image-column", default=None, help="parquet image column (default: image, jpg, png, ...)")
    p.add_argument("--caption-column", default=None, help="parquet caption column (default: caption, text, ...)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="decode threads per rank")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if there is a GPU, else cpu")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_caption_len", "shard_size", "num_workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.min_side < 0:
        p.error(f"--min-side must be >= 0, got {args.min_side}")
    if any(r < 1 for r in args.resolutions) or len(set(args.resolutions)) != len(args.resolutions):
        p.error(f"--resolutions must be distinct positive integers, got {args.resolutions}")
    args.resolutions = sorted(args.resolutions)
    return args


def main(argv=None) -> dict | None:
    """CLI entry; returns the manifest on rank 0 (None elsewhere)."""
    args = parse_args(argv)
    ctx = setup(args)
    try:
        manifest = run(args, ctx)
        if ctx.distributed:
            dist.barrier()  # leave together: tearing gloo down while another rank still talks can abort it
        return manifest
    finally:
        if ctx.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
