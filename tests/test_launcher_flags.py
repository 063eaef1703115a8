"""Every flag of every entry point reaches the script when a launcher stands in front of it.

torchrun abbreviates its own options even after the script name: `torchrun ... engine/sample.py --run R` stops in
torchrun's parser ("ambiguous option: --run could match --run-path, --run_path"). Each flag must pass through
torchrun's real parser untouched; the old spellings that do not are kept only as aliases of one that does."""
import argparse
import importlib

import pytest
from torch.distributed.run import get_args_parser

ENTRY_POINTS = ("train", "sample", "evaluate", "precompute", "convert")
OLD_SPELLINGS = {"--run": "--run-dir", "--num": "--per-prompt"}  # alias -> the spelling launchers leave alone


class Captured(Exception):
    pass


def parser_of(entry: str) -> argparse.ArgumentParser:
    """The entry point's own parser, caught where its main() parses."""
    module = importlib.import_module(f"engine.{entry}")

    def capture(self, *args, **kwargs):
        raise Captured(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        module.main([])
    except Captured as c:
        return c.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"engine/{entry}.py parsed no arguments")


def survives_torchrun(flag: str) -> bool:
    """Whether torchrun hands `flag value` to the script as given."""
    try:
        args = get_args_parser().parse_args(["--standalone", "--nproc_per_node=2", "script.py", flag, "x"])
    except SystemExit:  # torchrun's parser stopped (it prints why)
        return False
    return args.training_script_args == [flag, "x"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_flag_reaches_the_script_through_torchrun(entry, capsys):
    for action in parser_of(entry)._actions:
        flags = [f for f in action.option_strings if f not in ("-h", "--help")]
        for flag in flags:
            if flag in OLD_SPELLINGS:  # an old spelling torchrun takes for its own, next to the one it leaves alone
                assert not survives_torchrun(flag) and OLD_SPELLINGS[flag] in flags, (entry, flag)
            else:
                assert survives_torchrun(flag), (entry, flag, capsys.readouterr().err)


def test_the_check_catches_the_reported_failure(capsys):
    assert not survives_torchrun("--run")
    assert "ambiguous option: --run could match --run-path, --run_path" in capsys.readouterr().err
    assert survives_torchrun("--run-dir") and survives_torchrun("--parallel")


@pytest.mark.parametrize("entry", ["sample", "evaluate"])
def test_sample_and_evaluate_name_the_run_alike(entry):
    parser = parser_of(entry)
    run = next(a for a in parser._actions if "--run-dir" in a.option_strings)
    assert run.dest == "run" and run.option_strings[0] == "--run-dir"  # the form help and the README show
