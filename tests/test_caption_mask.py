"""A caption mask with no padded key is never passed to attention (a boolean mask, even all true, keeps SDPA off its
flash kernel); the decision is the config's (data.attend_to_padding), never a look at the mask (a host sync)."""
import torch

from engine.config import load_config
from engine.data.batch import Batch
from engine.data.train_data import build_train_data
from engine.diffusion.edm import EDM
from engine.diffusion.noise import draw_step_noise
from engine.sampling.sampler import sample
from engine.training.ema import make_ema
from engine.training.optim import build_optimizer
from engine.training.parallel import parallelize
from engine.training.step import StepCounters, train_step
from models.sizes import build_model, model_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def spied_model():
    """A Nano model whose every attention call records the key mask it got (None or a tensor)."""
    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8))
    seen = []
    for m in model.modules():
        if hasattr(m, "attn_fn"):
            fn = m.attn_fn
            m.attn_fn = lambda q, k, v, mask, fn=fn: seen.append(mask) or fn(q, k, v, mask)
    return model, seen


def cross_masks(seen):
    return [m for m in seen if m is not None]


def test_train_step_passes_no_mask_when_the_batch_has_none(dist_env):
    model, seen = spied_model()
    ema = parallelize(make_ema(model), dist_env.device, torch.float32)
    model = parallelize(model, dist_env.device, torch.float32)
    opt = build_optimizer(model, load_config(ROOT / "configs/tiny_32px.yaml").optim)
    noise = draw_step_noise(EDM(), 0, 0, 4, (3, 32, 32), 64, 0.5, 0.5, torch.device("cpu"))
    x, y = torch.randn(4, 3, 32, 32), torch.randn(4, 5, 8)
    train_step(model, ema, opt, EDM(), noise, [(Batch(x, y, None), 0, 4)], 1.0, 0.9, StepCounters(dist_env.device))
    assert seen and not cross_masks(seen)  # caption dropout included: dropped captions need no mask either
    seen.clear()
    padded = torch.arange(5)[None] < torch.tensor([[5], [2], [3], [5]])
    train_step(model, ema, opt, EDM(), noise, [(Batch(x, y, padded), 0, 4)], 1.0, 0.9, StepCounters(dist_env.device))
    assert cross_masks(seen)  # real padding keeps the masked path


def test_synthetic_data_with_visible_padding_yields_no_mask(tmp_path):
    def first_batch(attend):
        cfg = load_config(ROOT / "configs/tiny_32px.yaml", ["data.num_samples=16", f"data.attend_to_padding={attend}"])
        data, _ = build_train_data(cfg, torch.device("cpu"), tmp_path)
        return data.batch(0, 8, 0, 8)

    assert first_batch("true").y_mask is None
    mask = first_batch("false").y_mask
    assert mask.dtype == torch.bool and not mask.all()  # the synthetic captions are padded to caption_len


def test_sampler_with_guidance_keeps_no_mask():
    model, seen = spied_model()
    y = torch.randn(2, 5, 8)
    images = sample(model.eval(), EDM(), y, None, steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and seen and not cross_masks(seen)
