"""companion.experiments.initialization: weight-scale sweep with and without batch norm (chapter 10)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from companion.experiments import _jsonable, run_experiment
from companion.experiments import initialization as exp
from companion.training import mlp

VERDICTS = {"supported", "not supported at this scale", "mixed", "contradicted"}


@pytest.fixture(scope="module")
def result():
    return run_experiment("initialization", config=exp.CONFIG_TEST, seeds=2)


def test_results_have_every_variant_scale_and_seed(result):
    r = result["results"]
    n_scales, n_eval = exp.CONFIG_TEST["n_scales"], len(exp.eval_steps(exp.CONFIG_TEST))
    assert r["variants"] == ["without_bn", "with_bn", exp.CONTROL]
    assert r["weight_scales"] == pytest.approx([1e-3, 1e-1, 1e1])
    assert r["grid_step_decades"] == pytest.approx(2.0) and r["eval_steps"] == [0, 4, 8]
    for variant in r["variants"]:
        block = r[variant]
        for key in ("final_test_accuracy", "final_train_loss", "diverged", "initial_loss", "hidden_change",
                    "output_change"):
            assert np.shape(block[key]) == (2, n_scales), key
        for key in ("test_accuracy_curve", "train_loss_curve"):
            assert np.shape(block[key]) == (2, n_scales, n_eval), key
        assert len(block["working_range"]) == 2
        for row_acc, row_div in zip(block["final_test_accuracy"], block["diverged"]):
            for acc, div in zip(row_acc, row_div):
                assert isinstance(div, bool)
                assert math.isnan(acc) if div else 0.0 <= acc <= 1.0


def test_run_is_deterministic(result):
    again = run_experiment("initialization", config=exp.CONFIG_TEST, seeds=[0, 1])
    assert json.dumps(_jsonable(again["results"])) == json.dumps(_jsonable(result["results"]))


def test_headline_is_well_formed_and_follows_its_rule(result):
    r, config = result["results"], result["config"]
    h = r["headline"]
    assert h["verdict"] in VERDICTS
    for key in ("claim", "metric", "effect_definition", "verdict_rule"):
        assert isinstance(h[key], str) and h[key]
    step = r["grid_step_decades"]
    ranges = {}
    for side in ("with_bn", "without_bn"):
        accs = r[side]["final_test_accuracy"]
        ranges[side] = [step * sum(1 for a in row if not math.isnan(a) and a >= config["threshold"]) for row in accs]
        assert h[side]["values"] == ranges[side] == r[side]["working_range"]
    assert h["effect"] == pytest.approx(np.mean(ranges["with_bn"]) - np.mean(ranges["without_bn"]))
    assert h["verdict"] == exp.verdict(ranges["with_bn"], ranges["without_bn"], config["margin_decades"])
    assert "0.8" in h["verdict_rule"] and "1 decade" in h["verdict_rule"]


def test_all_configs_share_keys_and_the_grids_nest():
    assert set(exp.CONFIG_TEST) == set(exp.CONFIG_CI) == set(exp.CONFIG_FULL)
    ci, full = exp.weight_scales(exp.CONFIG_CI), exp.weight_scales(exp.CONFIG_FULL)
    assert len(ci) == 9 and exp.grid_step_decades(exp.CONFIG_CI) == 0.5
    assert exp.grid_step_decades(exp.CONFIG_FULL) == 0.25
    np.testing.assert_allclose(full[::2], ci, rtol=1e-12)  # the full grid refines the CI grid


def test_draw_kernels_scales_one_fixed_draw():
    def kernels(scale, skip_output=False):
        model = mlp([5, 4], batch_norm="before", seed=3)
        model.build((None, 28, 28, 1))
        glorot = [layer.kernel.copy() for layer in exp.dense_layers(model)]
        exp.draw_kernels(model, scale, seed=3, skip_output=skip_output)
        return glorot, [layer.kernel.copy() for layer in exp.dense_layers(model)]

    _, small = kernels(0.01)
    _, large = kernels(10.0)
    assert [k.shape for k in small] == [(784, 5), (5, 4), (4, 10)]
    for a, b in zip(small, large):
        np.testing.assert_allclose(b, 1000.0 * a, rtol=1e-5)  # same directions, only the size differs
    assert np.std(large[0]) == pytest.approx(10.0, rel=0.05)
    glorot, skipped = kernels(10.0, skip_output=True)
    np.testing.assert_array_equal(skipped[-1], glorot[-1])
    np.testing.assert_array_equal(skipped[0], large[0])


def test_working_range_counts_scales_at_or_above_threshold_and_fails_nan():
    assert exp.working_range([0.8, 0.79, math.nan, 0.95], 0.8, 0.5) == 1.0
    assert exp.working_range([math.nan, math.nan], 0.8, 0.25) == 0.0


@pytest.mark.parametrize(
    ("with_bn", "without_bn", "expected"),
    [
        ([3.0, 2.5, 2.0], [0.5, 0.5, 1.0], "supported"),
        ([0.5, 0.0, 0.5], [1.5, 1.5, 2.0], "contradicted"),
        ([1.0, 0.5, 1.5], [0.5, 1.0, 1.0], "not supported at this scale"),
        ([2.0, 0.5, 1.5], [0.5, 1.0, 1.0], "mixed"),
    ],
)
def test_verdict_applies_the_rule(with_bn, without_bn, expected):
    assert exp.verdict(with_bn, without_bn, 1.0) == expected


def test_verdict_rule_names_its_numbers():
    text = exp.verdict_rule(0.8, 1.0)
    assert ">= 0.8" in text and "d >= 1 decade on every seed" in text and "d <= -1 decade" in text
