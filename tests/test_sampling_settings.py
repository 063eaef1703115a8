"""Sampler settings: config keys and command-line flags share one validation; every impossible value is one message
naming the key (and the flag), exit code 2 and no traceback from the entry points."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import Config, load_config, save_config
from engine.sampling.settings import SamplerSettings, SamplerSettingsError, add_sampler_args

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_32px.yaml"


@pytest.mark.parametrize("override,message", [
    ("sample.solver=rk4", "sample.solver='rk4' must be one of: euler, heun, dpmpp, unipc"),
    ("sample.schedule=cosine", "sample.schedule='cosine' must be one of: karras, logsnr, uniform, optimized"),
    ("sample.schedule=optimized", "sample.schedule='optimized' is made for a multistep solver's order pattern"),
    ("sample.nfe=0", "sample.nfe=0 must be >= 1"),
    ("sample.order=4", "sample.order=4 must be 1, 2 or 3"),
    ("sample.lower_order_final=below:ten", "sample.lower_order_final='below:ten' must be 'always', 'never' or"),
    ("sample.init=sing", "sample.sing_run='' must name a trained initial-step run"),
    ("sample.init=zeros", "sample.init='zeros' must be one of: noise, sing, data_mean, cascade"),
    ("sample.sing_guidance=cfg", "sample.sing_guidance='cfg' must be one of: normalized, plain, none"),
    ("sample.stepopt_power=3", "sample.stepopt_power=3 must be 1 or 2"),
    ("diffusion.sigma_min=80", "diffusion.sigma_min=80.0 must be < diffusion.sigma_max=80.0"),
    ("diffusion.sigma_min=0", "diffusion.sigma_min=0.0 must be > 0"),
    ("diffusion.objective=flow", "diffusion.objective='flow' must be one of: edm, init_step"),
    ("data.backgrounds=random", "data.backgrounds='random' must be 'fixed' or 'prompted'"),
])
def test_bad_sampler_config_names_the_key_and_the_choices(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, [override])


def test_good_sampler_config_loads():
    cfg = load_config(TINY, ["sample.solver=unipc", "sample.order=3", "sample.schedule=optimized", "sample.nfe=6",
                             "sample.lower_order_final=below:10", "diffusion.sigma_max=20"])
    assert (cfg.sample.solver, cfg.sample.nfe, cfg.diffusion.sigma_max) == ("unipc", 6, 20.0)


def parse(*flags: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    add_sampler_args(p)
    return p.parse_args(list(flags))


def test_flags_override_the_run_config():
    cfg = Config().validate()
    s = SamplerSettings.from_args(parse("--solver", "dpmpp", "--order", "3", "--nfe", "6", "--sigma-max", "40",
                                        "--cfg", "2", "--init", "data_mean"), cfg, "/tmp/c")
    assert (s.sample.solver, s.sample.order, s.sample.nfe, s.sigma_max, s.cfg_scale) == ("dpmpp", 3, 6, 40.0, 2.0)
    assert s.sample.init == "data_mean" and s.cache_dir == "/tmp/c" and cfg.sample.solver == "heun"  # cfg untouched
    rec = s.record()
    got = (rec["solver"], rec["order"], rec["nfe"], rec["init"], rec["sigma_max"])
    assert got == ("dpmpp", 3, 6, "data_mean", 40.0)
    unchanged = SamplerSettings.from_args(parse(), cfg)
    assert unchanged == SamplerSettings.from_config(cfg)


@pytest.mark.parametrize("flags,message", [
    (("--schedule", "optimized"), r"sample.schedule='optimized' is made for .*; given: --schedule \(sample.schedule\)"),
    (("--sigma-min", "90"), r"diffusion.sigma_min=90.0 must be < .*given: --sigma-min \(diffusion.sigma_min\)"),
    (("--solver", "unipc", "--nfe", "0"), r"sample.nfe=0 must be >= 1.*given: --nfe \(sample.nfe\)"),
    (("--lower-order-final", "sometimes"), r"sample.lower_order_final='sometimes'"),
])
def test_bad_flags_name_flag_and_key(flags, message):
    with pytest.raises(SamplerSettingsError, match=message):
        SamplerSettings.from_args(parse(*flags), Config().validate())


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # torch's @record under pytest's capture
def test_bad_settings_exit_with_code_2(capsys):
    from engine.training.errors import run_cli

    bad = lambda: SamplerSettings.from_args(parse("--schedule", "optimized"), Config().validate())
    with pytest.raises(SystemExit) as e:
        run_cli(bad)  # how engine/sample.py and engine/evaluate.py end
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config: sample.schedule='optimized'") and err.count("\n") == 1


def test_sing_run_must_be_an_initial_step_run(tmp_path):
    with pytest.raises(SamplerSettingsError, match="--sing-run nowhere: not a run folder"):
        SamplerSettings.from_args(parse("--init", "sing", "--sing-run", "nowhere"), Config().validate())
    save_config(load_config(TINY), tmp_path / "config.yaml")
    with pytest.raises(SamplerSettingsError, match="trained with diffusion.objective='edm', not an initial-step"):
        SamplerSettings.from_args(parse("--init", "sing", "--sing-run", str(tmp_path)), Config().validate())
    save_config(load_config(TINY, ["diffusion.objective=init_step"]), tmp_path / "config.yaml")
    s = SamplerSettings.from_args(parse("--init", "sing", "--sing-run", str(tmp_path)), Config().validate())
    assert s.record()["sing_run"] == str(tmp_path) and s.record()["sing_guidance"] == "normalized"


@pytest.mark.parametrize("entry", ["sample.py", "evaluate.py"])
@pytest.mark.parametrize("flags,message", [
    (["--solver", "rk4"], "argument --solver: invalid choice: 'rk4'"),
    (["--init", "sing", "--sing-run", "nowhere"], "--sing-run nowhere: not a run folder"),
])
def test_entry_points_reject_bad_sampler_flags_before_loading_anything(tmp_path, entry, flags, message):
    run = tmp_path / "run"  # a run folder with its config only: the flags must fail before a checkpoint is read
    run.mkdir()
    save_config(load_config(TINY), run / "config.yaml")
    extra = ["--prompt", "a red circle"] if entry == "sample.py" else []
    proc = subprocess.run([sys.executable, str(ROOT / "engine" / entry), "--run", str(run), *extra, *flags],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
