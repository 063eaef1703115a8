"""Hand-written LoRA: identity at init, per-sample routing equals a loop over adapters, merge/unmerge, the model's
state_dict keys untouched, checkpoint round trip, bad rank refused."""
import pytest
import torch

from engine.adapters.lora import LoRA
from engine.config import ConfigError
from models.sizes import build_model, model_config


def nano(seed=0):
    torch.manual_seed(seed)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8, init="official")).eval()
    with torch.no_grad():  # zero-initialised gates and final layer would hide the adapters
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


def inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, generator=g), torch.randn(b, 5, 8, generator=g))


def randomise_b(lora, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.B.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_identity_at_init_and_keys_untouched():
    model = nano()
    keys = list(model.state_dict())
    x, c, y = inputs()
    ref = model(x, c, y)
    lora = LoRA(model, num_adapters=3, rank=2)
    with lora.attach(model, torch.tensor([0, 1, 2])):
        assert torch.equal(model(x, c, y), ref)
    assert list(model.state_dict()) == keys and len(lora.names) == 4 * 5 + 3 * 3  # dense blocks have w1-3


def test_per_sample_routing_equals_a_loop_over_adapters():
    model = nano()
    x, c, y = inputs(4)
    lora = LoRA(model, num_adapters=3, rank=2)
    randomise_b(lora)
    idx = torch.tensor([2, 0, -1, 1])
    with lora.attach(model, idx):
        routed = model(x, c, y)
    for i, k in enumerate(idx.tolist()):
        if k < 0:
            alone = model(x[i:i + 1], c[i:i + 1], y[i:i + 1])
        else:
            with lora.attach(model, torch.tensor([k])):
                alone = model(x[i:i + 1], c[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(routed[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(routed[0], model(x, c, y)[0])  # the adapter does something


def test_merge_equals_routing_and_unmerge_restores():
    model = nano()
    x, c, y = inputs()
    lora = LoRA(model, num_adapters=2, rank=3)
    randomise_b(lora)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with lora.attach(model, torch.tensor([1, 1, 1])):
        routed = model(x, c, y)
    lora.merge(model, 1)
    torch.testing.assert_close(model(x, c, y), routed, rtol=1e-4, atol=1e-5)
    lora.unmerge(model, 1)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    model = nano()
    x, c, y = inputs()
    lora = LoRA(model, num_adapters=2, rank=2, alpha=4.0)
    randomise_b(lora)
    lora.save(tmp_path / "adapters" / "lora.pt", weights_hash="abc")
    back, meta = LoRA.load(tmp_path / "adapters" / "lora.pt", model)
    assert meta == {"weights_hash": "abc"} and back.spec() == lora.spec()
    idx = torch.tensor([0, 1, 1])
    with lora.attach(model, idx):
        a = model(x, c, y)
    with back.attach(model, idx):
        assert torch.equal(model(x, c, y), a)


def test_bad_rank_and_targets_are_config_errors():
    model = nano()
    with pytest.raises(ConfigError, match="rank must be >= 1"):
        LoRA(model, num_adapters=2, rank=0)
    with pytest.raises(ConfigError, match="match no nn.Linear"):
        LoRA(model, num_adapters=2, targets=r"nothing\.here")
