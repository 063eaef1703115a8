"""The training run: build (data, model, FSDP2, optimizer, EMA), resume from the last complete checkpoint if the run
folder has one, then loop. The loop reads device values only on log steps."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import Config, ConfigError, config_diff, load_config, save_config
from engine.data.train_data import build_train_data, key_padding_mask
from engine.diffusion.edm import EDM
from engine.diffusion.noise import draw_step_noise
from engine.eval.final_check import final_check
from engine.outputs.reporting import embed_prompts, truncate_jsonl, write_loss_curve, write_sample_grid
from engine.sampling.sampler import build_sampler
from engine.sampling.settings import SamplerSettings
from engine.training.billing import Ledger
from engine.training.checkpoint import Checkpointer, load_model_weights
from engine.training.ema import ema_decay_at, make_ema
from engine.training.experts import train_experts
from engine.training.metrics import MetricsLogger, ThroughputMeter
from engine.training.network import build_run_network, stream_shapes
from engine.training.optim import build_optimizer, lr_factor, set_lr
from engine.training.parallel import Dist, parallelize, param_dtype
from engine.training.step import StepCounters, train_step
from models.flops import tokens_per_image, train_flops_per_image


@dataclass
class Run:
    cfg: Config
    dist: Dist
    dir: Path
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: object
    encoder: object
    edm: EDM
    ckpt: Checkpointer
    decoder: object  # latents -> images for sample grids (None: pixel space, or no data.vae given)
    sadm: object = None  # engine/training/sadm.py's Sadm when sadm.enabled

    def aux(self) -> dict | None:
        """Networks trained beside the model, with their optimizers, for the checkpoints."""
        return None if self.sadm is None else self.sadm.checkpoint_entries()


def build(cfg: Config, d: Dist) -> Run:
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    cache = Path(cfg.run.out_dir) / ".cache"
    if cfg.sample.init == "cascade" or cfg.sample.guide_run:  # a missing or mismatched low or guiding model stops
        build_sampler(SamplerSettings.from_config(cfg, cache_dir=str(cache)), cfg, d.device)  # the run before it writes
    check_resumable(run_dir, cfg, d.is_main)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    # The main process embeds the captions first and fills the on-disk cache; the others then read it.
    if d.is_main:
        data, encoder = build_train_data(cfg, d.device, cache, d.rank, d.world_size)
    dist.barrier()
    if not d.is_main:
        data, encoder = build_train_data(cfg, d.device, cache, d.rank, d.world_size)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every process
    model = build_run_network(cfg, asdict(cfg.kernels))
    ema = make_ema(model)
    dtype = param_dtype(cfg.train.precision, d.device)
    t = cfg.train
    reduce = torch.bfloat16 if t.reduce_dtype == "bf16" else torch.float32
    shard = t.fsdp == "always" or d.world_size > 1 or dtype != torch.float32
    model = parallelize(model.to(d.device), d.device, dtype, t.activation_checkpointing, t.compile,
                        t.reshard_after_forward, reduce, shard=shard)
    ema = parallelize(ema.to(d.device), d.device, dtype, shard=shard)
    edm = EDM.from_config(cfg.diffusion)
    ckpt = Checkpointer(run_dir / "checkpoints", keep_last=t.keep_checkpoints)
    decoder = None
    if cfg.data.vae and d.is_main:
        from engine.encoders.vae import LatentDecoder
        decoder = LatentDecoder(cfg.data.vae, d.device)
    sadm = None
    if cfg.sadm.enabled:
        from engine.training.sadm import Sadm
        sadm = Sadm(cfg.sadm, model.cfg.patch_channels, model.cfg.num_patches, d.device, cfg.run.seed)
    return Run(cfg, d, run_dir, model, ema, build_optimizer(model, cfg.optim), data, encoder, edm, ckpt, decoder, sadm)


def check_resumable(run_dir: Path, cfg: Config, is_main: bool) -> None:
    """Resuming with other settings is allowed (more steps, say) and the changes are listed; a different global
    batch is refused, on every process, before anything is written: the data position would jump."""
    if not (run_dir / "config.yaml").is_file():
        return
    old = load_config(run_dir / "config.yaml")
    changed = config_diff(old, cfg)
    if changed and is_main:
        print(f"warning: resuming {run_dir} with a changed config: {'; '.join(changed)}", flush=True)
    if old.train.global_batch != cfg.train.global_batch and Checkpointer(run_dir / "checkpoints").checkpoints():
        raise ConfigError(
            f"config: train.global_batch={cfg.train.global_batch} but {run_dir} was trained at "
            f"{old.train.global_batch}: resuming would move the data position. Keep the global batch, or start a new "
            "phase from its checkpoint with train.init_from and another run.name")


def resume_or_init(run: Run, meter: ThroughputMeter) -> tuple[int, StepCounters]:
    """Continue from the newest complete checkpoint of this run, else start from `train.init_from` or scratch."""
    counters = StepCounters(run.dist.device)
    latest = run.ckpt.latest()
    if latest is not None:
        try:
            extra = run.ckpt.load(latest, model=run.model, ema=run.ema, optimizer=run.optimizer, aux=run.aux())
        except ValueError as e:
            if run.sadm is None or "sadm_disc" not in str(e):
                raise
            raise ConfigError(f"config: sadm.enabled=True but {latest} was trained without SADM (no discriminator to "
                              "resume); start a new run from it with train.init_from and another run.name") from None
        if run.sadm is not None:
            run.sadm.load_window(extra.get("sadm_window"), is_main=run.dist.is_main)
        counters.nonfinite_total.fill_(extra["nonfinite_total"])
        counters.streak.fill_(extra["streak"])
        counters.load_window(extra.get("window"), is_main=run.dist.is_main)
        meter.load_state_dict(extra["meter"])
        step = extra["step"]
        if run.dist.is_main:
            truncate_jsonl(run.dir / "metrics.jsonl", step)
            print(f"resuming {run.dir} from {latest.name} (step {step})", flush=True)
        return step, counters
    t = run.cfg.train
    if t.init_from:
        try:
            load_model_weights(t.init_from, run.model, run.ema, from_ema=t.init_from_ema, prefix=t.init_prefix,
                               resize_patches=t.init_resize_patches)
        except (OSError, ValueError) as e:  # no such folder, an unfinished save, or weights of another model
            where = f" into train.init_prefix={t.init_prefix!r}" if t.init_prefix else ""
            raise ConfigError(f"config: train.init_from={t.init_from!r}{where}: {e}") from None
    return 0, counters


def micro_batches(run: Run, step: int) -> list:
    """This process's micro-batches of `step`: (Batch, lo, hi) with [lo, hi) positions in the global batch."""
    t, d = run.cfg.train, run.dist
    per_rank = t.global_batch // d.world_size
    start = d.rank * per_rank
    out = []
    for lo in range(start, start + per_rank, t.micro_batch):
        hi = lo + t.micro_batch
        out.append((run.data.batch(step, t.global_batch, lo, hi), lo, hi))
    return out


def read_counters(run: Run, counters: StepCounters, last: torch.Tensor) -> tuple[list, list, list]:
    """One host sync: [loss_sum, finite_steps] summed over processes, then max_streak, nonfinite_total and `last`
    (identical on every process); and SADM's window values summed over processes and identical ones."""
    summed = torch.stack([counters.loss_sum, counters.finite_steps])
    same = [torch.stack([counters.max_streak, counters.nonfinite_total, last])]
    if run.sadm is not None:
        summed = torch.cat([summed, run.sadm.summed()])
        same.append(run.sadm.same())
    dist.all_reduce(summed)  # sum over processes; the other counters are identical on every process
    values = torch.cat([summed, *same]).tolist()  # NOTE: host sync (log and checkpoint steps only, one each)
    k = len(summed)
    return values[:2] + values[k:k + 3], values[2:k], values[k + 3:]


def log_window(run: Run, step: int, counters: StepCounters, meter: ThroughputMeter, logger: MetricsLogger, bar) -> None:
    """Read the device counters (the loop's only host sync), check the non-finite streak, write a metrics line."""
    (loss_sum, finite, max_streak, skipped, grad_norm), sadm_summed, sadm_same = read_counters(
        run, counters, counters.grad_norm)
    limit = run.cfg.train.max_nonfinite_steps
    if max_streak >= limit:
        raise FloatingPointError(
            f"{int(max_streak)} consecutive steps had a non-finite loss or gradient (limit train.max_nonfinite_steps="
            f"{limit}); stopped at step {step}. Lower optim.lr or check the data; the last good checkpoint is kept."
        )
    record = {"step": step, "loss": loss_sum / finite if finite else None, "grad_norm": grad_norm,
              "lr": run.optimizer.param_groups[0]["lr"], "nonfinite_skipped": int(skipped), **meter.report(step)}
    if run.sadm is not None:
        record.update(run.sadm.record(sadm_summed, sadm_same, run.dist.world_size))
        run.sadm.reset_window()
    logger.log(step, record)
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.4f}" if record["loss"] is not None else "nan",
                        img_s=f"{record['images_per_sec']:.0f}")
    counters.reset_window()


def checkpoint(run: Run, step: int, counters: StepCounters, meter: ThroughputMeter, prompts) -> None:
    # The open logging window (steps since the last metrics line) is saved summed over processes, so the first
    # line after a resume averages the same steps as an uninterrupted run's.
    (loss_sum, finite, max_streak, skipped, streak), sadm_summed, sadm_same = read_counters(
        run, counters, counters.streak)
    extra = {"step": step, "samples_seen": step * run.cfg.train.global_batch, "nonfinite_total": skipped,
             "streak": streak, "meter": meter.state_dict(),
             "window": {"loss_sum": loss_sum, "finite_steps": finite, "max_streak": max_streak, "steps": counters.steps}}
    if run.sadm is not None:
        extra["sadm_window"] = run.sadm.window_state(sadm_summed, sadm_same)
    run.ckpt.save(step, model=run.model, ema=run.ema, optimizer=run.optimizer, extra=extra, aux=run.aux())
    write_samples(run, step, prompts)
    if run.dist.is_main:
        write_loss_curve(run.dir / "metrics.jsonl", run.dir / "loss_curve.png", title=f"{run.cfg.run.name}: training loss")


def write_samples(run: Run, step: int, prompts) -> None:
    if prompts is None:
        return
    s = run.cfg.sample
    settings = SamplerSettings.from_config(run.cfg, cache_dir=str(Path(run.cfg.run.out_dir) / ".cache"))
    write_sample_grid(run.dir / "samples" / f"step_{step:08d}.png", run.ema, run.edm, *prompts, steps=s.steps,
                      cfg_scale=s.cfg_scale, seed=s.seed, is_main=run.dist.is_main, decoder=run.decoder,
                      sampler=build_sampler(settings, run.cfg, run.dist.device))


def train(cfg: Config, d: Dist) -> Path:
    """Train the run (or, with model.experts, each expert in turn: engine/training/experts.py); returns its folder."""
    if cfg.model.experts:
        return train_experts(cfg, d, train)
    run = build(cfg, d)
    t = cfg.train
    mcfg = run.model.cfg
    flops = train_flops_per_image(mcfg, cfg.data.caption_len, cfg.diffusion.mask_ratio)  # every stream counted
    meter = ThroughputMeter(d.world_size, t.global_batch, tokens_per_image(mcfg, cfg.diffusion.mask_ratio), flops,
                            t.steps, cfg.cost.usd_per_gpu_hour, device=d.device)
    start, counters = resume_or_init(run, meter)
    ledger = Ledger(run.dir / "billing.json", d.is_main)
    if ledger.earlier:  # it bills a killed process's work after its last checkpoint too; the checkpoint cannot
        meter.load_state_dict(ledger.prior())
    run.data.start(start)
    logger = MetricsLogger(run.dir, purge_step=start or None)
    prompts = None
    if run.encoder is not None:
        captions, y, y_mask = embed_prompts(run.encoder, cfg.sample.prompts, cfg.sample.per_prompt, d.device)
        prompts = captions, y, key_padding_mask(cfg, y_mask)
    bar = None
    if d.is_main and t.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=start, desc=cfg.run.name, dynamic_ncols=True)
    *lower, shape = stream_shapes(mcfg)  # the noise of the (highest) stream, and of a nested model's lower ones

    run.model.train()
    ledger.record(d.world_size, meter.this_process())  # a run killed in its first window still bills its setup
    for step in range(start, t.steps):
        meter.step_start()
        set_lr(run.optimizer, cfg.optim.lr * lr_factor(step, t.steps, cfg.optim))
        noise = draw_step_noise(run.edm, cfg.run.seed, step, t.global_batch, shape, mcfg.num_patches,
                                cfg.diffusion.mask_ratio, cfg.data.caption_dropout, d.device, tuple(lower))
        batches = micro_batches(run, step)
        meter.data_ready()
        ema_decay = ema_decay_at(step, t.ema_decay, t.ema_start)
        train_step(run.model, run.ema, run.optimizer, run.edm, noise, batches, cfg.optim.grad_clip, ema_decay, counters,
                   sadm=run.sadm, step=step)
        meter.step_end()
        done = step + 1
        if bar is not None:
            bar.update(1)
        if done % t.log_every == 0 or done == t.steps:
            log_window(run, done, counters, meter, logger, bar)
            ledger.record(d.world_size, meter.this_process())
        if done % t.ckpt_every == 0 or done == t.steps:
            checkpoint(run, done, counters, meter, prompts)
            meter.exclude_pause()
            ledger.record(d.world_size, meter.this_process())
        elif t.sample_every and done % t.sample_every == 0:
            write_samples(run, done, prompts)
            meter.exclude_pause()
    if bar is not None:
        bar.close()
    logger.close()
    if start < t.steps:  # not when a finished run is started again
        final_check(run.dir, run.ema, run.edm, run.encoder, cfg, t.steps, d.is_main)
    return run.dir
