"""Train gap (engine/eval/train_gap.py): a perfect memoriser of the training set shows a gap, a training set that is
the held-out set shows none, and the training images are the run's own."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.config import load_config
from engine.data.synthetic import synthetic_train_set
from engine.eval.protocol import HELD_OUT_SEED
from engine.eval.train_gap import train_gap, train_gap_table

ROOT = Path(__file__).resolve().parents[1]


def config(num_samples: int, seed: int = 0):
    cfg = load_config(ROOT / "configs/tiny_32px.yaml")
    cfg.data.num_samples, cfg.run.seed = num_samples, seed
    return cfg


def embed(captions):
    """A stand-in text encoder: one value per caption (its length), enough to tell captions apart."""
    return torch.tensor([float(len(c)) for c in captions]).view(-1, 1, 1).expand(-1, 2, 8).contiguous(), None


class Memoriser:
    """The empirical optimum at low noise: D(x) is the training image nearest to x (of side `size`: a model trained
    on data pooled to it)."""
    nested = False

    def __init__(self, images: torch.Tensor, size: int | None = None):
        self.images, self.size = images.flatten(1), size

    def stream_sizes(self, image_size: int) -> list[int]:
        return [self.size or image_size]

    def denoise(self, model, x, sigma, y, y_mask):
        nearest = torch.cdist(x.flatten(1), self.images).argmin(1)
        return self.images[nearest].view_as(x)


class Blur:
    """A denoiser that knows nothing of any training set: the noisy input, average-pooled."""
    nested = False

    def stream_sizes(self, image_size: int) -> list[int]:
        return [image_size]

    def denoise(self, model, x, sigma, y, y_mask):
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)


def test_a_memoriser_has_no_error_on_its_training_images_and_a_large_one_on_new_ones():
    cfg = config(num_samples=12)
    train = synthetic_train_set(cfg).images(range(12))
    res = train_gap(torch.nn.Linear(1, 1), Memoriser(train), cfg, embed, num_images=64, sigmas=(0.05, 0.2),
                    batch_size=5)
    assert res["num_images"] == 12  # the whole training set, and as many held-out images
    for t, h, r in zip(res["train"], res["held_out"], res["ratio"]):
        assert t["mean"] == 0.0 and h["mean"] > 0.05 and r > 1e6


def test_a_model_trained_on_pooled_data_is_checked_on_pooled_images():
    from engine.diffusion.nested import pool_to

    cfg = config(num_samples=12)
    train = pool_to(synthetic_train_set(cfg).images(range(12)), 16)
    res = train_gap(torch.nn.Linear(1, 1), Memoriser(train, size=16), cfg, embed, num_images=12, sigmas=(0.05,),
                    batch_size=5)
    assert res["train"][0]["mean"] == 0.0 and res["held_out"][0]["mean"] > 0.05


def test_a_training_set_drawn_with_the_held_out_seed_has_a_ratio_of_exactly_one():
    cfg = config(num_samples=4096, seed=HELD_OUT_SEED)  # its training images are the held-out ones
    res = train_gap(torch.nn.Linear(1, 1), Blur(), cfg, embed, num_images=10, sigmas=(0.5, 4.0), batch_size=4)
    assert res["ratio"] == [1.0, 1.0]
    assert [c["mean"] for c in res["train"]] == [c["mean"] for c in res["held_out"]]


def test_the_held_out_set_follows_the_training_sets_colour_knobs_under_another_seed():
    cfg = config(num_samples=64)
    cfg.data.colour_bias, cfg.data.caption_colour_dropout = "red=0.8", 0.5
    twin, train = synthetic_train_set(cfg, seed=HELD_OUT_SEED), synthetic_train_set(cfg)
    assert (twin.colour_weights, twin.caption_colour_dropout) == (train.colour_weights, train.caption_colour_dropout)
    assert twin.seed == HELD_OUT_SEED != train.seed and twin.captions(range(8)) != train.captions(range(8))


def test_the_table_names_both_sets_and_the_ratio():
    cfg = config(num_samples=4096)
    res = train_gap(torch.nn.Linear(1, 1), Blur(), cfg, embed, num_images=4, sigmas=(1.0,), batch_size=4)
    table = train_gap_table(res)
    assert "train" in table and "held_out" in table and f"{res['ratio'][0]:.3f}" in table


def test_a_split_run_is_measured_with_each_noise_levels_expert():
    """per_image_mse (shared by train gap and caption use): an ExpertSwitch answers with the expert of the level."""
    from engine.eval.denoising import per_image_mse
    from engine.sampling.experts import ExpertSwitch

    class Constant(torch.nn.Module):
        def __init__(self, value: float):
            super().__init__()
            self.value, self.cfg = value, None

    class ByExpert:  # D(x) = the expert's constant everywhere
        def denoise(self, net, x, sigma, y, y_mask):
            return torch.full_like(x, net.value)

    switch = ExpertSwitch([Constant(1.0), Constant(0.5)], [2.0])
    x0 = torch.zeros(3, 3, 4, 4)
    for s, want in ((4.0, 1.0), (0.5, 0.25)):
        mse = per_image_mse(switch, ByExpert(), x0, x0, torch.full((3,), s), None, None)
        assert mse.tolist() == [want] * 3
