"""companion.experiments.regularization: the regularization experiment of chapter 11, its Dropout layer and helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from companion.experiments import _jsonable, run_experiment
from companion.experiments import regularization as reg
from companion.experiments.common import mnist
from companion.gradcheck import numerical_gradient, rel_error
from companion.layers import BatchNorm
from companion.nn import Dense, ReLU
from companion.training import accuracy, mlp

CONFIG = reg.CONFIG_TEST


@pytest.fixture(scope="module")
def result():
    return run_experiment("regularization", config=CONFIG, seeds=2)


# ----------------------------------------------------------------------------- the experiment
def test_results_have_every_record_with_the_right_shapes(result):
    res = result["results"]
    assert res["eval_epochs"] == [0, 1, 2]
    assert set(res["runs"]) == set(reg.RUNS) and set(res["runs_spec"]) == set(reg.RUNS)
    for name, side in res["runs"].items():
        assert set(side) == set(reg.PER_RUN), name
        for key in reg.PER_RUN:
            assert len(side[key]) == 2, (name, key)
        for key in ("train_loss_curve", "train_accuracy_curve", "test_loss_curve", "test_accuracy_curve",
                    "minibatch_loss_curve"):
            assert all(len(curve) == 3 for curve in side[key]), (name, key)
    spec = res["runs_spec"]
    assert [spec[n]["batch_size"] for n in ("none", "bn_small", "bn_large")] == [60, 15, 240]
    assert [spec[n]["learning_rate"] for n in ("none", "bn_small", "bn_large")] == pytest.approx([0.1, 0.025, 0.4])
    assert spec["bn_dropout"] == {"batch_norm": "before", "dropout": True, "batch_size": 60, "learning_rate": 0.1}


def test_records_are_consistent(result):
    res = result["results"]
    for name, side in res["runs"].items():
        batch_norm, dropout, _ = reg.RUNS[name]
        for k in range(2):
            assert not side["diverged"][k]
            assert side["final_test_accuracy"][k] == side["test_accuracy_curve"][k][-1]
            assert side["final_train_loss"][k] == side["train_loss_curve"][k][-1]
            assert side["loss_gap"][k] == pytest.approx(side["final_test_loss"][k] - side["final_train_loss"][k])
            assert side["accuracy_gap"][k] == pytest.approx(
                side["final_train_accuracy"][k] - side["final_test_accuracy"][k]
            )
            assert math.isnan(side["minibatch_loss_curve"][k][0])
            assert all(v > 0 for v in side["minibatch_loss_curve"][k][1:])
            # epoch 0: the untrained network is at chance level, about ln 10
            assert side["train_loss_curve"][k][0] == pytest.approx(math.log(10), abs=0.2)
            batchstat = [side[f"batchstat_{s}"][k] for s in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")]
            if batch_norm != "none" and not dropout:
                assert all(math.isfinite(v) for v in batchstat), name
            else:
                assert all(math.isnan(v) for v in batchstat), name
    # the same seed, the same initial kernels and data: at epoch 0 the no-BN variants agree exactly
    runs = res["runs"]
    assert runs["none"]["train_loss_curve"][0][0] == runs["dropout"]["train_loss_curve"][0][0]
    assert runs["none"]["test_loss_curve"][1][0] == runs["none_large"]["test_loss_curve"][1][0]


def test_headline_is_well_formed_and_its_verdict_follows_the_rule(result):
    res = result["results"]
    head, runs, comp = res["headline"], res["runs"], res["comparisons"]
    with_bn, without_bn = runs["bn"]["final_test_accuracy"], runs["none"]["final_test_accuracy"]
    assert head["with_bn"]["values"] == with_bn and head["without_bn"]["values"] == without_bn
    d = [b - n for b, n in zip(with_bn, without_bn)]
    r = [1 - b / n for b, n in zip(runs["bn"]["loss_gap"], runs["none"]["loss_gap"])]
    assert head["accuracy_difference"] == pytest.approx(d) and head["gap_reduction"] == pytest.approx(r)
    assert head["effect"] == pytest.approx(np.mean(d))
    assert head["verdict"] == reg.verdict(d, r, CONFIG["margin_accuracy"], CONFIG["margin_gap"])
    assert "d >= 0.5 points and R >= 10%" in head["verdict_rule"]
    assert "784-16-16-10" in head["metric"] and "480 MNIST digits" in head["metric"]
    assert comp["bn_accuracy_gain"] == d
    assert comp["dropout_accuracy_gain_with_bn"] == pytest.approx(
        [a - b for a, b in zip(runs["bn_dropout"]["final_test_accuracy"], with_bn)]
    )
    json.dumps(_jsonable(result), allow_nan=False)


def test_runs_are_deterministic(result):
    again = run_experiment("regularization", config=CONFIG, seeds=[0, 1])
    assert json.dumps(_jsonable(again["results"])) == json.dumps(_jsonable(result["results"]))


@pytest.mark.parametrize(
    ("d", "r", "expected"),
    [
        ([0.01, 0.006, 0.02], [0.2, 0.1, 0.5], "supported"),
        ([0.01, 0.004, 0.02], [0.2, 0.5, 0.5], "mixed"),           # one seed's accuracy gain is below 0.5 points
        ([0.01, 0.01, 0.01], [0.2, 0.05, 0.5], "mixed"),           # one seed's gap reduction is below 10 %
        ([0.01, 0.01, 0.01], [-0.2, -0.5, 0.0], "not supported at this scale"),   # better test, wider gap
        ([0.0, -0.01, 0.004], [-0.2, -0.1, -0.5], "contradicted"),
        ([0.0, 0.01, 0.004], [-0.2, -0.1, -0.5], "not supported at this scale"),
        ([math.nan, 0.01], [math.nan, 0.2], "mixed"),
        ([math.nan, math.nan], [math.nan, math.nan], "not supported at this scale"),
    ],
)
def test_verdict_applies_the_rule(d, r, expected):
    assert reg.verdict(d, r, 0.005, 0.10) == expected


def test_at_train_loss_interpolates_in_log_loss():
    losses = [2.0, 0.1, 0.01, 0.001]
    values = [0.0, 10.0, 20.0, 30.0]
    assert reg.at_train_loss(losses, values, 0.1) == 10.0
    assert reg.at_train_loss(losses, values, math.sqrt(0.1 * 0.01)) == pytest.approx(15.0)
    assert reg.at_train_loss(losses, values, 5.0) == 0.0
    assert math.isnan(reg.at_train_loss(losses, values, 1e-4))
    assert math.isnan(reg.at_train_loss([2.0, math.nan], values[:2], 0.1))


def test_eval_epochs_and_learning_rates():
    assert reg.eval_epochs({"epochs": 7, "eval_every_epochs": 3}) == [0, 3, 6, 7]
    config = {**CONFIG, "learning_rate": 0.2}
    assert reg.batch_size_and_learning_rate(config, "bn_large") == (240, pytest.approx(0.8))


def test_build_model_puts_dropout_after_every_hidden_relu():
    model = reg.build_model({**CONFIG, "hidden": [8, 6, 4]}, "bn_dropout", seed=1)
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == ["Flatten"] + ["Dense", "BatchNorm", "ReLU", "Dropout"] * 3 + ["Dense"]
    plain = reg.build_model({**CONFIG, "hidden": [8, 6, 4]}, "none", seed=1)
    assert not any(isinstance(layer, reg.Dropout) for layer in plain)
    assert len({layer.seed for layer in model if isinstance(layer, reg.Dropout)}) == 3


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_in_inference_mode_matches_the_package_accuracy():
    data = mnist()
    model = mlp([12], batch_norm="before", seed=0)
    model(data.x_train[:100], training=True)          # move the moving statistics away from 0 and 1
    x, y = data.x_test[:300], data.y_test[:300]
    loss, acc = reg.evaluate(model, x, y, chunk=128)
    assert acc == accuracy(model, x, y)
    logits = model(x).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    expected = -np.mean(shifted[np.arange(300), y] - np.log(np.exp(shifted).sum(axis=1)))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_evaluate_with_batch_statistics_uses_each_chunk_and_restores_the_moving_statistics():
    data = mnist()
    model = reg.build_model({**CONFIG, "hidden": [12]}, "bn_dropout", seed=0)
    model(data.x_train[:100], training=True)
    bn = next(layer for layer in model if isinstance(layer, BatchNorm))
    before = (bn.moving_mean.copy(), bn.moving_variance.copy())
    x, y = data.x_test[:90], data.y_test[:90]
    _, acc = reg.evaluate(model, x, y, batch_statistics=True, chunk=30)
    np.testing.assert_array_equal(bn.moving_mean, before[0])
    np.testing.assert_array_equal(bn.moving_variance, before[1])
    correct = 0
    for start in (0, 30, 60):                         # by hand: BN in training mode, dropout off
        h = x[start : start + 30]
        for layer in model:
            h = layer(h, training=isinstance(layer, BatchNorm))
        correct += int(np.sum(h.argmax(axis=1) == y[start : start + 30]))
    assert acc == correct / 90


# ----------------------------------------------------------------------------- Dropout
def test_dropout_gradient_check_with_a_fixed_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5))
    dy = rng.normal(size=(7, 5))
    layer = reg.Dropout(0.4, seed=0)
    layer.fixed_mask = rng.random((7, 5)) >= 0.4
    y = layer(x, training=True)
    np.testing.assert_allclose(y, x * layer.fixed_mask / 0.6, rtol=1e-15)
    dx = layer.backward(dy)
    numeric = numerical_gradient(lambda v: layer(v, training=True), x, dy)
    assert rel_error(dx, numeric) < 1e-9
    np.testing.assert_allclose(dx, dy * layer.fixed_mask / 0.6, rtol=1e-15)


def test_dropout_in_a_network_gradient_check():
    rng = np.random.default_rng(1)
    dense = Dense(4, seed=3)
    relu, drop = ReLU(), reg.Dropout(0.5, seed=0)
    x = rng.normal(size=(6, 3))
    dense.build((None, 3), np.float64)
    drop.fixed_mask = rng.random((6, 4)) >= 0.5

    def forward(v):
        return drop(relu(dense(v, training=True), training=True), training=True)

    dy = rng.normal(size=(6, 4))
    forward(x)
    dx = dense.backward(relu.backward(drop.backward(dy)))
    assert rel_error(dx, numerical_gradient(forward, x, dy)) < 1e-8


def test_dropout_inference_is_the_identity_and_backward_passes_dy_through():
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    layer = reg.Dropout(0.5, seed=0)
    y = layer(x)
    assert y is x or np.array_equal(y, x)
    dy = np.ones_like(x)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    zero = reg.Dropout(0.0, seed=0)
    np.testing.assert_array_equal(zero(x, training=True), x)


def test_dropout_keeps_the_expected_fraction_and_the_mean_in_float32():
    x = np.ones((200, 500), dtype=np.float32)
    layer = reg.Dropout(0.3, seed=5)
    y = layer(x, training=True)
    assert y.dtype == np.float32
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.005                 # 100,000 draws: std of the fraction 0.0014
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01                     # inverted dropout preserves the mean
    again = reg.Dropout(0.3, seed=5)(x, training=True)
    np.testing.assert_array_equal(y, again)               # seeded
    assert not np.array_equal(y, layer(x, training=True))  # a fresh mask at every call


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, True, "0.5", None])
def test_dropout_rejects_bad_rates(rate):
    with pytest.raises(ValueError, match="rate must be a float in \\[0, 1\\)"):
        reg.Dropout(rate)


def test_dropout_rejects_a_fixed_mask_of_the_wrong_shape():
    layer = reg.Dropout(0.5)
    layer.fixed_mask = np.ones((2, 2), dtype=bool)
    with pytest.raises(ValueError, match="fixed_mask has shape"):
        layer(np.ones((3, 2)), training=True)
    assert repr(layer) == "Dropout(rate=0.5)"
