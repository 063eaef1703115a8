"""The synthetic set's ceiling per level of caption knowledge (engine/eval/caption_value.py, evaluate.py --caption-value)."""
import json

import numpy as np
import pytest

from engine.data.synthetic import SyntheticShapes
from engine.eval.caption_value import (LEVELS, caption_value, group_mean_errors, group_stats, knowledge_keys,
                                       within_group_mse)
from engine.eval.protocol import HELD_OUT_SEED


def test_within_group_mse_is_the_pooled_unbiased_variance():
    values = np.array([[0.0], [2.0], [1.0], [1.0], [4.0], [9.0]])
    # group a: mean 1, squares 2 -> variance 2; group b: mean 2, squares 6 -> variance 3; c is a single sample
    mse, used = within_group_mse(group_stats(values, ["a", "a", "b", "b", "b", "c"]))
    assert used == 5
    assert mse == pytest.approx((2 * 2 + 3 * 3) / 5)


def test_within_group_mse_refuses_only_singletons():
    with pytest.raises(ValueError, match="single sample"):
        within_group_mse(group_stats(np.zeros((3, 2)), [1, 2, 3]))


def _facts(shape_b: str, relation: str = "left of") -> dict:
    return {"relation": relation, "groups": [
        {"colour": "red", "shape": "circle", "count": 2},
        {"colour": "blue", "shape": shape_b, "count": 1}]}


def test_keys_tell_apart_only_what_a_level_knows():
    a, b = knowledge_keys(_facts("square")), knowledge_keys(_facts("triangle"))
    differ = {level for level in LEVELS if a[level] != b[level]}
    assert differ == {"+ relation, shapes", "whole caption"}
    c = knowledge_keys(_facts("square", relation="above"))
    assert {level for level in LEVELS if a[level] != c[level]} == set(LEVELS[3:])
    swapped = {"relation": "left of", "groups": _facts("square")["groups"][::-1]}
    d = knowledge_keys(swapped)
    assert a["colours"] == d["colours"] and a["ordered colours"] != d["ordered colours"]


def test_knowing_nothing_is_the_plain_variance_and_colours_lower_it():
    result = caption_value(400, seed=3, held_out=16)
    images = SyntheticShapes(400, 32, 3).images(list(range(400))).reshape(400, -1).numpy().astype(np.float64)
    nothing = result["levels"]["nothing"]
    assert nothing["mse"] == pytest.approx(images.var(axis=0, ddof=1).mean(), rel=1e-6)
    assert result["levels"]["colours"]["mse"] < 0.97 * nothing["mse"]
    assert list(result["levels"]) == list(LEVELS)
    # held-out images (the caption-use set) predicted by the pool's mean image when nothing is known
    held = SyntheticShapes(16, 32, HELD_OUT_SEED).images(list(range(16))).reshape(16, -1).numpy().astype(np.float64)
    assert nothing["held_out"]["n"] == 16
    assert nothing["held_out"]["mean"] == pytest.approx(((held - images.mean(0)) ** 2).mean(), rel=1e-5)


def test_group_mean_errors_skip_unknown_groups():
    values = np.array([[0.0, 0.0], [2.0, 2.0], [5.0, 5.0]])
    errors = group_mean_errors(group_stats(values, ["a", "a", "b"]), np.array([[1.0, 3.0], [0.0, 0.0]]), ["a", "z"])
    assert errors == [pytest.approx((0.0 + 4.0) / 2)]


def test_evaluate_cli_writes_the_table(tmp_path, capsys):
    from engine.evaluate import main

    main(["--caption-value", "200", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "caption_value.json").read_text())
    assert saved["num_samples"] == 200 and list(saved["levels"]) == list(LEVELS)
    assert "whole caption" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["--caption-value", "1"])
    assert stop.value.code == 2


def test_check_sigmas_flag_parses_and_refuses():
    from engine.evaluate import parse_args

    assert parse_args(["--run-dir", "r", "--check-sigmas", "0.5,80"]).check_sigmas == (0.5, 80.0)
    assert parse_args(["--run-dir", "r"]).check_sigmas is None
    for bad in ("a,1", "0,1", "1,inf"):
        with pytest.raises(SystemExit) as stop:
            parse_args(["--run-dir", "r", "--check-sigmas", bad])
        assert stop.value.code == 2
