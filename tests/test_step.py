"""The optimizer step through the real FSDP2 path: a non-finite step is skipped on the device, a finite one applied."""
import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from engine.config import OptimConfig
from engine.data.batch import Batch
from engine.diffusion.edm import EDM
from engine.diffusion.noise import draw_step_noise
from engine.training.ema import make_ema
from engine.training.optim import build_optimizer, lr_factor
from engine.training.parallel import parallelize
from engine.training.step import StepCounters, train_step
from models.sizes import build_model, model_config


@pytest.fixture
def parts(dist_env):
    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
    ema = make_ema(model)
    model = parallelize(model, dist_env.device, torch.float32)
    ema = parallelize(ema, dist_env.device, torch.float32)
    return model, ema, build_optimizer(model, OptimConfig(lr=1e-2)), StepCounters(dist_env.device)


def batch(bad=False, padded=False):
    x = torch.randn(4, 3, 32, 32)
    if bad:
        x[0, 0, 0, 0] = float("nan")
    mask = torch.arange(5)[None] < torch.tensor([[5], [2], [3], [5]]) if padded else torch.ones(4, 5, dtype=torch.bool)
    return [(Batch(x, torch.randn(4, 5, 8), mask), 0, 4)]


def snapshot(module):
    return [p.full_tensor().clone() for p in module.parameters()]


def test_nonfinite_step_is_skipped_and_counted_then_training_goes_on(parts):
    model, ema, opt, counters = parts
    edm = EDM()
    noise = draw_step_noise(edm, 0, 0, 4, (3, 32, 32), 64, 0.5, 0.1, torch.device("cpu"))
    with torch.no_grad():  # an EMA equal to the model would not move under any update: make them differ
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before, ema_before = snapshot(model), snapshot(ema)
    train_step(model, ema, opt, edm, noise, batch(bad=True), 1.0, 0.9, counters)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(ema), ema_before))
    assert counters.nonfinite_total.item() == 1 and counters.streak.item() == 1
    train_step(model, ema, opt, edm, noise, batch(bad=True), 1.0, 0.9, counters)
    assert counters.max_streak.item() == 2
    train_step(model, ema, opt, edm, noise, batch(), 1.0, 0.9, counters)
    after = snapshot(model)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert counters.streak.item() == 0 and counters.nonfinite_total.item() == 2
    assert counters.finite_steps.item() == 1 and torch.isfinite(counters.loss_sum)
    step_counts = {int(s["step"]) for s in opt.state.values()}
    assert step_counts == {1}  # the skipped steps did not advance AdamW's bias correction
    # EMA moved by exactly (1 - decay) of the way
    for e0, m1, e1 in zip(ema_before, after, snapshot(ema)):
        torch.testing.assert_close(e1, e0 + 0.1 * (m1 - e0))


def test_weight_decay_groups():
    """Default: decay only tensors with 2+ dimensions; decay_norms_and_biases: every parameter, as the official code."""
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
    n_all, n_1d = len(list(model.parameters())), sum(p.dim() < 2 for p in model.parameters())
    assert n_1d > 0
    for flag, decayed in ((False, n_all - n_1d), (True, n_all)):
        groups = build_optimizer(model, OptimConfig(weight_decay=0.1, decay_norms_and_biases=flag)).param_groups
        assert sum(len(g["params"]) for g in groups if g["weight_decay"] == 0.1) == decayed
        assert sum(len(g["params"]) for g in groups) == n_all


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == 0.0  # the official trainer's warmup starts at 0
    assert lr_factor(9, 100, cfg) == pytest.approx(0.9)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.55)
    assert lr_factor(50, 100, OptimConfig(warmup_steps=0, schedule="constant")) == 1.0


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_schedule_matches_transformers(shape):
    """After warmup, optim.schedule=wsd is transformers' get_wsd_schedule at every step: the peak until the last
    decay_fraction of the steps, then down to min_lr_ratio in the configured shape."""
    optimization = pytest.importorskip("transformers.optimization")
    total, warmup, fraction, floor = 200, 10, 0.25, 0.1
    cfg = OptimConfig(lr=1.0, warmup_steps=warmup, schedule="wsd", decay_fraction=fraction, decay_shape=shape,
                      min_lr_ratio=floor)
    decay = round(fraction * total)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = optimization.get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
                                           num_stable_steps=total - warmup - decay, decay_type=shape,
                                           min_lr_ratio=floor).lr_lambdas[0]
    for step in range(warmup, total + 1):
        assert lr_factor(step, total, cfg) == pytest.approx(theirs(step), abs=1e-12), step
    assert lr_factor(total - decay - 1, total, cfg) == 1.0 and lr_factor(total, total, cfg) == pytest.approx(floor)
    assert lr_factor(total - decay + 1, total, cfg) < 1.0
    # lengthened before its decay began (a resume with more steps), the run so far had the longer run's lr
    assert all(lr_factor(step, total, cfg) == lr_factor(step, 2 * total, cfg) for step in range(total - decay))


def test_activation_checkpointing_gives_the_same_step(dist_env):
    def one_step(ac: bool):
        torch.manual_seed(0)
        model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
        ema = parallelize(make_ema(model), dist_env.device, torch.float32)
        model = parallelize(model, dist_env.device, torch.float32, activation_checkpointing=ac)
        opt = build_optimizer(model, OptimConfig(lr=1e-2))
        torch.manual_seed(1)
        noise = draw_step_noise(EDM(), 0, 0, 4, (3, 32, 32), 64, 0.5, 0.1, torch.device("cpu"))
        wrapped = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
        assert wrapped == (len(model.blocks) + len(model.patch_mixer) if ac else 0)  # the flag reached the blocks
        train_step(model, ema, opt, EDM(), noise, batch(), 1.0, 0.9, StepCounters(dist_env.device))
        return snapshot(model)

    for a, b in zip(one_step(False), one_step(True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_step_runs_and_keeps_the_noise_level_in_fp32(dist_env):
    """FSDP2 casts parameters to bf16; the fp32 position-embedding buffer must not promote activations back to fp32,
    and c_noise must reach the timestep features unrounded."""
    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
    ema = parallelize(make_ema(model), dist_env.device, torch.bfloat16)
    model = parallelize(model, dist_env.device, torch.bfloat16)
    seen = {}
    model.t_embedder.register_forward_pre_hook(lambda m, args: seen.setdefault("c_noise", args[0]))
    counters = StepCounters(dist_env.device)
    noise = draw_step_noise(EDM(), 0, 0, 4, (3, 32, 32), 64, 0.5, 0.1, torch.device("cpu"))
    train_step(model, ema, build_optimizer(model, OptimConfig(lr=1e-3)), EDM(), noise, batch(), 1.0, 0.9, counters)
    assert counters.finite_steps.item() == 1 and torch.isfinite(counters.loss_sum)
    assert seen["c_noise"].dtype == torch.float32
    torch.testing.assert_close(seen["c_noise"], noise.sigma.log() / 4)


def forward_backward(model, backward: bool = True):
    torch.manual_seed(2)
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2), torch.randn(2, 4, 8), None)
    if backward:
        out.square().mean().backward()


@pytest.mark.parametrize("reshard", [True, False])
def test_reshard_after_forward_reaches_every_block(dist_env, reshard):
    """train.reshard_after_forward=false (SHARD_GRAD_OP): after forward each block still holds its gathered weights
    (plain tensors) for backward; true frees them (sharded DTensors again), so backward gathers them once more."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
    model = parallelize(model, dist_env.device, torch.float32, reshard_after_forward=reshard)
    forward_backward(model, backward=False)
    blocks = list(model.patch_mixer) + list(model.blocks)
    assert all(isinstance(p, DTensor) == reshard for b in blocks for p in b.parameters())


def test_reduce_dtype_bf16_reduces_gradients_in_bf16(dist_env):
    """train.reduce_dtype: fp32 sums keep fp32 gradients; bf16 rounds every gradient to a bf16 value."""
    def grads(reduce_dtype):
        torch.manual_seed(0)
        model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
        for p in model.parameters():
            p.data.normal_(0, 0.05)
        model = parallelize(model, dist_env.device, torch.float32, reduce_dtype=reduce_dtype)
        forward_backward(model)
        return [p.grad.to_local() for p in model.parameters() if p.grad is not None]

    is_bf16 = lambda g: torch.equal(g, g.bfloat16().float())
    assert all(map(is_bf16, grads(torch.bfloat16)))
    assert not all(map(is_bf16, grads(torch.float32)))


def test_compiled_step_equals_the_eager_step(dist_env):
    """train.compile: every block compiled whole (fullgraph) under FSDP2 gives the eager step's loss and weights.
    aot_eager traces forward and backward as inductor does, without code generation (minutes on two CPU cores);
    the GPU speed of the real inductor step is bench/test_train_step.py's compile case."""
    def one_step(compile: bool):
        torch.manual_seed(0)  # two backbone blocks: tracing time is per block
        model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8, depth=2))
        ema = parallelize(make_ema(model), dist_env.device, torch.float32)
        model = parallelize(model, dist_env.device, torch.float32, compile=compile, compile_backend="aot_eager")
        opt, counters = build_optimizer(model, OptimConfig(lr=1e-2)), StepCounters(dist_env.device)
        noise = draw_step_noise(EDM(), 0, 0, 4, (3, 32, 32), 64, 0.5, 0.1, torch.device("cpu"))
        train_step(model, ema, opt, EDM(), noise, batch(padded=True), 1.0, 0.9, counters)
        assert sum(b._compiled_call_impl is not None for b in [*model.patch_mixer, *model.blocks]) == (
            len(model.patch_mixer) + len(model.blocks) if compile else 0)  # the flag reached every block
        return counters.loss_sum, snapshot(model)

    (loss_e, eager), (loss_c, compiled) = one_step(False), one_step(True)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_one_fp32_process_without_sharding_follows_the_sharded_trajectory(dist_env):
    """train.fsdp=auto leaves a single fp32 process unsharded (FSDP's hooks cost time and shard nothing there): its
    steps, including a skipped non-finite one, must match the FSDP2 path."""
    runs = {}
    for shard in (True, False):
        torch.manual_seed(0)
        model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
        ema = parallelize(make_ema(model), dist_env.device, torch.float32, shard=shard)
        model = parallelize(model, dist_env.device, torch.float32, shard=shard)
        opt, counters, edm = build_optimizer(model, OptimConfig(lr=1e-2)), StepCounters(dist_env.device), EDM()
        torch.manual_seed(1)
        for step, bad in enumerate((False, True, False)):
            noise = draw_step_noise(edm, 0, step, 4, (3, 32, 32), 64, 0.5, 0.1, torch.device("cpu"))
            train_step(model, ema, opt, edm, noise, batch(bad=bad), 1.0, 0.9, counters)
        full = lambda m: [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in m.parameters()]
        runs[shard] = (full(model), full(ema), counters.loss_sum.item(), counters.nonfinite_total.item())
    (m1, e1, l1, n1), (m0, e0, l0, n0) = runs[True], runs[False]
    assert n1 == n0 == 1 and l1 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(m1 + e1, m0 + e0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(m0, e0))  # the EMA is not the model: the comparison can bite


def test_unsharded_path_refuses_what_needs_fsdp(dist_env):
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
    with pytest.raises(ValueError, match="one process in fp32"):
        parallelize(model, dist_env.device, torch.bfloat16, shard=False)


def test_compiling_more_blocks_than_dynamos_recompile_limit(dist_env, monkeypatch):
    """Every block shares one forward code object, so each block of another width or kind (layer-wise scaling, MoE
    every other block) is a recompile of it: the XL model's 32 blocks passed Dynamo's default limit of 8 and, under
    fullgraph, failed on the GPU. parallelize raises the limit to cover the blocks it compiles."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # Dynamo's default, whatever ran before
    monkeypatch.setattr(torch._dynamo.config, "accumulated_recompile_limit", 256)
    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8, depth=10))
    n_blocks = len(model.patch_mixer) + len(model.blocks)
    assert n_blocks > torch._dynamo.config.recompile_limit  # the case that failed
    model = parallelize(model, dist_env.device, torch.float32, compile=True, compile_backend="eager", shard=False)
    forward_backward(model)
    assert all(p.grad is not None for p in model.blocks[-1].parameters() if p.requires_grad)
