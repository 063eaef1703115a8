"""SingDiffusion's initial-step model in EDM form: a time-free network, its loss, its guidance rules, the start states
(noise, data_mean, sing) and, end to end, training one with the engine and sampling from it with any solver."""
import json
import sys
from pathlib import Path

import pytest
import torch

from engine.config import Config
from engine.diffusion.edm import EDM
from engine.diffusion.init_step import init_step_loss, predict
from engine.diffusion.noise import draw_step_noise
from engine.sampling.plan import make_plan
from engine.sampling.sampler import Sampler, sample
from engine.sampling.settings import SamplerSettings
from engine.sampling.start import InitStepStart, MeanImageStart
from models.sizes import build_model, model_config

ROOT = Path(__file__).resolve().parents[1]


def nano(time_free: bool):
    torch.manual_seed(0)
    model = build_model(model_config("MicroDiT_Nano_4", in_channels=3, caption_channels=8, time_free=time_free))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.eval()


def test_time_free_model_has_no_timestep_input():
    x, y, mask = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    free, timed = nano(True), nano(False)
    assert not any("t_embedder" in n for n, _ in free.named_parameters())
    assert torch.equal(free(x, torch.zeros(2), y, mask), free(x, torch.full((2,), 3.0), y, mask))
    assert not torch.equal(timed(x, torch.zeros(2), y, mask), timed(x, torch.full((2,), 3.0), y, mask))


def test_init_step_loss_is_the_x0_error_on_kept_patches():
    model, edm = nano(True), EDM(objective="init_step")
    noise = draw_step_noise(edm, 0, 0, 2, (3, 32, 32), 64, 0.5, 0.0, torch.device("cpu"))
    x0, y, mask = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    f = edm.sigma_data * model(noise.noise, torch.zeros(2), y, mask, noise.keep_idx)  # (B, K, P)
    target = torch.stack([model.patchify(x0)[b, noise.keep_idx[b]] for b in range(2)])
    expected = (((f - target) / edm.sigma_data) ** 2).mean()
    torch.testing.assert_close(init_step_loss(edm, model, x0, y, mask, noise), expected)
    torch.testing.assert_close(edm.loss(model, x0, y, mask, noise), expected)  # the engine's loss dispatches


@pytest.mark.parametrize("guidance", ["normalized", "plain", "none"])
def test_initial_step_guidance_rules(guidance):
    model, edm = nano(True), EDM(objective="init_step")
    n, y, mask = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    w = 3.0
    c = predict(edm, model, n, y, mask)
    u = predict(edm, model, n, torch.zeros_like(y), torch.ones_like(mask))
    want = {"normalized": (u + w * (c - u)) / w, "plain": u + w * (c - u), "none": c}[guidance]
    torch.testing.assert_close(InitStepStart(model, edm, guidance)(n, y, mask, w), want)
    # an initial-step model's own "sample" is its (plainly guided) prediction
    out = sample(model, edm, y, mask, cfg_scale=w, generator=torch.Generator().manual_seed(1))
    n1 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, InitStepStart(model, edm, "plain")(n1, y, mask, w))


def test_start_state_is_x0_hat_plus_sigma_max_noise(solver_spy):
    seen = solver_spy("euler")
    cfg = Config()
    cfg.sample.solver, cfg.sample.nfe, cfg.diffusion.sigma_max = "euler", 3, 20.0
    settings = SamplerSettings.from_config(cfg.validate())
    mean = torch.linspace(-1, 1, 3 * 32 * 32).view(3, 32, 32)
    y, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    model = nano(False)
    for start, x0_hat in [(None, torch.zeros(3, 32, 32)), (MeanImageStart(mean), mean)]:
        sample(model, EDM(), y, mask, generator=torch.Generator().manual_seed(2),
               sampler=Sampler(settings, make_plan(settings), start))
        n = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).double()
        assert seen["sigmas"][0] == 20.0 and len(seen["sigmas"]) == 4
        torch.testing.assert_close(seen["x"], x0_hat.double() + 20.0 * n)


# ---------------------------------------------------------------- end to end

COMMON = ["train.steps=2", "train.ckpt_every=2", "train.log_every=1", "train.progress_bar=false",
          "data.num_samples=64", "data.backgrounds=prompted", "sample.steps=2", "sample.per_prompt=1",
          "train.global_batch=8", "train.micro_batch=8"]


def train_command(out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(ROOT / "engine" / "train.py"), "--config", str(ROOT / "configs" / "tiny_32px.yaml"),
            f"run.out_dir={out}", f"run.name={name}", *COMMON, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, install_attribute_net, run_concurrently):
    out = tmp_path_factory.mktemp("runs")
    install_attribute_net(out)  # the evaluation below would otherwise train its own
    run_concurrently([train_command(out, "data"), train_command(out, "init", "diffusion.objective=init_step")], ROOT,
                     timeout=300)
    return out / "data", out / "init"


@pytest.mark.slow
def test_train_an_initial_step_model_and_sample_from_it(runs, tmp_path):
    data, init = runs
    assert (init / "checkpoints" / "step_00000002").is_dir() and (init / "samples" / "step_00000002.png").is_file()
    from engine.sample import main as sample_main

    out = sample_main(["--run", str(data), "--prompt", "a red circle on a white background", "--num", "2",
                       "--solver", "unipc", "--order", "3", "--nfe", "5", "--schedule", "optimized",
                       "--init", "sing", "--sing-run", str(init), "--sigma-max", "20",
                       "--out", str(tmp_path / "g.png")])
    assert out.is_file() and list((data.parent / ".cache" / "stepopt").glob("*.json"))

    from engine.evaluate import main as evaluate_main

    res = evaluate_main(["--run", str(data), "--num-images", "4", "--batch-size", "4", "--grid", "0",
                         "--solver", "dpmpp", "--nfe", "4", "--init", "data_mean", "--out", str(tmp_path / "e")])
    rec = json.loads((tmp_path / "e" / "eval.json").read_text())["sampler"]
    assert rec == res["sampler"]
    assert (rec["solver"], rec["nfe"], rec["measured_nfe"], rec["init"], len(rec["sigmas"])) == ("dpmpp", 4, 4,
                                                                                                  "data_mean", 5)
    assert res["metrics"]["geneval"]["num_images"] == 4
