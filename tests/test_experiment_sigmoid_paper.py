"""companion.experiments.sigmoid_paper: the paper's sigmoid MNIST experiment and a deep sigmoid MLP (chapter 12)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from companion.experiments import _jsonable, run_experiment
from companion.experiments import sigmoid_paper as exp
from companion.functional import batchnorm_forward
from companion.layers import BatchNorm
from companion.nn import Dense
from companion.training import mlp

VERDICTS = {"supported", "not supported at this scale", "mixed", "contradicted"}


@pytest.fixture(scope="module")
def result():
    return run_experiment("sigmoid_paper", config=exp.CONFIG_TEST, seeds=2)


def test_results_have_every_variant_record_and_seed(result):
    r, config = result["results"], exp.CONFIG_TEST
    assert r["record_steps"] == [0, 10, 20] and r["percentiles"] == [15, 50, 85]
    assert r["variants"] == ["without_bn", "with_bn", "without_bn_glorot", "with_bn_glorot"]
    n_layers = len(config["hidden"])
    for variant in r["variants"]:
        block = r["paper"][variant]
        assert np.shape(block["test_accuracy_curve"]) == (2, 3)
        assert np.shape(block["train_loss_curve"]) == (2, 3)
        assert np.shape(block["percentiles"]) == (2, 3, 3)
        assert np.shape(block["saturated_fraction"]) == (2, 3, n_layers)
        for key in ("median_range_unit", "median_range_units", "final_test_accuracy", "final_train_accuracy",
                    "diverged"):
            assert len(block[key]) == 2, key
        for row in block["percentiles"]:
            assert all(p15 <= p50 <= p85 for p15, p50, p85 in row)     # percentiles are ordered
        assert all(0.0 <= a <= 1.0 for a in block["final_test_accuracy"])
        assert np.all((np.array(block["saturated_fraction"]) >= 0) & (np.array(block["saturated_fraction"]) <= 1))
    for variant in ("without_bn", "with_bn"):
        block = r["deep"][variant]
        assert np.shape(block["test_accuracy_curve"]) == (2, len(r["deep"]["eval_steps"]))
        assert len(block["final_test_accuracy"]) == 2
    assert r["deep"]["eval_steps"] == [0, 10, 20]


def test_run_is_deterministic(result):
    again = run_experiment("sigmoid_paper", config=exp.CONFIG_TEST, seeds=[0, 1])
    assert json.dumps(_jsonable(again["results"])) == json.dumps(_jsonable(result["results"]))


def test_headline_is_well_formed_and_follows_its_rule(result):
    r, config = result["results"], result["config"]
    h = r["headline"]
    assert h["verdict"] in VERDICTS and r["deep"]["verdict"] in VERDICTS
    for key in ("claim", "metric", "effect_definition", "verdict_rule"):
        assert isinstance(h[key], str) and h[key]
    with_bn = r["paper"]["with_bn"]["final_test_accuracy"]
    without_bn = r["paper"]["without_bn"]["final_test_accuracy"]
    assert h["with_bn"]["values"] == with_bn and h["without_bn"]["values"] == without_bn
    assert h["effect"] == pytest.approx(np.mean(with_bn) - np.mean(without_bn))
    assert h["verdict"] == exp.verdict(with_bn, without_bn, config["margin"])
    assert r["deep"]["verdict"] == exp.deep_verdict(
        r["deep"]["with_bn"]["final_test_accuracy"], r["deep"]["without_bn"]["final_test_accuracy"],
        config["deep_threshold"],
    )
    assert "d >= 0.02 on every seed" in h["verdict_rule"] and ">= 0.5" in r["deep"]["verdict_rule"]


def test_configs_share_keys_and_full_scale_is_the_papers():
    assert set(exp.CONFIG_TEST) == set(exp.CONFIG_CI) == set(exp.CONFIG_FULL)
    full = exp.CONFIG_FULL
    assert full["hidden"] == [100, 100, 100] and full["steps"] == 50000 and full["batch_size"] == 60
    assert exp.CONFIG_CI["learning_rate"] == full["learning_rate"] and exp.CONFIG_CI["init_std"] == full["init_std"]
    assert len(full["deep_hidden"]) == 8 and not exp.CONFIG_CI["control"] and full["control"]


def test_record_steps_include_zero_and_the_last_step():
    assert exp.record_steps(20, 10) == [0, 10, 20]
    assert exp.record_steps(25, 10) == [0, 10, 20, 25]


def test_gaussian_kernels_draws_the_same_kernels_for_both_variants():
    kernels = {}
    for batch_norm in ("none", "before"):
        model = mlp([5, 4], activation="sigmoid", batch_norm=batch_norm, seed=2)
        model.build((None, 28, 28, 1))
        exp.gaussian_kernels(model, 0.5, seed=2)
        dense = [layer for layer in model if isinstance(layer, Dense)]
        kernels[batch_norm] = [layer.kernel.copy() for layer in dense]
        assert all(layer.bias is None or not layer.bias.any() for layer in dense)
    assert [k.shape for k in kernels["none"]] == [(784, 5), (5, 4), (4, 10)]
    for a, b in zip(kernels["none"], kernels["before"]):
        np.testing.assert_array_equal(a, b)
    assert np.std(kernels["none"][0]) == pytest.approx(0.5, rel=0.05)


def test_sigmoid_inputs_without_bn_are_the_pre_activations():
    model = mlp([6, 5], activation="sigmoid", seed=1)
    x = np.random.default_rng(0).uniform(size=(30, 28, 28, 1)).astype(np.float32)
    model(x)
    dense = [layer for layer in model if isinstance(layer, Dense)]
    z1 = x.reshape(30, -1) @ dense[0].kernel + dense[0].bias
    z2 = (1 / (1 + np.exp(-z1))) @ dense[1].kernel + dense[1].bias
    inputs = exp.sigmoid_inputs(model, x)
    assert len(inputs) == 2
    np.testing.assert_allclose(inputs[0], z1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inputs[1], z2, rtol=1e-5, atol=1e-6)


def test_sigmoid_inputs_with_bn_normalize_with_the_batch_and_restore_moving_statistics():
    model = mlp([6, 5], activation="sigmoid", batch_norm="before", seed=1)
    x = np.random.default_rng(0).uniform(size=(30, 28, 28, 1)).astype(np.float32)
    model(x, training=True)
    bn = [layer for layer in model if isinstance(layer, BatchNorm)]
    before = [(l.moving_mean.copy(), l.moving_variance.copy()) for l in bn]
    inputs = exp.sigmoid_inputs(model, x)
    for layer, (mean, variance) in zip(bn, before):
        np.testing.assert_array_equal(layer.moving_mean, mean)
        np.testing.assert_array_equal(layer.moving_variance, variance)
    dense = next(layer for layer in model if isinstance(layer, Dense))
    expected, _ = batchnorm_forward(x.reshape(30, -1) @ dense.kernel, bn[0].gamma, bn[0].beta, epsilon=bn[0].epsilon)
    np.testing.assert_allclose(inputs[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inputs[1].mean(axis=0), 0.0, atol=1e-5)     # beta = 0: batch mean 0


@pytest.mark.parametrize(
    ("with_bn", "without_bn", "expected"),
    [
        ([0.91, 0.90, 0.92], [0.10, 0.10, 0.10], "supported"),
        ([0.90, 0.90, 0.90], [0.93, 0.95, 0.92], "contradicted"),
        ([0.90, 0.91, 0.90], [0.90, 0.90, 0.89], "not supported at this scale"),
        ([0.95, 0.91, 0.90], [0.90, 0.90, 0.89], "mixed"),
        ([0.90, 0.90, 0.90], [math.nan, 0.87, 0.88], "supported"),        # a diverged run counts as 0
    ],
)
def test_verdict_applies_the_rule(with_bn, without_bn, expected):
    assert exp.verdict(with_bn, without_bn, 0.02) == expected


@pytest.mark.parametrize(
    ("with_bn", "without_bn", "expected"),
    [
        ([0.9, 0.9, 0.9], [0.1, 0.1, 0.1], "supported"),
        ([0.9, 0.9, 0.9], [0.6, 0.7, 0.8], "not supported at this scale"),
        ([0.1, 0.1, 0.1], [0.6, 0.7, 0.8], "contradicted"),
        ([0.9, 0.9, 0.9], [0.6, 0.1, 0.1], "mixed"),
        ([0.9, math.nan, 0.9], [0.1, 0.1, 0.1], "mixed"),
    ],
)
def test_deep_verdict_applies_the_rule(with_bn, without_bn, expected):
    assert exp.deep_verdict(with_bn, without_bn, 0.5) == expected
