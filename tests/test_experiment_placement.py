"""companion.experiments.placement: batch norm before vs after the nonlinearity (chapter 13) and its helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from companion.experiments import _jsonable, run_experiment
from companion.experiments import placement as pl
from companion.gradcheck import numerical_gradient, rel_error
from companion.layers import BatchNorm
from companion.nn import Sigmoid

CONFIG = pl.CONFIG_TEST
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def result():
    return run_experiment("placement", config=CONFIG, seeds=2)


def test_results_have_every_record_with_the_right_shapes(result):
    res = result["results"]
    n_eval, n_hidden = len(res["eval_steps"]), len(CONFIG["hidden"])
    assert res["eval_steps"] == [0, 6, 12]
    assert res["activations"] == ["relu", "sigmoid"] and res["learning_rates"] == [0.1, 1.0]
    assert res["placements"] == ["none", "before", "after"]
    assert res["extra_arms"] == {"sigmoid": ["before_centered", "before_output_bn"]}
    for activation in res["activations"]:
        assert len(res["runs"][activation]) == len(res["learning_rates"])
        for cell in res["runs"][activation]:
            assert list(cell) == res["placements"] + res["extra_arms"].get(activation, [])
            for side in cell.values():
                assert list(side) == list(pl.PER_RUN)
                assert all(len(values) == len(SEEDS) for values in side.values())
                assert all(len(c) == n_eval for key in ("test_accuracy_curve", "train_loss_curve") for c in side[key])
                for key in pl.PER_RUN:
                    if key.endswith(("_start", "_end")):
                        assert all(len(per_layer) == n_hidden for per_layer in side[key]), key
    assert len(res["pairs"]) == len(res["activations"]) * len(res["learning_rates"]) * len(SEEDS)


def test_records_are_consistent(result):
    res = result["results"]
    for activation in res["activations"]:
        for cell in res["runs"][activation]:
            for placement, side in cell.items():
                for k in range(len(SEEDS)):
                    acc = side["final_test_accuracy"][k]
                    assert side["diverged"][k] == math.isnan(acc)
                    assert side["steps_run"][k] == CONFIG["steps"] or side["diverged"][k]
                    assert side["test_accuracy_curve"][k][-1] == acc
                    assert _same(side["steps_to_threshold"][k], pl.steps_to_threshold(
                        res["eval_steps"], side["test_accuracy_curve"][k], CONFIG["threshold"]))
                    skew = side["bn_input_skewness_start"][k]
                    assert all(math.isnan(v) for v in skew) == (placement == "none")
                    assert all(0 <= v <= 1 for v in side["low_gradient_start"][k] + side["mean_share_start"][k])


def test_pairs_headline_and_verdict_follow_the_rule(result):
    res = result["results"]
    head, pairs = res["headline"], res["pairs"]
    i = 0
    for activation in res["activations"]:
        for j, lr in enumerate(res["learning_rates"]):
            cell = res["runs"][activation][j]
            for k, seed in enumerate(SEEDS):
                p = pairs[i]
                assert (p["activation"], p["learning_rate"], p["seed"]) == (activation, lr, seed)
                assert p["before"] == pytest.approx(100 * cell["before"]["final_test_accuracy"][k], abs=1e-9)
                assert p["after"] == pytest.approx(100 * cell["after"]["final_test_accuracy"][k], abs=1e-9)
                assert p["difference"] == pytest.approx(p["before"] - p["after"], abs=1e-9)
                assert p["winner"] == pl.winner(p["before"], p["after"], CONFIG["margin"])
                i += 1
    for side, key in (("with_bn", "before"), ("without_bn", "after")):
        per_seed = [np.mean([p[key] for p in pairs if p["seed"] == seed]) for seed in SEEDS]
        assert head[side]["values"] == pytest.approx(per_seed, abs=1e-12) and len(head[side]["values"]) == len(SEEDS)
    assert head["effect"] == pytest.approx(np.mean([p["difference"] for p in pairs]))
    assert head["winners"] == [p["winner"] for p in pairs]
    assert head["verdict"] == pl.verdict(head["winners"])
    assert head["verdict"] in ("supported", "not supported at this scale", "mixed", "contradicted")
    assert f"d > {CONFIG['margin']:g}" in head["verdict_rule"] and "784-16-16-10" in head["metric"]
    for key in ("claim", "metric", "effect_definition", "verdict_rule"):
        assert isinstance(head[key], str) and head[key]
    json.dumps(_jsonable(result), allow_nan=False)


def test_runs_are_deterministic(result):
    again = run_experiment("placement", config=CONFIG, seeds=SEEDS)
    assert json.dumps(_jsonable(again["results"])) == json.dumps(_jsonable(result["results"]))


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (95.0, 94.4, "before"),
        (95.0, 94.5, "tie"),  # exactly the margin: a tie
        (94.5, 95.0, "tie"),
        (94.4, 95.0, "after"),
        (math.nan, 95.0, "after"),
        (95.0, math.nan, "before"),
        (math.nan, math.nan, "tie"),
    ],
)
def test_winner(before, after, expected):
    assert pl.winner(before, after, 0.5) == expected


@pytest.mark.parametrize(
    ("winners", "expected"),
    [
        (["before"] * 4, "supported"),
        (["after"] * 4, "contradicted"),
        (["before", "tie", "after"], "mixed"),
        (["before", "tie"], "mixed"),
        (["tie", "after", "after"], "not supported at this scale"),
        (["tie"] * 3, "not supported at this scale"),
        ([], "not supported at this scale"),
    ],
)
def test_verdict_applies_the_rule(winners, expected):
    assert pl.verdict(winners) == expected


def test_low_gradient_fraction():
    z = np.array([[-1.0, 0.0], [2.0, 5.0]])
    assert pl.low_gradient_fraction(z, "relu") == 0.5  # f'(0) = 0 counts
    t = pl.SIGMOID_LOW_GRADIENT_Z
    s = 1 / (1 + math.exp(-t))
    assert s * (1 - s) == pytest.approx(0.1 * 0.25, rel=1e-12)
    assert pl.low_gradient_fraction(np.array([-t - 0.01, -t + 0.01, t - 0.01, t + 0.01, 0.0]), "sigmoid") == 0.4
    with pytest.raises(ValueError, match="activation"):
        pl.low_gradient_fraction(z, "tanh")


def test_mean_share_and_skewness():
    rng = np.random.default_rng(0)
    assert pl.mean_share(np.array([[1.0, -2.0], [-1.0, 2.0]])) == 0.0
    assert pl.mean_share(np.array([[3.0, 0.0], [3.0, 0.0]])) == 1.0  # the zero column is left out
    assert math.isnan(pl.mean_share(np.zeros((4, 3))))
    # one column with mean 1 and variance 1: 1 / (1 + 1)
    assert pl.mean_share(np.array([[0.0], [2.0]])) == 0.5
    # ReLU of a standard normal: m^2 / E[h^2] = (1/(2 pi)) / (1/2) = 1/pi
    h = np.maximum(rng.standard_normal((200_000, 2)), 0)
    assert pl.mean_share(h) == pytest.approx(1 / math.pi, abs=0.01)
    assert pl.mean_abs_skewness(rng.standard_normal((100_000, 3))) == pytest.approx(0.0, abs=0.03)
    assert pl.mean_abs_skewness(-rng.exponential(size=(200_000, 2))) == pytest.approx(2.0, abs=0.1)
    assert math.isnan(pl.mean_abs_skewness(np.ones((5, 2))))
    assert pl.rms(np.array([[3.0, 1.0], [-3.0, -1.0]])) == 2.0  # columns: 3 and 1


def test_per_seed_means_propagate_divergence():
    pairs = [{"seed": 0, "before": 90.0}, {"seed": 0, "before": 92.0}, {"seed": 1, "before": math.nan}, {"seed": 1, "before": 95.0}]
    means = pl.per_seed_means(pairs, [0, 1], "before")
    assert means[0] == 91.0 and math.isnan(means[1])


def test_steps_to_threshold():
    assert pl.steps_to_threshold([0, 10, 20], [0.1, 0.9, 0.95], 0.9) == 10.0
    assert math.isnan(pl.steps_to_threshold([0, 10], [0.1, math.nan], 0.5))


def test_centered_sigmoid_is_the_sigmoid_minus_a_half_with_the_same_gradient():
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((5, 4)) * 3, rng.standard_normal((5, 4))
    centered, plain = pl.CenteredSigmoid(), Sigmoid()
    np.testing.assert_allclose(centered(x, training=True), plain(x, training=True) - 0.5, atol=1e-15)
    np.testing.assert_allclose(centered(x, training=True), 0.5 * np.tanh(x / 2), atol=1e-15)
    np.testing.assert_allclose(centered.backward(dy), plain.backward(dy), atol=1e-15)
    numeric = numerical_gradient(lambda v: pl.CenteredSigmoid()(v, training=True), x, dy)
    assert rel_error(centered.backward(dy), numeric) < 1e-8
    assert repr(centered) == "CenteredSigmoid()"


def test_build_places_the_layers():
    names = lambda model: [type(layer).__name__ for layer in model]  # noqa: E731
    assert names(pl.build([4], "sigmoid", "before_centered")) == ["Flatten", "Dense", "BatchNorm", "CenteredSigmoid", "Dense"]
    assert names(pl.build([4], "sigmoid", "before_output_bn")) == [
        "Flatten", "Dense", "BatchNorm", "Sigmoid", "BatchNorm", "Dense"]
    assert names(pl.build([4], "relu", "after")) == ["Flatten", "Dense", "ReLU", "BatchNorm", "Dense"]
    for arm in ("before_centered", "before_output_bn"):
        with pytest.raises(ValueError, match=arm):
            pl.build([4], "relu", arm)


def test_hidden_statistics_leave_the_moving_averages_alone():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 6)).astype(np.float32) + 1.0
    model = pl.build([5, 5], "relu", "after", seed=0)
    model.build((None, 6))
    bns = [layer for layer in model if isinstance(layer, BatchNorm)]
    before = [(b.moving_mean.copy(), b.moving_variance.copy()) for b in bns]
    stats = pl.hidden_statistics(model, x, "relu")
    assert list(stats) == ["low_gradient", "activation_input_rms", "mean_share", "bn_input_skewness"]
    assert all(len(v) == 2 for v in stats.values())
    # batch norm after the ReLU: the next layer's input has mean 0 over the batch
    assert stats["mean_share"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert all(v > 0.3 for v in stats["bn_input_skewness"])  # ReLU outputs are skewed
    for b, (mean, var) in zip(bns, before):
        np.testing.assert_array_equal(b.moving_mean, mean)
        np.testing.assert_array_equal(b.moving_variance, var)
    plain = pl.hidden_statistics(pl.build([5], "sigmoid", "none"), x, "sigmoid")
    assert math.isnan(plain["bn_input_skewness"][0]) and plain["mean_share"][0] > 0.5


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_a_diverged_run_is_recorded_with_nan_and_loses_its_pair():
    record = pl.train_one(CONFIG, "relu", "none", 1e4, seed=0)
    assert record["diverged"] and record["steps_run"] < CONFIG["steps"]
    assert math.isnan(record["final_test_accuracy"]) and math.isnan(record["test_accuracy_curve"][-1])
    assert all(math.isnan(v) for key in pl.PER_RUN if key.endswith("_end") for v in record[key])
    assert pl.winner(95.0, pl.percent(record["final_test_accuracy"]), 0.5) == "before"
