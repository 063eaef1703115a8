"""One process of the patch-parallel tests (tests/test_patch_parallel.py); not a test module.

`python tests/parallel_worker.py SPEC RANK WORLD` joins a gloo group through the spec's file store, runs the spec's
jobs in order and saves what each returned to <spec>.rank<RANK>.pt. The helpers that build the test model, its inputs
and the sampler settings are shared with the test, which computes the one-process references from the same ones.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from engine.config import Config  # noqa: E402
from engine.diffusion.edm import EDM  # noqa: E402
from engine.sampling.settings import SamplerSettings  # noqa: E402

CAPTION_WIDTH = 16
EDM_PIXELS = EDM(sigma_data=0.5)


def random_model(seed: int = 0, pixel_head: int = 0):
    """MicroDiT_Nano_4 at 32 px (8 token rows, MoE in two blocks) with every weight random: the zero-initialised
    gates and outputs are drawn too, so no block is the identity and every band depends on the others. pixel_head:
    the width of a convolutional pixel head after the patch output (0 = none)."""
    from models.sizes import build_model, model_config

    torch.manual_seed(seed)
    model = build_model(model_config("MicroDiT_Nano_4", input_size=32, in_channels=3, caption_channels=CAPTION_WIDTH,
                                     pixel_head=pixel_head))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model.eval()


def inputs(batch: int = 2, seed: int = 1):
    """Caption embeddings (B, 5, 16) with one padded caption, and the initial noise (B, 3, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, 5, CAPTION_WIDTH, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[-1, 3:] = False
    return y, mask, torch.randn(batch, 3, 32, 32, generator=g)


def settings(parallel: str = "none", solver: str = "heun", nfe: int = 7, routing: str = "displaced",
             warmup: int = 1, cfg_scale: float = 2.0, base: Config | None = None) -> SamplerSettings:
    cfg = base or Config()
    s = cfg.sample
    s.solver, s.nfe, s.order, s.parallel, s.moe_routing, s.warmup_evals = solver, nfe, 2, parallel, routing, warmup
    s.cfg_scale = cfg_scale
    return SamplerSettings.from_config(cfg.validate())


def one_process(model, edm, y, mask, noise, **settings_kw) -> torch.Tensor:
    """The one-process reference: sample() with the same settings, on one thread as the workers."""
    from engine.sampling.sampler import build_sampler, sample

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sample(model, edm, y, mask, sampler=build_sampler(settings(**settings_kw)), noise=noise)
    finally:
        torch.set_num_threads(threads)


def load(source):
    """(model, edm, base config) of a job's model source: {"random": seed, optional "pixel_head": width} or {"run":
    run folder}."""
    if "random" in source:
        return random_model(source["random"], source.get("pixel_head", 0)), EDM_PIXELS, None
    from engine.training.run_folder import load_run_model

    cfg, model, _ = load_run_model(Path(source["run"]), None)
    return model, EDM.from_config(cfg.diffusion), cfg


def sample_job(job: dict, rank: int) -> dict:
    from engine.sampling.parallel_sample import parallel_sample
    from engine.sampling.sampler import build_sampler

    model, edm, base = load(job["model"])
    kv_calls = count_calls([b.cross_attn.kv_linear for b in [*model.patch_mixer, *model.blocks]])
    if "kill_at" in job and rank == 1:  # this process dies in the middle of sampling, as a crash would end it
        evals = iter(range(1, 10**9))
        model.register_forward_pre_hook(
            lambda *_: os.kill(os.getpid(), signal.SIGKILL) if next(evals) == job["kill_at"] else None)
    sampler = build_sampler(settings(**job["settings"], base=base))
    y, mask, noise = job["inputs"]
    images, stats = parallel_sample(model, edm, y, mask, sampler, noise)
    return {"images": images, "stats": stats.record(), "kv_calls": kv_calls}


def count_calls(modules) -> list[int]:
    """A list whose i-th entry counts the forward calls of modules[i] from now on."""
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def exchange_value(key: str, rank: int, evaluation: int) -> torch.Tensor:
    """A distinct tensor per (key, band, evaluation), of odd sizes and mixed dtypes (the packed buffer's slots)."""
    dtype, width = {"a": (torch.float32, 5), "b": (torch.bfloat16, 3), "c": (torch.int64, 1)}[key]
    return (torch.arange(2 * 3 * width).view(2, 3, width) + 1000 * rank + 100 * evaluation).to(dtype)


def exchange_job(job: dict, rank: int) -> list[dict]:
    """Every evaluation's all_bands() of keys a, b, c through an Exchange."""
    from engine.sampling.exchange import Exchange

    ex = Exchange(displaced=True, warmup_evals=job["warmup"], total_evals=job["evals"])
    seen = []
    for e in range(1, job["evals"] + 1):
        ex.begin_eval()
        seen.append({k: ex.all_bands(k, exchange_value(k, rank, e)) for k in "abc"})
        ex.end_eval()
    ex.finish()
    return seen


JOBS = {"sample": sample_job, "exchange": exchange_job}


def launch(tmp: Path, jobs: dict, world: int = 2, wait: bool = True):
    """Start `world` processes of this file on a spec holding `jobs`; with wait, each rank's results (a failed
    process fails the caller with its stderr), else (spec path, processes)."""
    import subprocess

    spec = tmp / f"spec{len(list(tmp.glob('spec*.pt')))}.pt"
    torch.save({"store": f"{spec}.store", "jobs": jobs}, spec)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(spec), str(r), str(world)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    if not wait:
        return spec, procs
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(f"{spec}.rank{r}.pt", weights_only=False) for r in range(world)]


def main(spec_path: str, rank: int, world: int) -> None:
    spec = torch.load(spec_path, weights_only=False)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{spec['store']}", rank=rank, world_size=world)
    results = {name: JOBS[job["kind"]](job, rank) for name, job in spec["jobs"].items()}
    torch.save(results, f"{spec_path}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
