"""Tests of companion.experiments.gradient_flow (chapter 08)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion.data import batches
from companion.experiments import _jsonable, available, run_experiment
from companion.experiments import gradient_flow as gf
from companion.experiments.common import mnist
from companion.nn import Dense, softmax_cross_entropy
from companion.training import mlp

VERDICTS = {"supported", "not supported at this scale", "mixed", "contradicted"}


@pytest.fixture(scope="module")
def result():
    return run_experiment("gradient_flow", config=gf.CONFIG_TEST, seeds=2)


def test_registered_with_description():
    assert available()["gradient_flow"] == gf.DESCRIPTION


def test_configs_have_the_same_keys():
    assert set(gf.CONFIG_TEST) == set(gf.CONFIG_CI) == set(gf.CONFIG_FULL)
    assert max(gf.CONFIG_FULL["depths"]) > max(gf.CONFIG_CI["depths"])


def test_result_keys_and_shapes(result):
    config, res = result["config"], result["results"]
    assert result["seeds"] == [0, 1]
    assert set(res) == {"runs", "deepest_trained", "headline"}
    assert set(res["runs"]) == set(config["activations"])
    for activation, by_placement in res["runs"].items():
        assert set(by_placement) == {"none", "before"}
        for placement, rows in by_placement.items():
            assert [row["depth"] for row in rows] == config["depths"]
            for row in rows:
                for key in ("final_test_accuracy", "diverged", "test_accuracy", "grad_norm_init", "log10_ratio_init"):
                    assert len(row[key]) == 2, key
                for norms in row["grad_norm_init"] + row["grad_norm_final"]:
                    assert len(norms) == row["depth"] + 1  # hidden layers + output layer
                    assert all(n > 0 for n in norms)
                for curve, steps in zip(row["test_accuracy"], row["eval_steps"]):
                    assert steps == [0, 6, 12] and len(curve) == 3
                assert all(0.0 <= a <= 1.0 for a in row["final_test_accuracy"])
            assert len(res["deepest_trained"][activation][placement]) == 2


def test_ratio_is_one_for_a_single_hidden_layer(result):
    row = result["results"]["runs"]["relu"]["none"][0]
    assert row["depth"] == 1
    assert row["log10_ratio_init"] == [0.0, 0.0]


def test_deterministic(result):
    again = run_experiment("gradient_flow", config=gf.CONFIG_TEST, seeds=2)
    assert _jsonable(again["results"]) == _jsonable(result["results"])


def test_headline_well_formed_and_verdict_follows_rule(result):
    head = result["results"]["headline"]
    assert set(head) >= {"claim", "metric", "with_bn", "without_bn", "effect", "effect_definition", "verdict", "verdict_rule"}
    assert head["verdict"] in VERDICTS
    assert "%" in head["metric"]
    with_bn = [v / 100 for v in head["with_bn"]["values"]]
    without_bn = [v / 100 for v in head["without_bn"]["values"]]
    assert head["verdict"] == gf.verdict(with_bn, without_bn, result["config"]["margin"])
    assert head["effect"] == pytest.approx(100 * (np.mean(with_bn) - np.mean(without_bn)))
    deepest = result["results"]["runs"]["relu"]["before"][-1]
    assert head["with_bn"]["values"] == pytest.approx([100 * a for a in deepest["final_test_accuracy"]])


def test_init_gradient_norms_are_those_of_the_first_mini_batch():
    config = {**gf.CONFIG_TEST, "steps": 2}
    for placement in ("none", "before"):
        out = gf.train_once(3, "sigmoid", placement, 4, config)
        data = mnist()
        model = mlp([config["width"]] * 3, activation="sigmoid", batch_norm=placement, seed=4)
        xb, yb = next(batches(data.x_train, data.y_train, config["batch_size"], seed=4, epochs=None, drop_last=True))
        _, dlogits = softmax_cross_entropy(model(xb, training=True), yb)
        model.backward(dlogits)
        expected = [np.linalg.norm(layer.grads["kernel"]) for layer in model if isinstance(layer, Dense)]
        np.testing.assert_allclose(out["grad_norm_init"], expected, rtol=1e-6)
        assert out["log10_ratio_init"] == pytest.approx(math.log10(expected[0] / expected[-2]))


def test_diverged_run_gives_nan():
    out = gf.train_once(2, "relu", "none", 0, {**gf.CONFIG_TEST, "learning_rate": 1e4})
    assert out["diverged"]
    assert math.isnan(out["final_test_accuracy"])
    assert all(math.isnan(v) for v in out["grad_norm_final"])
    assert math.isnan(out["log10_ratio_final"])
    assert all(v > 0 for v in out["grad_norm_init"])


def test_kernel_gradient_norms():
    model = mlp([5, 4], seed=1)
    x = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32)
    _, dlogits = softmax_cross_entropy(model(x, training=True), np.arange(8) % 10)
    model.backward(dlogits)
    norms = gf.kernel_gradient_norms(model)
    kernels = [layer for layer in model if isinstance(layer, Dense)]
    assert len(norms) == 3
    assert norms == pytest.approx([np.sqrt((k.grads["kernel"] ** 2).sum()) for k in kernels])


@pytest.mark.parametrize(
    "with_bn, without_bn, expected",
    [
        ([0.9, 0.9, 0.9], [0.1, 0.2, 0.8], "supported"),
        ([0.9, 0.9, 0.9], [0.1, 0.2, 0.86], "mixed"),
        ([0.90, 0.90, 0.90], [0.88, 0.93, 0.90], "not supported at this scale"),
        ([0.1, 0.2, 0.3], [0.9, 0.9, 0.9], "contradicted"),
        ([0.9, 0.9], [math.nan, math.nan], "supported"),  # diverged counts as chance
        ([math.nan, 0.12], [0.1, 0.1], "not supported at this scale"),
        ([0.9, 0.9], [None, 0.2], "supported"),  # None: NaN read back from JSON
        (np.array([0.9, 0.12]), np.array([0.1, 0.1]), "mixed"),
    ],
)
def test_verdict_rule(with_bn, without_bn, expected):
    assert gf.verdict(with_bn, without_bn, 0.05) == expected


def test_verdict_needs_paired_values():
    with pytest.raises(ValueError, match="paired by seed"):
        gf.verdict([0.9, 0.9], [0.1], 0.05)
    with pytest.raises(ValueError, match="non-empty"):
        gf.verdict([], [], 0.05)


def test_deepest_trained():
    assert gf.deepest_trained([2, 5, 10], [0.9, 0.6, 0.2], 0.5) == 5
    assert gf.deepest_trained([2, 5, 10], [0.9, 0.2, 0.7], 0.5) == 10
    assert gf.deepest_trained([2, 5], [0.1, math.nan], 0.5) == 0


def test_one_blas_thread():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with gf.one_blas_thread():
        blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(p["num_threads"] == 1 for p in blas)


def test_kernel_gradient_norms_do_not_underflow():
    # A deep sigmoid network's first-layer gradient has float32 entries near 1e-33 whose squares underflow.
    model = mlp([3], activation="sigmoid", seed=0)
    model.build((1, 28, 28, 1))
    for layer in model:
        if isinstance(layer, Dense):
            layer.grads = {"kernel": np.full(layer.kernel.shape, 1e-33, dtype=np.float32)}
    norms = gf.kernel_gradient_norms(model)
    expected = [1e-33 * np.sqrt(784 * 3), 1e-33 * np.sqrt(3 * 10)]
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
