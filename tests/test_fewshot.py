"""TiF few-shot learner: the task generator (deterministic, colour tied in the shots and rotated in the swapped set,
nested shots), TiF's weights (no underflow zeros, the analytic limits), shared noise across classes, and the CLI's
bad input."""
import math

import pytest
import torch

from engine.adapters.fewshot_task import COLOURS_TIED, MAX_SHOTS, make_task
from engine.adapters.lora import LoRA
from engine.adapters.tif import class_errors, classify, margin_by_sigma, tif_weights, weights
from engine.config import ConfigError
from engine.data.synthetic import COLOURS
from engine.diffusion.edm import EDM
from models.sizes import build_model, model_config


def colour_of(img: torch.Tensor) -> str:
    """The palette colour of the object pixels (those away from the background)."""
    px = ((img + 1) * 127.5).round().flatten(1).T  # (HW, 3)
    fg = px[(px - torch.tensor([24.0, 24, 24])).abs().sum(1) > 30]
    mean = fg.mean(0)
    return min(COLOURS, key=lambda c: float((torch.tensor(COLOURS[c], dtype=torch.float32) - mean).norm()))


def test_task_is_deterministic_nested_and_colour_tied():
    a, b = make_task(3, 4), make_task(3, 4)
    assert torch.equal(a.shots, b.shots) and torch.equal(a.swapped, b.swapped)
    assert not torch.equal(make_task(4, 4).shots, a.shots)
    one = make_task(3, 1)
    assert torch.equal(one.shots, a.shots[::4])  # K-shot sets of a seed are nested
    for img, c in zip(a.shots, a.shot_labels.tolist()):
        assert colour_of(img) == COLOURS_TIED[c]
    for img, c in zip(a.swapped, a.test_labels.tolist()):
        assert colour_of(img) == COLOURS_TIED[(c + 1) % 3]
    notch = make_task(0, 2, "notch")
    assert notch.classes == ("square", "notched") and notch.shots.shape[0] == 4


def test_too_many_shots_and_unknown_kind_are_config_errors():
    with pytest.raises(ConfigError, match="shots per class available"):
        make_task(0, MAX_SHOTS + 1)
    with pytest.raises(ConfigError, match="kind"):
        make_task(0, 1, "stars")


def test_tif_weights_have_no_underflow_zeros_and_the_right_limits():
    sigmas = torch.logspace(-3, 2, 40)
    w = tif_weights(sigmas, d=20.0, delta=2.0, J=100)
    assert (w > 0).all() and (w <= 1).all()
    assert w[0] == pytest.approx(1.0, abs=1e-6)  # tiny noise: only the finest difference is indistinguishable
    assert (w[1:] <= w[:-1] + 1e-7).all() and w[-1] < 0.05  # falls with sigma
    huge = float(tif_weights(torch.tensor([1e5]), d=20.0, delta=2.0, J=100))
    assert huge == pytest.approx(1 / 101, rel=1e-3)  # huge noise: all J + 1 terms equal
    # the official float64 formula underflows to exactly 0 where this one is ~1
    s = 0.05
    official = math.erfc(20.0 / (2 * math.sqrt(2) * s))
    assert official == 0.0 and float(tif_weights(torch.tensor([s]), 20.0, 2.0, 100)) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="window"):
        weights("window:50,60", torch.logspace(-2, 1, 8), 1.0, 0.1, 2)


def test_one_noise_draw_per_sigma_is_shared_by_all_classes():
    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8)).eval()
    lora = LoRA(model, num_adapters=3, rank=2)  # B = 0: every class's denoiser is the same
    images = make_task(0, 1).aligned[:4]

    def embed(caps):
        return torch.zeros(len(caps), 5, 8), None

    sig = torch.tensor([0.05, 0.5, 5.0])
    err = class_errors(model, EDM(), lora, images, embed, sig, seed=1)
    assert err.shape == (4, 3, 3)
    torch.testing.assert_close(err[:, 0], err[:, 1], rtol=0, atol=0)  # same noise, same denoiser: same error
    assert torch.equal(err, class_errors(model, EDM(), lora, images, embed, sig, seed=1))
    labels = torch.tensor([0, 1, 2, 0])
    assert classify(err, torch.ones(3)).shape == (4,) and margin_by_sigma(err, labels).shape == (3,)


@pytest.mark.parametrize("args, why", [(["--shots", "17"], "--shots 17"), (["--rank", "0"], "--rank"),
                                       (["--weighting", "best"], "--weighting"), (["--kind", "x"], "--kind")])
def test_cli_bad_input_is_one_config_error(tmp_path, args, why):
    from engine import fewshot

    with pytest.raises(ConfigError, match=why):
        fewshot.main(["--run", str(tmp_path), *args])
