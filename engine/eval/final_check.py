"""The line a training run ends with: GenEval-style scores of its final EMA model on the first few prompts of the
held-out prompt set, with the protocol's paired noise, so a newcomer sees at once whether the model learned what its
captions say. Written to <run>/final_eval.json as well. Synthetic runs only (the detector reads the dataset's shapes).

It runs on every process (the EMA is sharded), and the main process scores; engine/evaluate.py gives the full
evaluation with confidence intervals on more prompts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from engine.eval.protocol import HELD_OUT_SEED, mean_ci, start_noise, synthetic_prompt_set, to_size

METRICS = ("colour", "shape", "count", "position", "all")


def final_check(run_dir: Path, model, edm, encoder, cfg, step: int, is_main: bool) -> dict | None:
    """Score `model` (the EMA) with the run's sampler on cfg.sample.final_eval_images held-out prompts; print one line
    and write final_eval.json on the main process. None when off (0 images) or not a synthetic image model."""
    from engine.data.train_data import key_padding_mask
    from engine.eval.geneval import GenEvalScorer, ShapeDetector
    from engine.sampling.sampler import build_sampler, sample
    from engine.sampling.settings import SamplerSettings
    from engine.training.parallel import reshard

    s, n = cfg.sample, cfg.sample.final_eval_images
    if n == 0 or cfg.data.source != "synthetic" or encoder is None or cfg.diffusion.objective != "edm":
        return None  # the detector reads images of the synthetic set; an initial-step model makes mean images
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    prompts = synthetic_prompt_set(n, cfg.data.image_size, HELD_OUT_SEED, backgrounds=cfg.data.backgrounds)
    sampler = build_sampler(SamplerSettings.from_config(cfg, cache_dir=str(Path(cfg.run.out_dir) / ".cache")), cfg,
                            device)
    y, y_mask = encoder.encode(prompts.prompts)
    y_mask = key_padding_mask(cfg, y_mask)
    noise = start_noise(edm, cfg.data.channels, edm.stream_sizes(cfg.data.image_size)[-1], s.seed, 0, n, device)
    was_training = model.training
    model.eval()
    images = sample(model, edm, y.to(device), None if y_mask is None else y_mask.to(device), sampler=sampler,
                    noise=noise)
    images = to_size(images, cfg.data.image_size)  # a model of pooled data: its images, upsampled
    reshard(model)
    model.train(was_training)
    if not is_main:
        return None
    scorer = GenEvalScorer(ShapeDetector(background="fixed" if cfg.data.backgrounds == "fixed" else "estimate"))
    scorer.update(images.float().clamp(-1, 1).cpu(), prompts.prompts, prompts.specs)
    rows = scorer.result().per_image
    scores = {m: mean_ci([r[m] for r in rows]) for m in METRICS}
    result = {"step": step, "num_images": n, "prompts": prompts.record(), "noise_seed": s.seed,
              "sampler": sampler.record(), "weights": "ema",
              "scores": scores, "seconds": round(time.perf_counter() - t0, 2)}
    (run_dir / "final_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result, run_dir / "final_eval.json"), flush=True)
    return result


def summary(result: dict, path: Path) -> str:
    sc = result["scores"]
    parts = ", ".join(f"{m} {sc[m]['mean']:.2f}" for m in ("colour", "shape", "count", "position")
                      if sc[m]["mean"] is not None)
    lo, hi = sc["all"]["ci"]
    return (f"final EMA model, {result['num_images']} held-out prompts: GenEval-style all-correct "
            f"{sc['all']['mean']:.2f} [95% CI {lo:.2f}-{hi:.2f}] ({parts}) -> {path}")
