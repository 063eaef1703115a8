"""Evaluation of a trained run (the library behind engine/evaluate.py), by the comparison protocol: a fixed prompt set,
image i's initial noise fixed by (seed, i), scores with bootstrap confidence intervals, and per-image records so that
two evaluations can be compared image by image (engine/eval/compare.py).

Scores: the GenEval-style detector and the attribute Fréchet distance (synthetic runs, always), FID with any feature
extractor given (engine/eval/reference.py) and the CLIP score. eval.json records everything a number depends on.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from engine.config import ConfigError
from engine.eval.denoising import CHECK_SIGMAS
from engine.eval.protocol import HELD_OUT_SEED, PromptSet, mean_ci, start_noise, statistic_ci, to_size
from engine.training.run_folder import resolve_checkpoint, step_of

GENEVAL_METRICS = ("colour", "shape", "count", "position", "all")


# ---------------------------------------------------------------- inputs


def prompt_set(args, cfg) -> PromptSet:
    """The evaluation's prompts: the held-out synthetic set, or a prompt file."""
    from engine.eval.protocol import file_prompt_set, synthetic_prompt_set

    source = args.prompts_from or ("synthetic" if cfg.data.source == "synthetic" else None)
    if source is None:
        raise ConfigError("--prompts-from <file.txt> is needed for runs not trained on the synthetic dataset")
    if source != "synthetic":
        return file_prompt_set(source, args.num_images)
    if cfg.data.source != "synthetic":
        raise ConfigError(f"--prompts-from synthetic: the run trained on data.source={cfg.data.source}")
    data_seed = HELD_OUT_SEED if args.data_seed is None else args.data_seed
    if data_seed == cfg.run.seed:
        raise ConfigError(f"--data-seed {data_seed} is the run's training seed: the prompt set must be held out")
    return synthetic_prompt_set(args.num_images, cfg.data.image_size, data_seed, training_captions(cfg),
                                cfg.data.backgrounds)


def training_captions(cfg) -> set[str]:
    from engine.data.synthetic import synthetic_train_set

    ds = synthetic_train_set(cfg)
    return set(ds.captions(range(cfg.data.num_samples)))


# ---------------------------------------------------------------- generation


def generate(model, edm, embed, prompts: list[str], sampler, seed: int, batch_size: int, decoder=None,
             image_size: int | None = None):
    """Yields (start index, images float (b, 3, H, W) in [-1, 1] on the CPU) batch by batch, made by `sampler`
    (engine/sampling/sampler.py build_sampler). Image i starts from the noise paired_noise(seed, i): the same for any
    batch size, run or sampler setting (start_noise: a nested model's high stream too). A model that makes smaller
    images than `image_size` (trained on pooled data, or scored at --score-size) has them upsampled (nearest) to it."""
    from engine.sampling.sampler import sample

    device = next(model.parameters()).device
    c = model.cfg
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        y, y_mask = embed(batch)
        noise = start_noise(edm, c.in_channels, c.input_size, seed, i, len(batch), device)
        if hasattr(sampler.start, "select"):  # a start made of the prompts' own images: which ones
            sampler.start.select(i, len(batch))
        x = sample(model, edm, y, y_mask, sampler=sampler, noise=noise)
        if decoder is not None:
            x = decoder(x)
        yield i, to_size(x, image_size).float().clamp(-1, 1).cpu()


class Scores:
    """Everything computed from the generated images, fed batch by batch (only the grid's images are kept)."""

    def __init__(self, args, extractors: dict, clip, geneval, attributes, out: Path):
        from engine.eval.fid import FeatureStats

        self.args, self.extractors, self.clip, self.geneval, self.attributes = args, extractors, clip, geneval, attributes
        self.out = out
        self.stats = {k: FeatureStats(e.name) for k, e in extractors.items()}
        self.clip_scores, self.grid, self.attr_features, self.image_hw = [], [], [], None

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
        if self.attributes is not None:
            self.attr_features.append(self.attributes(u8).numpy())
        if self.clip is not None:
            self.clip_scores.append(self.clip.scores(u8, captions))
        if self.geneval is not None:
            self.geneval.update(u8, captions, specs)

    def metrics(self, reference: str, ref_ds, prompts: PromptSet) -> dict:
        from engine.eval.reference import fid_metrics

        m: dict = {}
        if self.geneval is not None:
            m["geneval"] = geneval_metrics(self.geneval.result(), prompts, self.out)
        if self.attributes is not None:
            m["fd_attr"] = attribute_fd(self.attributes, np.concatenate(self.attr_features), prompts, self.out)
            m.update(structure_gaps(np.concatenate(self.attr_features), np.load(self.out / "reference_attr.npy")))
        if self.extractors:
            m["fid"] = fid_metrics(self.extractors, self.stats, reference, ref_ds, self.args, self.image_hw, self.out)
        if self.clip is not None:
            s = torch.cat(self.clip_scores)
            m["clip_score"] = {"value": float(s.mean()), "std": float(s.std()) if len(s) > 1 else 0.0,
                               "ci": mean_ci(s.tolist())["ci"], "model": self.args.clip, "num_images": len(s)}
        return m


def geneval_metrics(res, prompts: PromptSet, out: Path) -> dict:
    """Means with bootstrap 95% CIs, split by whether training saw the caption; per-image records to geneval.jsonl."""
    with open(out / "geneval.jsonl", "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in res.per_image)
    g = {**res.summary(), "detector": "procedural (engine/eval/geneval.py)"}
    g["ci"] = {k: mean_ci([r[k] for r in res.per_image])["ci"] for k in GENEVAL_METRICS}
    if prompts.seen is not None:
        for name, want in (("seen_captions", True), ("unseen_captions", False)):
            rows = [r for r in res.per_image if prompts.seen[r["index"]] == want]
            g[name] = {k: mean_ci([r[k] for r in rows]) for k in GENEVAL_METRICS}
    return g


def attribute_fd(extractor, features: np.ndarray, prompts: PromptSet, out: Path) -> dict:
    """Fréchet distance in attribute-feature space between the generated images and the prompts' own (held-out,
    never trained on) dataset images, with a bootstrap CI; both feature sets are saved for paired comparisons."""
    from engine.data.synthetic import SyntheticShapes
    from engine.eval.attribute_net import frechet_of_features

    n = len(features)
    ds = SyntheticShapes(n, extractor.net.image_size, prompts.data_seed, prompts.backgrounds)
    ref = np.concatenate([extractor(ds.images(range(i, min(n, i + 256)))).numpy() for i in range(0, n, 256)])
    np.save(out / "features_attr.npy", features.astype(np.float32))
    np.save(out / "reference_attr.npy", ref.astype(np.float32))
    ci = statistic_ci(lambda idx: frechet_of_features(features[idx], ref[idx]), n, floor=0.0)
    return {**ci, "extractor": extractor.name, "reference": f"SyntheticShapes(seed={prompts.data_seed}), paired"}


def structure_gaps(features: np.ndarray, reference: np.ndarray) -> dict:
    """engine/eval/structure_gap.py's statistics of the generated vs the paired reference features, with CIs."""
    from engine.eval.structure_gap import STATISTICS

    return {name: {**statistic_ci(lambda idx, f=f: f(features[idx], reference[idx]), len(features), floor=0.0),
                   "space": "attribute features"} for name, f in STATISTICS.items()}


# ---------------------------------------------------------------- main


def held_out_sampler(settings, cfg, prompts: PromptSet, size: int, device):
    """--cascade-from-data: the cascade's second part, started from the prompts' own held-out images pooled to
    `size` (engine/sampling/cascade.py HeldOutStart)."""
    from engine.data.synthetic import SyntheticShapes
    from engine.sampling.autoguide import guide_of
    from engine.sampling.cascade import held_out_cascade
    from engine.sampling.plan import make_plan
    from engine.sampling.sampler import Sampler, churn_of

    if prompts.data_seed is None:
        raise ConfigError("--cascade-from-data needs the synthetic prompt set: its held-out images are the first stage")
    data = SyntheticShapes(len(prompts.prompts), cfg.data.image_size, prompts.data_seed, cfg.data.backgrounds)
    whole = make_plan(settings)
    plan, start = held_out_cascade(settings, whole, data, size)
    return Sampler(settings, plan, start, churn_of(settings.sample, whole), guide_of(settings, cfg, device))


def scored_size(args, cfg) -> int:
    """Side of the images that are scored: the run's data.image_size, or --score-size, a multiple of it that each
    pixel is replicated to (to pair a run drawn at 16 px with one pooled from 32, whose samples are replicated so)."""
    size = args.score_size or cfg.data.image_size
    if size % cfg.data.image_size:
        raise ConfigError(f"--score-size {size} must be a multiple of the run's data.image_size "
                          f"{cfg.data.image_size}: each pixel is replicated to a square")
    if size != cfg.data.image_size and (args.inception or args.features):
        raise ConfigError(f"--score-size {size}: --inception/--features compare with reference images of the run's "
                          f"size {cfg.data.image_size}; leave one of them out")
    return size


def evaluate_run(args) -> dict:
    """Generate, score and write eval.json for the run and settings in `args` (engine/evaluate.py's options)."""
    t_start = time.perf_counter()
    from engine.config import load_config
    from engine.diffusion.edm import EDM
    from engine.eval.reference import build_extractors, check_reference
    from engine.outputs.images import save_grid_with_captions, to_uint8
    from engine.sampling.sampler import build_sampler
    from engine.sampling.settings import SamplerSettings
    from engine.training.run_folder import load_run_model, make_embedder

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run-dir {run}: not a run folder (no config.yaml)")
    run_cfg = load_config(run / "config.yaml")
    size = scored_size(args, run_cfg)  # checked before the model is loaded
    from_data = getattr(args, "cascade_from_data", None)
    if from_data is not None:  # the cascade with held-out images for its first stage: no low run
        args.init, args.cascade_run = "cascade", "held-out images"
    settings = SamplerSettings.from_args(args, run_cfg, str(run.parent / ".cache"))
    if run_cfg.model.experts and (args.checkpoint or args.step is not None):
        raise ConfigError(f"--checkpoint/--step: {run} samples with its experts' newest checkpoints "
                          f"({', '.join(run_cfg.model.experts)}); evaluate an expert's checkpoint from its own run")
    ckpt = None if run_cfg.model.experts else str(resolve_checkpoint(run, args.checkpoint, args.step))
    cfg, model, ckpt = load_run_model(run, ckpt, use_ema=not args.raw_weights, text_encoder=args.text_encoder)
    device = next(model.parameters()).device
    synthetic = cfg.data.source == "synthetic"
    prompts = prompt_set(args, cfg)
    if from_data is None:
        sampler = build_sampler(settings, cfg, device)
    else:
        sampler = held_out_sampler(settings, cfg, prompts, from_data, device)
    n, steps, scale = args.num_images, sampler.settings.sample.steps, sampler.settings.cfg_scale

    decoder = None
    if cfg.data.channels != 3:  # latent run: decode to pixels
        vae = args.vae or cfg.data.vae
        if not vae:
            raise ConfigError("latent run: give --vae <AutoencoderKL id or path> (or set data.vae) to decode images")
        from engine.encoders.vae import LatentDecoder
        decoder = LatentDecoder(vae, device)

    # everything that can fail is loaded and checked before the (long) generation and before anything is written
    extractors = build_extractors(args, device)
    reference = args.reference or ("synthetic" if synthetic and extractors else None)
    ref_ds = check_reference(reference, extractors, synthetic, cfg, max(n, args.num_reference or 0),
                             prompts.data_seed if prompts.data_seed is not None else HELD_OUT_SEED)
    if args.caption_use and not synthetic:
        raise ConfigError("--caption-use changes the synthetic captions' attributes: the run must train on "
                          f"data.source=synthetic, not {cfg.data.source}")
    if args.caption_use and cfg.model.outer:
        raise ConfigError("--caption-use: a nested run (model.outer) is not supported")
    if args.train_gap and not synthetic:
        raise ConfigError("--train-gap regenerates the synthetic training images: the run must train on "
                          f"data.source=synthetic, not {cfg.data.source}")
    if args.train_gap and cfg.model.outer:
        raise ConfigError("--train-gap: a nested run (model.outer) is not supported")
    clip = None
    if args.clip:
        from engine.eval.clip_score import CLIPScorer
        clip = CLIPScorer(args.clip, device=device)
    geneval = attributes = None
    if synthetic and not args.no_geneval:
        from engine.eval.attribute_net import cached_attribute_net
        from engine.eval.geneval import GenEvalScorer, ShapeDetector
        geneval = GenEvalScorer(ShapeDetector(background="fixed" if cfg.data.backgrounds == "fixed" else "estimate"))
        if prompts.data_seed is not None and size == cfg.data.image_size:
            # the attribute FD compares with the prompts' own held-out images, at the size its net was trained on
            attributes = cached_attribute_net(cfg.data.image_size, Path(cfg.run.out_dir) / ".cache")
    embed = make_embedder(cfg, device)
    embed(prompts.prompts[:1])  # loads the text encoder now: a missing one fails before anything is written
    out = Path(args.out) if args.out else run / "eval" / Path(ckpt).name
    out.mkdir(parents=True, exist_ok=True)
    scores = Scores(args, extractors, clip, geneval, attributes, out)

    edm = EDM.from_config(cfg.diffusion)
    t_gen = time.perf_counter()
    for i, x in generate(model, edm, embed, prompts.prompts, sampler, args.seed, args.batch_size, decoder, size):
        specs = prompts.specs[i:i + len(x)] if prompts.specs else None
        scores.update(i, to_uint8(x), prompts.prompts[i:i + len(x)], specs)
    gen_s = time.perf_counter() - t_gen
    metrics = scores.metrics(reference, ref_ds, prompts)
    check_sigmas = args.check_sigmas or CHECK_SIGMAS  # the noise levels of the two denoising checks
    if args.caption_use:
        from engine.eval.caption_use import caption_use, caption_use_table
        metrics["caption_use"] = caption_use(model, edm, cfg, embed, num_images=min(n, 128), seed=args.seed,
                                             sigmas=check_sigmas)
        print(caption_use_table(metrics["caption_use"]))
    if args.train_gap:
        from engine.eval.train_gap import train_gap, train_gap_table
        metrics["train_gap"] = train_gap(model, edm, cfg, embed, num_images=n, seed=args.seed, sigmas=check_sigmas)
        print(train_gap_table(metrics["train_gap"]))

    if scores.grid:
        grid = np.concatenate(scores.grid)
        save_grid_with_captions(out / "grid.png", grid, prompts.prompts[:len(grid)], nrow=8)
    result = {
        "run": str(run), "checkpoint": str(ckpt), "step": step_of(Path(ckpt)),
        "weights": "raw" if args.raw_weights else "ema", "model": cfg.model.name, "text_encoder": cfg.data.text_encoder,
        "num_images": n, "image_size": list(scores.image_hw), "steps": steps, "cfg_scale": scale,
        "model_resolutions": edm.stream_sizes(cfg.data.image_size),
        "seed": args.seed, "batch_size": args.batch_size,
        "sampler": sampler.record(),
        "noise": {"seed": args.seed, "rule": "image i starts from paired_noise(seed, i) (engine/eval/protocol.py)"},
        "prompts": prompts.record(),
        "metrics": metrics,
        "timing": {"generate_s": round(gen_s, 3), "images_per_sec": round(n / max(gen_s, 1e-9), 3),
                   "total_s": round(time.perf_counter() - t_start, 3)},
        "device": str(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "files": {**({"grid": "grid.png"} if scores.grid else {}),
                  **({"geneval": "geneval.jsonl", "features": "features_attr.npy", "reference_features":
                      "reference_attr.npy"} if geneval is not None else {})},
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(summary_line(result, out))
    return {**result, "folder": str(out)}


def summary_line(result: dict, out: Path) -> str:
    m, parts = result["metrics"], []

    def with_ci(value, ci) -> str:
        return f"{value:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    if "geneval" in m:
        g = m["geneval"]
        pos = "n/a" if g["position"] is None else with_ci(g["position"], g["ci"]["position"])
        parts.append(f"GenEval all {with_ci(g['all'], g['ci']['all'])} (colour {with_ci(g['colour'], g['ci']['colour'])}"
                     f", shape {with_ci(g['shape'], g['ci']['shape'])}, count {with_ci(g['count'], g['ci']['count'])}"
                     f", position {pos})")
    if "fd_attr" in m:
        parts.append(f"attribute FD {with_ci(m['fd_attr']['value'], m['fd_attr']['ci'])}")
    if "struct_attr" in m:
        parts.append(f"structure gap {with_ci(m['struct_attr']['value'], m['struct_attr']['ci'])}")
    for k, f in m.get("fid", {}).items():
        parts.append(f"FID[{k}] {f['value']:.3f}")
    if "clip_score" in m:
        parts.append(f"CLIP score {m['clip_score']['value']:.2f}")
    return (f"{result['num_images']} images, {result['sampler']['nfe']} NFE, cfg {result['cfg_scale']}: "
            + "; ".join(parts or ["no metrics"]) + f" -> {out / 'eval.json'}")
