"""companion.experiments.learning_rates: the learning-rate sweep of chapter 09 and its helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from companion.experiments import _jsonable, run_experiment
from companion.experiments import learning_rates as lr_exp
from companion.training import mlp

CONFIG = lr_exp.CONFIG_TEST


@pytest.fixture(scope="module")
def result():
    return run_experiment("learning_rates", config=CONFIG, seeds=2)


def test_results_have_every_record_with_the_right_shapes(result):
    res = result["results"]
    lrs = res["learning_rates"]
    n_lr, n_eval = CONFIG["n_lrs"], len(res["eval_steps"])
    assert lrs == pytest.approx([0.01, 0.31622776601683794, 10.0])
    assert res["eval_steps"] == [0, 10, 20] and res["grid_step_decades"] == pytest.approx(1.5)
    assert res["variants"] == ["without_bn", "with_bn"]
    for variant in res["variants"]:
        side = res[variant]
        for key in lr_exp.PER_RUN:
            assert len(side[key]) == 2 and all(len(row) == n_lr for row in side[key]), key
        for key in ("test_accuracy_curve", "train_loss_curve", "sq_norm_curve"):
            assert all(len(curve) == n_eval for row in side[key] for curve in row), key
        # one mean squared norm per Dense layer: two hidden layers and the output layer
        assert all(len(point) == 3 for row in side["sq_norm_curve"] for curve in row for point in curve)
        for key in ("largest_trained_lr", "smallest_trained_lr", "best_accuracy", "best_lr", "steps_run"):
            assert len(side[key]) == 2


def test_records_are_consistent_with_the_threshold_and_each_other(result):
    res = result["results"]
    lrs = res["learning_rates"]
    for variant in res["variants"]:
        side = res[variant]
        for seed in range(2):
            for i in range(len(lrs)):
                acc, diverged = side["final_test_accuracy"][seed][i], side["diverged"][seed][i]
                assert diverged == math.isnan(acc)
                assert side["trained"][seed][i] == (not diverged and acc >= CONFIG["threshold"])
                assert side["steps_run"][seed][i] == CONFIG["steps"] or diverged
                if not diverged:
                    assert side["test_accuracy_curve"][seed][i][-1] == acc
            assert _same(side["largest_trained_lr"][seed], lr_exp.largest_trained(lrs, side["trained"][seed]))
            assert _same(side["smallest_trained_lr"][seed], lr_exp.smallest_trained(lrs, side["trained"][seed]))


def test_headline_is_well_formed_and_its_verdict_follows_the_rule(result):
    res = result["results"]
    head = res["headline"]
    with_bn, without_bn = res["with_bn"]["largest_trained_lr"], res["without_bn"]["largest_trained_lr"]
    assert head["with_bn"]["values"] == with_bn and head["without_bn"]["values"] == without_bn
    ratios = [b / n for b, n in zip(with_bn, without_bn)]
    assert all(_same(r, q) for r, q in zip(head["ratio"], ratios))
    assert head["verdict"] == lr_exp.verdict(ratios, CONFIG["ratio"])
    assert _same(head["effect"], lr_exp.geometric_mean(ratios))
    assert f">= {CONFIG['ratio']:g} on every seed" in head["verdict_rule"]
    assert "784-16-16-10" in head["metric"] and "plain SGD" in head["metric"]
    json.dumps(_jsonable(result), allow_nan=False)


def test_runs_are_deterministic(result):
    again = run_experiment("learning_rates", config=CONFIG, seeds=[0, 1])
    assert json.dumps(_jsonable(again["results"])) == json.dumps(_jsonable(result["results"]))


def test_a_huge_learning_rate_diverges_and_is_recorded_as_such():
    record = lr_exp.train_one(CONFIG, "without_bn", 1e4, seed=0)
    assert record["diverged"] and not record["trained"]
    assert math.isnan(record["final_test_accuracy"]) and math.isnan(record["final_train_loss"])
    assert record["steps_run"] < CONFIG["steps"]
    assert math.isnan(record["test_accuracy_curve"][-1]) and all(math.isnan(v) for v in record["sq_norm_curve"][-1])


def test_momentum_is_passed_to_the_optimizer():
    plain = lr_exp.train_one(CONFIG, "with_bn", 0.01, seed=0)
    heavy = lr_exp.train_one({**CONFIG, "momentum": 0.9}, "with_bn", 0.01, seed=0)
    assert plain["train_loss_curve"][-1] != heavy["train_loss_curve"][-1]


def test_grid_and_eval_steps():
    config = {**CONFIG, "log10_lr_min": -3.0, "log10_lr_max": 1.0, "n_lrs": 9, "steps": 250, "eval_every": 100}
    assert lr_exp.learning_rates(config) == pytest.approx([10 ** (k / 2) for k in range(-6, 3)])
    assert lr_exp.grid_step_decades(config) == pytest.approx(0.5)
    assert lr_exp.eval_steps(config) == [0, 100, 200, 250]
    assert lr_exp.grid_step_decades({**config, "n_lrs": 1}) == pytest.approx(4.0)


def test_sq_norms_is_the_mean_squared_column_norm_of_every_dense_kernel():
    model = mlp([5, 4], classes=3, batch_norm="before", seed=3)
    model.build((None, 6))
    kernels = [layer.kernel for layer in model if hasattr(layer, "kernel")]
    expected = [float(np.mean(np.linalg.norm(k.astype(np.float64), axis=0) ** 2)) for k in kernels]
    assert lr_exp.sq_norms(model) == pytest.approx(expected, rel=1e-12)
    kernels[0][0, 0] = np.inf
    assert math.isnan(lr_exp.sq_norms(model)[0])


def test_largest_smallest_and_best():
    lrs = [0.1, 1.0, 10.0]
    assert lr_exp.largest_trained(lrs, [True, True, False]) == 1.0
    assert lr_exp.smallest_trained(lrs, [False, True, True]) == 1.0
    assert math.isnan(lr_exp.largest_trained(lrs, [False] * 3)) and math.isnan(lr_exp.smallest_trained(lrs, [False] * 3))
    assert lr_exp.best(lrs, [0.9, 0.95, math.nan]) == (0.95, 1.0)
    assert lr_exp.best(lrs, [0.95, 0.95, 0.1]) == (0.95, 0.1)  # ties go to the smaller rate
    assert all(math.isnan(v) for v in lr_exp.best(lrs, [math.nan] * 3))


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ([10.0, 3.0, 31.6], "supported"),
        ([1.0, 0.5, 1.0], "contradicted"),
        ([10.0, 1.0, 2.0], "mixed"),
        ([2.0, 1.0, 1.78], "not supported at this scale"),
        ([10.0, math.nan, 10.0], "mixed"),
        ([math.nan, math.nan], "not supported at this scale"),
        ([1.0, math.nan], "not supported at this scale"),
    ],
)
def test_verdict_applies_the_rule(ratios, expected):
    assert lr_exp.verdict(ratios, 3.0) == expected


def test_geometric_mean_ignores_nan():
    assert lr_exp.geometric_mean([10.0, 10.0, math.nan]) == pytest.approx(10.0)
    assert lr_exp.geometric_mean([1.0, 100.0]) == pytest.approx(10.0)
    assert math.isnan(lr_exp.geometric_mean([math.nan]))


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b
