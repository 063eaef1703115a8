"""Evaluation of a trained run (the library behind engine/evaluate.py): generate images with the run's EMA weights,
score them (GenEval-style detector, FID with any feature extractor given, CLIP score) and write eval.json."""
from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# ---------------------------------------------------------------- prompts and reference images


def load_prompts(source: str, n: int) -> list[str]:
    """Prompts of a text file (blank lines and #-comments skipped), cycled to n."""
    lines = [l.strip() for l in Path(source).read_text().splitlines()]
    prompts = [l for l in lines if l and not l.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts-from {source}: no prompts in the file")
    return [prompts[i % len(prompts)] for i in range(n)]


def folder_images(folder: Path, size: tuple[int, int], limit: int | None, batch: int, skipped: list):
    """uint8 (b, H, W, 3) batches of the folder's images (sorted, recursive), decoded and cropped exactly as training
    data is (EXIF orientation, transparency over white, short side resized, centre crop); unreadable files are
    appended to `skipped` and left out."""
    from engine.data.preprocess import decode_image, resize_center_crop

    if size[0] != size[1]:
        raise ValueError(f"reference images are cropped square; got size {size}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    buf, used = [], 0
    for f in files:
        if limit is not None and used >= limit:
            break
        try:
            buf.append(np.asarray(resize_center_crop(decode_image(f.read_bytes(), size[0]), size[0])))
        except Exception as e:  # undecodable, truncated, zero-byte: reported, never fatal
            skipped.append(f"{f}: {type(e).__name__}: {e}")
            continue
        used += 1
        if len(buf) == batch:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def synthetic_batches(ds, n: int, batch: int):
    for i in range(0, n, batch):
        yield ds.images(range(i, min(n, i + batch)))


# ---------------------------------------------------------------- generation


def generate(model, edm, encoder, prompts: list[str], steps: int, cfg_scale: float, seed: int, batch_size: int,
             decoder=None, sampler=None):
    """Yields (start index, images float (b, 3, H, W) in [-1, 1] on the CPU) batch by batch. `sampler`
    (engine/sampling/sampler.py build_sampler) replaces Heun with `steps` and `cfg_scale` by its settings."""
    from engine.sampling.sampler import sample
    from engine.training.seeding import derive_seed

    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        y, y_mask = encoder.encode(prompts[i:i + batch_size])
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "evaluate", i))
        x = sample(model, edm, y.to(device), y_mask.to(device), steps=steps, cfg_scale=cfg_scale, generator=gen,
                   sampler=sampler)
        if decoder is not None:
            x = decoder(x)
        yield i, x.float().clamp(-1, 1).cpu()


# ---------------------------------------------------------------- main


def _step_of(ckpt: Path) -> int | None:
    m = re.search(r"(\d+)$", ckpt.name)
    return int(m.group(1)) if m else None


def build_extractors(args, device) -> dict:
    from engine.eval.fid import HFVisionFeatures, InceptionTorchScript

    ex = {}
    if args.inception:
        ex["inception"] = InceptionTorchScript(args.inception, input_range=args.inception_input,
                                               resize=args.inception_resize, device=device)
    if args.features:
        ex["features"] = HFVisionFeatures(args.features, device=device)
    return ex


def prepare_prompts(args, cfg, data_seed: int) -> tuple[str, list[str], list | None]:
    """(source, prompts, ground-truth PromptSpecs or None) for --num-images images."""
    source = args.prompts_from or ("synthetic" if cfg.data.source == "synthetic" else None)
    if source is None:
        raise SystemExit("--prompts-from <file.txt> is needed for runs not trained on the synthetic dataset")
    if source != "synthetic":
        return source, load_prompts(source, args.num_images), None
    if cfg.data.source != "synthetic":
        raise SystemExit(f"--prompts-from synthetic: the run trained on data.source={cfg.data.source}")
    from engine.data.synthetic import SyntheticShapes
    from engine.eval.geneval import spec_from_describe

    ds = SyntheticShapes(args.num_images, cfg.data.image_size, data_seed, cfg.data.backgrounds)
    idx = range(args.num_images)
    return source, ds.captions(idx), [spec_from_describe(ds.describe(i)) for i in idx]


class Scores:
    """Everything computed from the generated images, fed batch by batch (only the grid's images are kept)."""

    def __init__(self, args, extractors: dict, clip, geneval, out: Path):
        from engine.eval.fid import FeatureStats

        self.args, self.extractors, self.clip, self.geneval, self.out = args, extractors, clip, geneval, out
        self.stats = {k: FeatureStats(e.name) for k, e in extractors.items()}
        self.clip_scores, self.grid, self.image_hw = [], [], None

    def update(self, start: int, u8: np.ndarray, captions: list[str], specs) -> None:
        from engine.outputs.images import save_png

        self.image_hw = tuple(u8.shape[1:3])
        room = self.args.grid - sum(len(g) for g in self.grid)
        if room > 0:
            self.grid.append(u8[:room])
        if self.args.save_images:
            for j, img in enumerate(u8):
                save_png(self.out / "images" / f"{start + j:05d}.png", img)
        for k, e in self.extractors.items():
            self.stats[k].update(e(u8))
        if self.clip is not None:
            self.clip_scores.append(self.clip.scores(u8, captions))
        if self.geneval is not None:
            self.geneval.update(u8, captions, specs)

    def metrics(self, reference: str, ref_ds) -> dict:
        m: dict = {}
        if self.geneval is not None:
            res = self.geneval.result()
            m["geneval"] = {**res.summary(), "detector": "procedural (engine/eval/geneval.py)"}
            with open(self.out / "geneval.jsonl", "w") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in res.per_image)
        if self.extractors:
            m["fid"] = fid_metrics(self.extractors, self.stats, reference, ref_ds, self.args, self.image_hw, self.out)
        if self.clip is not None:
            s = torch.cat(self.clip_scores)
            m["clip_score"] = {"value": float(s.mean()), "std": float(s.std()) if len(s) > 1 else 0.0,
                               "model": self.args.clip, "num_images": len(s)}
        return m


def evaluate_run(args) -> dict:
    """Generate, score and write eval.json for the run and settings in `args` (engine/evaluate.py's options)."""
    t_start = time.perf_counter()
    from engine.config import load_config
    from engine.data.train_data import load_text_encoder
    from engine.diffusion.edm import EDM
    from engine.outputs.images import save_grid_with_captions, to_uint8
    from engine.sampling.sampler import build_sampler
    from engine.sampling.settings import SamplerSettings
    from engine.training.run_folder import load_run_model

    run = Path(args.run)
    settings = SamplerSettings.from_args(args, load_config(run / "config.yaml"), str(run.parent / ".cache"))
    cfg, model, ckpt = load_run_model(run, args.checkpoint, use_ema=not args.raw_weights,
                                      text_encoder=args.text_encoder)
    device = next(model.parameters()).device
    synthetic = cfg.data.source == "synthetic"
    sampler = build_sampler(settings, cfg, device)
    n, steps, scale = args.num_images, sampler.settings.sample.steps, sampler.settings.cfg_scale
    data_seed = cfg.run.seed + 1_000_000 if args.data_seed is None else args.data_seed
    source, prompts, specs = prepare_prompts(args, cfg, data_seed)

    decoder = None
    if cfg.data.channels != 3:  # latent run: decode to pixels
        vae = args.vae or getattr(cfg.data, "vae", "")
        if not vae:
            raise SystemExit("latent run: give --vae <AutoencoderKL id or path> (or set data.vae) to decode images")
        from engine.encoders.vae import LatentDecoder
        decoder = LatentDecoder(vae, device)

    # everything that can fail is loaded and checked before the (long) generation
    extractors = build_extractors(args, device)
    reference = args.reference or ("synthetic" if synthetic and extractors else None)
    ref_ds = check_reference(reference, extractors, synthetic, cfg, max(n, args.num_reference or 0), data_seed)
    clip = None
    if args.clip:
        from engine.eval.clip_score import CLIPScorer
        clip = CLIPScorer(args.clip, device=device)
    geneval = None
    if synthetic and not args.no_geneval:
        from engine.eval.geneval import GenEvalScorer, ShapeDetector
        geneval = GenEvalScorer(ShapeDetector(background="fixed" if cfg.data.backgrounds == "fixed" else "estimate"))
    out = Path(args.out) if args.out else run / "eval" / Path(ckpt).name
    out.mkdir(parents=True, exist_ok=True)
    scores = Scores(args, extractors, clip, geneval, out)

    edm, encoder = EDM.from_config(cfg.diffusion), load_text_encoder(cfg)
    t_gen = time.perf_counter()
    for i, x in generate(model, edm, encoder, prompts, steps, scale, args.seed, args.batch_size, decoder, sampler):
        scores.update(i, to_uint8(x), prompts[i:i + len(x)], specs[i:i + len(x)] if specs else None)
    gen_s = time.perf_counter() - t_gen
    metrics = scores.metrics(reference, ref_ds)

    if scores.grid:
        grid = np.concatenate(scores.grid)
        save_grid_with_captions(out / "grid.png", grid, prompts[:len(grid)], nrow=8)
    result = {
        "run": str(run), "checkpoint": str(ckpt), "step": _step_of(Path(ckpt)),
        "weights": "raw" if args.raw_weights else "ema", "model": cfg.model.name,
        "num_images": n, "image_size": list(scores.image_hw), "steps": steps, "cfg_scale": scale,
        "sampler": sampler.record(),
        "seed": args.seed, "batch_size": args.batch_size,
        "prompts": {"source": source, **({"data_seed": data_seed} if source == "synthetic" else {}),
                    "unique": len(set(prompts))},
        "metrics": metrics,
        "timing": {"generate_s": round(gen_s, 3), "images_per_sec": round(n / max(gen_s, 1e-9), 3),
                   "total_s": round(time.perf_counter() - t_start, 3)},
        "device": str(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {**({"grid": "grid.png"} if scores.grid else {}),
                  **({"geneval": "geneval.jsonl"} if geneval is not None else {})},
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(summary_line(result, out))
    return result


def check_reference(reference: str | None, extractors: dict, synthetic: bool, cfg, num: int, data_seed: int):
    """Fail before generating anything when the FID reference cannot work; the SyntheticShapes set of a
    'synthetic' reference (its first --num-images samples are the prompts' own images when prompts are synthetic)."""
    if not extractors:
        return None
    if reference is None:
        raise SystemExit("FID needs --reference <folder of images | stats.npz> for runs not trained on synthetic data")
    if reference == "synthetic":
        if not synthetic:
            raise SystemExit(f"--reference synthetic: the run trained on data.source={cfg.data.source}")
        from engine.data.synthetic import SyntheticShapes
        return SyntheticShapes(num, cfg.data.image_size, data_seed, cfg.data.backgrounds)
    if reference.endswith(".npz"):
        if not Path(reference).is_file():
            raise SystemExit(f"--reference {reference}: no such file")
        if len(extractors) != 1:
            raise SystemExit("--reference <stats.npz> holds one extractor's statistics: give exactly one extractor")
    elif not Path(reference).is_dir():
        raise SystemExit(f"--reference {reference}: not 'synthetic', a folder of images or an .npz file")
    return None


def reference_stats(reference: str, extractors: dict, ds, args, image_hw, skipped: list) -> dict:
    """FeatureStats of the reference for every extractor, in one pass over its images."""
    from engine.eval.fid import FeatureStats

    if reference.endswith(".npz"):
        (key, e), = extractors.items()
        ref = FeatureStats.load(reference)
        if ref.extractor and ref.extractor != e.name:
            raise SystemExit(f"--reference {reference} was computed with {ref.extractor!r}, not {e.name!r}")
        ref.extractor = ref.extractor or e.name  # pytorch-fid files carry no name: the user vouches for it
        return {key: ref}
    if reference == "synthetic":
        if image_hw != (ds.image_size, ds.image_size):
            raise SystemExit(f"generated images are {image_hw}, the synthetic reference {ds.image_size}px")
        batches = synthetic_batches(ds, args.num_reference or args.num_images, args.batch_size)
    else:
        batches = folder_images(Path(reference), image_hw, args.num_reference, args.batch_size, skipped)
    stats = {k: FeatureStats(e.name) for k, e in extractors.items()}
    for images in batches:
        for k, e in extractors.items():
            stats[k].update(e(images))
    return stats


def fid_metrics(extractors: dict, gen: dict, reference: str, ds, args, image_hw, out: Path) -> dict:
    """{extractor key: FID entry with everything that makes it comparable}; reference stats saved as .npz."""
    from engine.eval.fid import fid_from_stats, warn_if_few

    skipped: list[str] = []
    refs = reference_stats(reference, extractors, ds, args, image_hw, skipped)
    if skipped:
        (out / "reference_skipped.txt").write_text("\n".join(skipped) + "\n")
    entries = {}
    for k, e in extractors.items():
        ref, g = refs[k], gen[k]
        if ref.n is not None and ref.n < 2:
            raise SystemExit(f"--reference {reference}: {ref.n} usable images; FID needs at least 2")
        if not reference.endswith(".npz"):
            ref.save(out / f"reference_{k}.npz")
        dim = int(g.mean.shape[0])
        entry = {"value": fid_from_stats(g, ref), "extractor": e.name, "num_generated": g.n,
                 "num_reference": ref.n, "reference": reference, "feature_dim": dim}
        if skipped:
            entry["reference_skipped"] = len(skipped)
        note = warn_if_few(min(g.n, ref.n or g.n), dim)
        if note:
            entry["note"] = note
        entries[k] = entry
    return entries


def summary_line(result: dict, out: Path) -> str:
    m, parts = result["metrics"], []
    if "geneval" in m:
        g = m["geneval"]
        pos = "n/a" if g["position"] is None else f"{g['position']:.3f}"
        parts.append(f"GenEval all {g['all']:.3f} (colour {g['colour']:.3f}, shape {g['shape']:.3f}, "
                     f"count {g['count']:.3f}, position {pos})")
    for k, f in m.get("fid", {}).items():
        parts.append(f"FID[{k}] {f['value']:.3f}")
    if "clip_score" in m:
        parts.append(f"CLIP score {m['clip_score']['value']:.2f}")
    return (f"{result['num_images']} images, {result['steps']} steps, cfg {result['cfg_scale']}: "
            + "; ".join(parts or ["no metrics"]) + f" -> {out / 'eval.json'}")

