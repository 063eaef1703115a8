"""Precompute VAE latents and caption embeddings (the library behind engine/precompute.py).

Per record: decode (PIL, or DALI), RGB, short side resized and center-cropped to each resolution, scaled to
[-1, 1], encoded by a diffusers AutoencoderKL (engine/encoders/vae.py) and multiplied by its scaling factor, stored
float16; the caption through TextEncoder, stored float16 without padding (the loader restores it from caption_len).
Output layout and manifest: engine/data/manifest.py.

Bad input (undecodable/truncated/zero-byte images, missing captions, unreadable or damaged shards, non-finite latents,
images under --min-side) is written to report.jsonl with its key ("stored": false) and counted in the manifest; it
never stops the run. Usable but doubtful samples are stored and noted there too ("stored": true): a caption that was
not valid UTF-8 (kept with U+FFFD), an image upscaled more than 2x or of extreme aspect ratio.

Kill-safe: a shard is written under a temporary name for every resolution, renamed, then committed by a marker
file (<out>/.work/shards/<name>.json, holding its keys and checksums). On restart, uncommitted shard folders are
deleted and committed keys skipped, so the finished set has every key exactly once. Bad inputs are not stored,
so each run meets and reports them again; the report is rebuilt in full by every run.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.config import ConfigError
from engine.data.manifest import FORMAT, MANIFEST, REPORT, combine_checksums, file_checksums, write_json_atomic
from engine.data.preprocess import make_decoder, size_notes
from engine.data.sources import iter_records, owned_by, source_files, source_root
from engine.encoders.text_encoder import TextEncoder
from engine.encoders.vae import encode_latents, load_vae, vae_info

WORK = ".work"  # run state under <out>: shard commit markers, per-rank reports, the settings of the first run
LATENT_SAMPLING = "mean"


@dataclass(frozen=True)
class Ctx:
    rank: int
    world: int
    device: torch.device
    distributed: bool


def setup(args) -> Ctx:
    """Join torchrun's group when WORLD_SIZE > 1. The group is gloo even on GPUs, with a long timeout: it only
    carries two barriers, and ranks may finish their share of a large set minutes apart (NCCL's 10 min default
    timeout would kill a correct run)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    return Ctx(int(os.environ.get("RANK", 0)), world, device, world > 1)


def barrier(ctx: Ctx) -> None:
    if ctx.distributed:
        dist.barrier()


def check_sources(sources: list[str]) -> None:
    """A source that does not exist at all is a typo, not bad data: fail before any work."""
    missing = []
    for url in sources:
        try:
            fs, path, _ = source_root(url)
            if not source_files(fs, path):
                missing.append(url)
        except Exception as e:
            missing.append(f"{url} ({type(e).__name__}: {e})")
    if missing:
        raise ConfigError(f"--source not found or empty: {', '.join(missing)}")


# ----------------------------------------------------------------------------------------------------- captions


def caption_rows(text: TextEncoder, captions: list[str]) -> tuple[list[np.ndarray], list[int]]:
    """Captions → per caption float16 (n_tokens, D) of its real tokens only, and n_tokens."""
    emb, mask = text.encode(captions)  # (B, L, D) float32, (B, L) bool
    emb, mask = emb.cpu(), mask.cpu()
    return [emb[b][mask[b]].half().numpy() for b in range(len(captions))], mask.sum(1).tolist()


# ------------------------------------------------------------------------------------------------------ shards


def shard_features(latent_shape: tuple[int, int, int], dim: int):
    """The `datasets` schema of one resolution's shards (the storage contract)."""
    import datasets

    return datasets.Features({
        "key": datasets.Value("string"), "caption": datasets.Value("string"),
        "latent": datasets.Array3D(tuple(latent_shape), "float16"),
        "caption_emb": datasets.Array2D((None, dim), "float16"),  # dynamic first dim: no padding stored
        "caption_len": datasets.Value("int32"),
    })


def write_shard_set(out: Path, name: str, rows: list[dict], features: dict) -> dict:
    """Write one shard per resolution, rename them into place, then commit with a marker; returns the marker.

    rows: {key, caption, latent: {res: float16 (C, h, w)}, caption_emb: float16 (n, D), caption_len, notes}.
    The marker is written last: a shard folder without one is an interrupted write and is deleted on restart. It
    keeps the rows' notes, so the report lists them on every later run too (committed rows are not read again).
    """
    import datasets

    entries, tmps = {}, {}
    for res, feats in features.items():
        tmp = out / str(res) / f".tmp_{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        columns = {"key": [r["key"] for r in rows], "caption": [r["caption"] for r in rows],
                   "latent": np.stack([r["latent"][res] for r in rows]),  # (n, C, h, w)
                   "caption_emb": [r["caption_emb"] for r in rows], "caption_len": [r["caption_len"] for r in rows]}
        datasets.Dataset.from_dict(columns, features=feats).save_to_disk(str(tmp))
        files = file_checksums(tmp)
        entries[str(res)] = {"path": f"{res}/{name}", "count": len(rows), "sha256": combine_checksums(files),
                             "files": files}
        tmps[res] = tmp
    for res, tmp in tmps.items():
        os.rename(tmp, out / str(res) / name)
    rank, index = (int(x) for x in name[len("shard_r"):].split("_"))
    marker = {"name": name, "rank": rank, "index": index, "count": len(rows), "keys": [r["key"] for r in rows],
              "resolutions": entries, "notes": [n for r in rows for n in r.get("notes", [])]}
    write_json_atomic(out / WORK / "shards" / f"{name}.json", marker)
    return marker


class ShardWriter:
    """Buffers encoded rows; every `shard_size` rows becomes shard `shard_r{rank:03d}_{index:05d}`."""

    def __init__(self, out: Path, rank: int, next_index: int, shard_size: int, features: dict):
        self.out, self.rank, self.index, self.shard_size, self.features = out, rank, next_index, shard_size, features
        self.rows: list[dict] = []
        self.written = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        write_shard_set(self.out, f"shard_r{self.rank:03d}_{self.index:05d}", self.rows, self.features)
        self.index, self.written, self.rows = self.index + 1, self.written + len(self.rows), []


class Reporter:
    """Appends bad inputs to this rank's report file, one JSON line each."""

    def __init__(self, path: Path):
        self.file = open(path, "w", encoding="utf-8")
        self.count = 0

    def __call__(self, key: str, source: str, reason: str) -> None:
        self.file.write(json.dumps({"key": key, "source": source, "reason": reason}, ensure_ascii=False) + "\n")
        self.file.flush()
        self.count += 1

    def close(self) -> None:
        self.file.close()


# ------------------------------------------------------------------------------------------- resume and settings


def _markers(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / WORK / "shards").glob("shard_*.json"))}


def check_settings(out: Path, settings: dict) -> None:
    """A folder is resumed only with what made it: other encoders or resolutions would mix incompatible shards."""
    path = out / WORK / "settings.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    diff = [k for k in settings if old.get(k) != settings[k]]
    if diff:
        raise ConfigError(f"{out} holds a precompute made with other settings ({', '.join(diff)}: "
                         f"{[old.get(k) for k in diff]} there, {[settings[k] for k in diff]} now); "
                         f"use a new --out or the same settings")


def prepare_out(out: Path, resolutions: list[int], settings: dict) -> None:
    """Rank 0, before anyone reads state: delete interrupted writes and the previous run's per-rank files."""
    shards = out / WORK / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / WORK / "settings.json", settings)
    for tmp in shards.glob(".*.tmp"):
        tmp.unlink()
    committed = set()
    for name in _markers(out):
        if all((out / str(r) / name).is_dir() for r in resolutions):
            committed.add(name)
        else:  # a committed shard lost a folder (deleted by hand): forget it, its keys get redone
            (shards / f"{name}.json").unlink()
    for r in resolutions:
        (out / str(r)).mkdir(exist_ok=True)
        for d in (out / str(r)).iterdir():
            if d.name.startswith(".tmp_") or (d.name.startswith("shard_") and d.name not in committed):
                shutil.rmtree(d)
    for f in [*(out / WORK).glob("report_r*.jsonl"), *(out / WORK).glob("done_r*.json")]:
        f.unlink()


def resume_state(out: Path, rank: int) -> tuple[set[str], int]:
    """(keys already committed by any rank of any run, this rank's next shard index)."""
    done, next_index = set(), 0
    for m in _markers(out).values():
        done.update(m["keys"])
        if m["rank"] == rank:
            next_index = max(next_index, m["index"] + 1)
    return done, next_index


# ------------------------------------------------------------------------------------------------------- loop


def _batched(items, n: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _decoded(batches, decoder):
    """(records, decoded) per batch, decoding batch k+1 in the background while the caller encodes batch k."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as ex:
        prev = None
        for batch in batches:
            fut = ex.submit(decoder, [r.image for r in batch])
            if prev is not None:
                yield prev[0], prev[1].result()
            prev = (batch, fut)
        if prev is not None:
            yield prev[0], prev[1].result()


def _todo(records, done: set[str], report: Reporter, counts: dict):
    """Good records not yet committed; bad ones go to the report."""
    for rec in records:
        if not rec.ok:
            report(rec.key, rec.source, rec.error)
        elif rec.key in done:
            counts["skipped"] += 1
        else:
            yield rec


def encode_batch(batch, decoded, vae, vinfo: dict, text: TextEncoder, writer: ShardWriter, report: Reporter,
                 min_side: int = 0) -> int:
    """Encode the decodable images of one batch and hand them to the writer; returns how many were stored. Images
    whose short side is under `min_side` are reported and skipped; odd ones are stored with notes."""
    good = []
    for rec, item in zip(batch, decoded):
        if isinstance(item, str):
            report(rec.key, rec.source, item)
        elif min(item.size) < min_side:
            report(rec.key, rec.source, f"image {item.size[0]}x{item.size[1]}: short side under --min-side {min_side}")
        else:
            good.append((rec, item))
    if not good:
        return 0
    latents = {res: encode_latents(vae, torch.stack([d[res] for _, d in good]), vinfo)  # (B, C, h, w) fp16
               for res in writer.features}
    finite = torch.stack([torch.isfinite(z).flatten(1).all(1) for z in latents.values()]).all(0)  # (B,)
    embs, lens = caption_rows(text, [rec.caption for rec, _ in good])
    stored = 0
    for i, (rec, _) in enumerate(good):
        if not finite[i]:  # fp16 overflow or a broken VAE: a NaN here would poison every step that samples it
            report(rec.key, rec.source, "non-finite latent")
            continue
        notes = rec.notes + size_notes(good[i][1].size, max(writer.features))
        writer.add({"key": rec.key, "caption": rec.caption, "latent": {r: z[i].numpy() for r, z in latents.items()},
                    "caption_emb": embs[i], "caption_len": lens[i],
                    "notes": [{"key": rec.key, "source": rec.source, "reason": n} for n in notes]})
        stored += 1
    return stored


def process(args, ctx: Ctx, vae, vinfo: dict, text: TextEncoder, features: dict, out: Path) -> dict:
    """This rank's share: read, skip done, decode, encode, write. Returns counts."""
    from tqdm import tqdm

    done, next_index = resume_state(out, ctx.rank)
    writer = ShardWriter(out, ctx.rank, next_index, args.shard_size, features)
    report = Reporter(out / WORK / f"report_r{ctx.rank:03d}.jsonl")
    decoder = make_decoder(args.decoder, args.resolutions, args.batch_size, args.num_workers, ctx.device)
    counts = {"stored": 0, "skipped": 0}
    records = iter_records(args.source, args.image_column, args.caption_column,
                           select=owned_by(ctx.rank, ctx.world))
    bar = tqdm(desc=f"precompute ({ctx.world} ranks, rank 0 shown)" if ctx.world > 1 else "precompute",
               unit="img", disable=ctx.rank != 0, mininterval=1.0, dynamic_ncols=True)
    try:
        for batch, decoded in _decoded(_batched(_todo(records, done, report, counts), args.batch_size), decoder):
            counts["stored"] += encode_batch(batch, decoded, vae, vinfo, text, writer, report, args.min_side)
            bar.update(len(batch))
            bar.set_postfix(bad=report.count, skipped=counts["skipped"], refresh=False)
        writer.flush()
    finally:
        bar.close()
        report.close()
        decoder.close()
    return {**counts, "bad": report.count}


# ---------------------------------------------------------------------------------------------------- manifest


def finalize(out: Path, settings: dict, sources: list[str]) -> dict:
    """Rank 0 after the barrier: merge every committed shard and every rank's report into manifest + report."""
    markers = list(_markers(out).values())
    keys = [k for m in markers for k in m["keys"]]
    if len(set(keys)) != len(keys):  # unique by construction; this guards the construction
        raise RuntimeError(f"{out}: duplicate keys across shards; delete {out / WORK} and the shards to start over")
    bad = []
    for path in sorted((out / WORK).glob("report_r*.jsonl")):
        bad += [{**json.loads(line), "stored": False} for line in path.read_text(encoding="utf-8").splitlines() if line]
    notes = [{**n, "stored": True} for m in markers for n in m.get("notes", [])]
    lines = sorted(bad + notes, key=lambda b: (b["key"], b["reason"]))
    tmp = out / f".{REPORT}.tmp"
    tmp.write_text("".join(json.dumps(b, ensure_ascii=False) + "\n" for b in lines), encoding="utf-8")
    os.replace(tmp, out / REPORT)
    manifest = {"format": FORMAT, "vae": settings["vae"], "text_encoder": settings["text_encoder"],
                "resolutions": {}, "caption_emb_dtype": "float16", "latent_sampling": settings["latent_sampling"],
                "sources": list(sources), "bad_inputs": len(bad), "notes": len(notes),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for res, shape in settings["latent_shapes"].items():
        shards = sorted((m["resolutions"][res] for m in markers), key=lambda s: s["path"])
        manifest["resolutions"][res] = {"count": sum(s["count"] for s in shards), "latent_shape": shape,
                                        "latent_dtype": "float16", "shards": shards}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def build_settings(args, vae, text: TextEncoder) -> dict:
    vinfo = vae_info(vae, args.vae)
    f = vinfo["downsample"]
    bad = [r for r in args.resolutions if r % f]
    if bad:
        raise ConfigError(f"--resolutions {bad} are not multiples of the VAE's downsampling factor {f}")
    return {"vae": vinfo, "text_encoder": {"name": args.text_encoder, "dim": text.dim, "max_length": text.max_length},
            "latent_shapes": {str(r): [vinfo["latent_channels"], r // f, r // f] for r in args.resolutions},
            "latent_sampling": LATENT_SAMPLING}


def run(args, ctx: Ctx) -> dict | None:
    import datasets

    datasets.disable_progress_bars()  # one bar per run (ours), not one per shard save
    out = Path(args.out)
    check_sources(args.source)
    vae = load_vae(args.vae, args.vae_subfolder, ctx.device)
    text = TextEncoder(args.text_encoder, args.max_caption_len, device=ctx.device)
    settings = build_settings(args, vae, text)
    check_settings(out, settings)
    if ctx.rank == 0:
        prepare_out(out, args.resolutions, settings)
    barrier(ctx)
    features = {r: shard_features(tuple(settings["latent_shapes"][str(r)]), text.dim) for r in args.resolutions}
    t0 = time.perf_counter()
    counts = process(args, ctx, vae, settings["vae"], text, features, out)
    seconds = time.perf_counter() - t0
    write_json_atomic(out / WORK / f"done_r{ctx.rank:03d}.json", {**counts, "seconds": seconds})
    barrier(ctx)
    if ctx.rank != 0:
        return None
    manifest = finalize(out, settings, args.source)
    total = sum(json.loads(p.read_text())["stored"] for p in (out / WORK).glob("done_r*.json"))
    print(f"precompute: {total} images stored in {seconds:.1f} s ({total / max(seconds, 1e-9):.1f} images/s over "
          f"{ctx.world} rank(s)), {counts['skipped']} already done (rank 0), {manifest['bad_inputs']} bad inputs "
          f"in {out / REPORT}; " + ", ".join(f"{r}px: {e['count']}" for r, e in manifest["resolutions"].items()))
    return manifest
