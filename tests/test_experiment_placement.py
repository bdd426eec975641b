"""Tests of companion.experiments.placement (chapter 13).

The claims' effects and verdicts are checked on synthetic runs whose
answers are worked out by hand here; the records on the shared test-scale
run (the ``test_scale`` fixture of tests/conftest.py, run once per
session); behaviour that needs its own run on tiny ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion.experiments import placement as pl
from companion.experiments.common import TWIN, record, verdicts
from companion.gradcheck import numerical_gradient, rel_error
from companion.layers import BatchNorm
from companion.nn import Sigmoid

NAME = "placement"
N_TEST = 100
CONFIG = pl.CONFIG_FULL  # ReLU and sigmoid, learning rates 0.1 and 1
STATISTICS = (
    "low_gradient",
    "activation_input_rms",
    "mean_share",
    "bn_input_skewness",
)


# ------------------------------------------------------------ synthetic runs
def fake_run(accuracy: float | None, first: int = 0) -> dict:
    """A record as common.record stores it: ``accuracy`` of N_TEST test
    images right, from image ``first`` on (cyclically), or a run that
    diverged (None)."""
    if accuracy is None:
        history = {
            "diverged": True,
            "final_test_accuracy": math.nan,
            "final_test_correct": None,
            "losses": [],
            "steps": [0],
            "test_accuracy": [0.1],
            "train_loss": [math.nan],
        }
    else:
        index = (np.arange(N_TEST) - first) % N_TEST
        correct = index < round(accuracy * N_TEST)
        history = {
            "diverged": False,
            "final_test_accuracy": float(correct.mean()),
            "final_test_correct": correct,
            "losses": [1.0],
            "steps": [0, 1],
            "test_accuracy": [0.1, float(correct.mean())],
            "train_loss": [math.nan, 1.0],
        }
    return record(history)


def seed_runs(**per_activation: dict) -> dict:
    """One seed's runs: ``relu={"before": [acc at lr0, acc at lr1], ...}``;
    an accuracy may be ``(accuracy, first)``."""
    runs = {}
    for activation, placements in per_activation.items():
        for placement, values in placements.items():
            for i, value in enumerate(values):
                args = value if isinstance(value, tuple) else (value,)
                name = pl.run_name(activation, placement, i)
                runs[name] = fake_run(*args)
    return runs


def effects(config=CONFIG) -> dict:
    return {m.claim.key: m.effect for m in pl.measures(config)}


def _judge(per_seed: list[dict]) -> dict:
    return verdicts(pl.measures(CONFIG), per_seed, n_test=N_TEST, n_boot=300)


# ------------------------------------------------------------------ helpers
def test_arms_follow_the_config():
    assert pl.arms(pl.CONFIG_CI, "relu") == ["before", "after"]
    full = pl.CONFIG_FULL
    assert pl.arms(full, "relu") == ["none", "before", "after"]
    assert pl.arms(full, "sigmoid") == [
        "none",
        "before",
        "after",
        "before_centered",
        "before_output_bn",
    ]
    assert pl.run_name("relu", "after", 1) == "relu/after/lr1"


def test_low_gradient_fraction():
    z = np.array([[-1.0, 0.0], [2.0, 5.0]])
    assert pl.low_gradient_fraction(z, "relu") == 0.5  # f'(0) = 0 counts
    t = pl.SIGMOID_LOW_GRADIENT_Z
    s = 1 / (1 + math.exp(-t))
    assert s * (1 - s) == pytest.approx(0.1 * 0.25, rel=1e-12)
    z = np.array([-t - 0.01, -t + 0.01, t - 0.01, t + 0.01, 0.0])
    assert pl.low_gradient_fraction(z, "sigmoid") == 0.4
    with pytest.raises(ValueError, match="activation"):
        pl.low_gradient_fraction(z, "tanh")


def test_mean_share_skewness_and_rms():
    rng = np.random.default_rng(0)
    assert pl.mean_share(np.array([[1.0, -2.0], [-1.0, 2.0]])) == 0.0
    # the zero column is left out
    assert pl.mean_share(np.array([[3.0, 0.0], [3.0, 0.0]])) == 1.0
    assert math.isnan(pl.mean_share(np.zeros((4, 3))))
    # one column with mean 1 and variance 1: 1 / (1 + 1)
    assert pl.mean_share(np.array([[0.0], [2.0]])) == 0.5
    # ReLU of a standard normal: m^2 / E[h^2] = (1 / (2 pi)) / (1/2)
    h = np.maximum(rng.standard_normal((200_000, 2)), 0)
    assert pl.mean_share(h) == pytest.approx(1 / math.pi, abs=0.01)
    normal = rng.standard_normal((100_000, 3))
    assert pl.mean_abs_skewness(normal) == pytest.approx(0.0, abs=0.03)
    # the exponential distribution has skewness 2 (its negative: -2)
    exponential = -rng.exponential(size=(200_000, 2))
    assert pl.mean_abs_skewness(exponential) == pytest.approx(2.0, abs=0.1)
    assert math.isnan(pl.mean_abs_skewness(np.ones((5, 2))))
    assert pl.rms(np.array([[3.0, 1.0], [-3.0, -1.0]])) == 2.0  # 3 and 1


def test_steps_to_threshold():
    assert pl.steps_to_threshold([0, 10, 20], [0.1, 0.9, 0.95], 0.9) == 10.0
    assert math.isnan(pl.steps_to_threshold([0, 10], [0.1, math.nan], 0.5))
    assert math.isnan(pl.steps_to_threshold([0, 10], [0.1, 0.2], 0.5))


def test_centered_sigmoid_is_the_sigmoid_minus_a_half_same_gradient():
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((5, 4)) * 3, rng.standard_normal((5, 4))
    centered, plain = pl.CenteredSigmoid(), Sigmoid()
    y = centered(x, training=True)
    np.testing.assert_allclose(y, plain(x, training=True) - 0.5, atol=1e-15)
    np.testing.assert_allclose(y, 0.5 * np.tanh(x / 2), atol=1e-15)
    np.testing.assert_allclose(
        centered.backward(dy), plain.backward(dy), atol=1e-15
    )
    numeric = numerical_gradient(
        lambda v: pl.CenteredSigmoid()(v, training=True), x, dy
    )
    assert rel_error(centered.backward(dy), numeric) < 1e-8
    assert repr(centered) == "CenteredSigmoid()"


def test_build_places_the_layers():
    def names(model):
        return [type(layer).__name__ for layer in model]

    assert names(pl.build([4], "sigmoid", "before_centered")) == [
        "Flatten",
        "Dense",
        "BatchNorm",
        "CenteredSigmoid",
        "Dense",
    ]
    assert names(pl.build([4], "sigmoid", "before_output_bn")) == [
        "Flatten",
        "Dense",
        "BatchNorm",
        "Sigmoid",
        "BatchNorm",
        "Dense",
    ]
    assert names(pl.build([4], "relu", "after")) == [
        "Flatten",
        "Dense",
        "ReLU",
        "BatchNorm",
        "Dense",
    ]
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
    assert list(stats) == list(STATISTICS)
    assert all(len(v) == 2 for v in stats.values())
    # batch norm after the ReLU: the next layer's input has batch mean 0
    assert stats["mean_share"] == pytest.approx([0.0, 0.0], abs=1e-6)
    # the batch norm inputs are ReLU outputs: skewed
    assert all(v > 0.3 for v in stats["bn_input_skewness"])
    for b, (mean, var) in zip(bns, before, strict=True):
        np.testing.assert_array_equal(b.moving_mean, mean)
        np.testing.assert_array_equal(b.moving_variance, var)
    plain = pl.hidden_statistics(
        pl.build([5], "sigmoid", "none"), x, "sigmoid"
    )
    assert math.isnan(plain["bn_input_skewness"][0])
    assert plain["mean_share"][0] > 0.5  # sigmoid outputs: mean about 1/2


# ---------------------------------------------------------- claim effects
def test_placement_gain_per_nonlinearity_and_learning_rate():
    eff = effects()
    runs = seed_runs(
        relu={"before": [0.95, None], "after": [0.90, 0.85]},
        sigmoid={"before": [0.93, 0.94], "after": [0.93, 0.90]},
    )
    acc = {
        name: 0.1 if r["diverged"] else r["final_test_accuracy"]
        for name, r in runs.items()
    }
    assert eff["relu_lr0.1"](acc) == pytest.approx(5.0)
    # a diverged "before" scores chance (0.1): 10 - 85
    assert eff["relu_lr1"](acc) == pytest.approx(-75.0)
    assert eff["sigmoid_lr0.1"](acc) == pytest.approx(0.0)
    assert eff["sigmoid_lr1"](acc) == pytest.approx(4.0)


def test_one_claim_per_nonlinearity_and_learning_rate():
    got = {
        m.claim.key: (m.claim.role, m.claim.unit, m.claim.margin)
        for m in pl.measures(CONFIG)
    }
    margin = CONFIG["margin_points"]
    assert got == dict.fromkeys(
        ("relu_lr0.1", "relu_lr1", "sigmoid_lr0.1", "sigmoid_lr1"),
        ("claim", "points", margin),
    )
    relu = pl.measures({**CONFIG, "activations": ["relu"]})
    assert [m.claim.key for m in relu] == ["relu_lr0.1", "relu_lr1"]
    assert pl.claim_key("sigmoid", 1.0) == "sigmoid_lr1"
    # CI scale: the rate where the placement matters, ten seeds
    ci = [m.claim.key for m in pl.measures(pl.CONFIG_CI)]
    assert ci == ["relu_lr1", "sigmoid_lr1"] and pl.CI_SEEDS == 10


# ------------------------------------------------------ verdicts, by hand
def test_verdicts_of_three_outcomes():
    # relu: "before" gets every image right, "after" none, at both rates:
    # +100 points on every seed, supported; swapped: contradicted.
    # sigmoid at 0.1: equal, 0, inconclusive
    sigmoid = {"before": [1.0, 0.0], "after": [1.0, 1.0]}
    runs = seed_runs(
        relu={"before": [1.0, 1.0], "after": [0.0, 0.0]}, sigmoid=sigmoid
    )
    v = _judge([runs] * 3)
    assert v["relu_lr1"]["effects"] == [100.0] * 3
    assert v["relu_lr1"]["low"] == 100.0
    assert v["relu_lr1"]["outcome"] == "supported"
    assert v["sigmoid_lr0.1"]["effects"] == [0.0] * 3
    assert v["sigmoid_lr0.1"]["high"] == 0.0
    assert v["sigmoid_lr0.1"]["outcome"] == "inconclusive"
    assert v["sigmoid_lr1"]["outcome"] == "contradicted"
    runs = seed_runs(
        relu={"before": [0.0, 0.0], "after": [1.0, 1.0]}, sigmoid=sigmoid
    )
    v = _judge([runs] * 3)["relu_lr0.1"]
    assert (v["effect"], v["high"]) == (-100.0, -100.0)
    assert v["outcome"] == "contradicted"


def test_the_verdict_is_symmetric_in_the_two_placements():
    """Swapping "before" and "after" negates every effect and mirrors the
    interval (the bootstrap resamples the same images)."""
    values = [
        ([(0.92, 0), (0.6, 3)], [(0.88, 5), (0.7, 0)]),
        ([(0.95, 2), (0.8, 0)], [(0.9, 0), (0.5, 9)]),
        ([(0.9, 7), (0.9, 1)], [(0.93, 0), (0.8, 4)]),
    ]

    def runs(swap):
        seeds = []
        for before, after in values:
            if swap:
                before, after = after, before
            arms = {"before": before, "after": after}
            seeds.append(seed_runs(relu=arms, sigmoid=arms))
        return seeds

    v, w = _judge(runs(False)), _judge(runs(True))
    # by hand, per rate, in points: before - after
    expected = {"lr0.1": [4.0, 5.0, -3.0], "lr1": [-10.0, 30.0, 10.0]}
    for activation in ("relu", "sigmoid"):
        for rate, effects_ in expected.items():
            key = f"{activation}_{rate}"
            assert v[key]["effects"] == pytest.approx(effects_)
            assert w[key]["effects"] == pytest.approx([-e for e in effects_])
            assert w[key]["low"] == pytest.approx(-v[key]["high"])
            assert w[key]["high"] == pytest.approx(-v[key]["low"])
            assert v[key]["outcome"] == w[key]["outcome"] == "inconclusive"


# ------------------------------------------ the shared test-scale result
def test_runs_arms_and_twins_of_the_test_scale_result(test_scale):
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    assert res["learning_rates"] == [0.1, 1.0]
    assert res["arms"] == {
        "relu": ["none", "before", "after"],
        "sigmoid": [
            "none",
            "before",
            "after",
            "before_centered",
            "before_output_bn",
        ],
    }
    expected = set()
    for activation in config["activations"]:
        for placement in pl.arms(config, activation):
            for i in range(len(config["learning_rates"])):
                name = pl.run_name(activation, placement, i)
                expected.add(name)
                if placement in pl.TWINNED:
                    expected.add(name + TWIN)
    for per_seed in res["runs"]:
        assert set(per_seed) == expected
    assert set(res["verdicts"]) == {
        "relu_lr0.1",
        "relu_lr1",
        "sigmoid_lr0.1",
        "sigmoid_lr1",
    }


def test_records_have_statistics_per_hidden_layer(test_scale):
    result = test_scale(NAME)
    config = result["config"]
    n_hidden = len(config["hidden"])
    for per_seed in result["results"]["runs"]:
        for name, run in per_seed.items():
            placement = name.split("/")[1]
            for key in STATISTICS:
                start, end = run[f"{key}_start"], run[f"{key}_end"]
                assert len(start) == n_hidden, (name, key)
                assert (end is None) == run["diverged"], (name, key)
                assert end is None or len(end) == n_hidden
            for when in ("start", "end"):
                skew = run[f"bn_input_skewness_{when}"]
                if skew is not None:
                    missing = [v is None for v in skew]
                    assert missing == [placement == "none"] * n_hidden
                for key in ("low_gradient", "mean_share"):
                    values = run[f"{key}_{when}"] or []
                    assert all(0.0 <= v <= 1.0 for v in values), (name, key)


def test_batch_norm_after_the_nonlinearity_centres_the_next_input(
    test_scale,
):
    """With BN after f, the next Dense layer's input is a BN output: over
    the batch its mean is beta = 0 at the start, so no share of its second
    moment is due to the mean; the extra arm with BN in front of the
    output layer centres the output layer's input the same way."""
    for per_seed in test_scale(NAME)["results"]["runs"]:
        for name, run in per_seed.items():
            if "/after/" in name:
                assert max(run["mean_share_start"]) < 1e-10, name
            if "/before_output_bn/" in name:
                assert run["mean_share_start"][-1] < 1e-10, name
                assert run["mean_share_start"][0] > 0.1  # a sigmoid output


def test_steps_to_threshold_agree_with_the_curves(test_scale):
    result = test_scale(NAME)
    threshold = result["config"]["threshold"]
    for per_seed in result["results"]["runs"]:
        for name, run in per_seed.items():
            reached = [
                s
                for s, a in zip(
                    run["eval_steps"], run["test_accuracy"], strict=True
                )
                if a >= threshold
            ]
            value = run["steps_to_threshold"]
            if reached:
                assert value == reached[0], name
            else:
                assert value is None, name


def test_stored_effects_are_the_gains_of_the_records(test_scale):
    result = test_scale(NAME)
    res = result["results"]

    def acc(run):
        return 0.1 if run["diverged"] else run["final_test_accuracy"]

    for activation in result["config"]["activations"]:
        for i, lr in enumerate(result["config"]["learning_rates"]):
            by_hand = [
                100
                * (
                    acc(runs[f"{activation}/before/lr{i}"])
                    - acc(runs[f"{activation}/after/lr{i}"])
                )
                for runs in res["runs"]
            ]
            stored = res["verdicts"][pl.claim_key(activation, lr)]["effects"]
            assert stored == pytest.approx(by_hand), (activation, lr)


# ------------------------------------------------- behaviour, tiny runs
def test_a_diverged_run_has_start_statistics_and_no_end():
    config = pl.CONFIG_TEST
    run = pl.train_one(config, "relu", "after", 1e4, seed=0)
    assert run["diverged"] and run["steps_run"] < config["steps"]
    assert run["final_test_accuracy"] is None and run["test_correct"] is None
    assert run["steps_to_threshold"] is None
    for key in STATISTICS:
        assert run[f"{key}_end"] is None
        assert len(run[f"{key}_start"]) == len(config["hidden"])
    assert all(v is not None for v in run["bn_input_skewness_start"])
