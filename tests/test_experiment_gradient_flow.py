"""Tests of companion.experiments.gradient_flow (chapter 8).

The claims' effects and verdicts are checked on synthetic runs whose
answers are worked out by hand here; the records on the shared test-scale
run (the ``test_scale`` fixture of tests/conftest.py, run once per
session); behaviour that needs its own run on tiny ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion.data import batches
from companion.experiments import gradient_flow as gf
from companion.experiments.common import TWIN, mnist, record, verdicts
from companion.layers import BatchNorm
from companion.nn import Dense, softmax_cross_entropy
from companion.seeding import BATCHES, KERNELS, derive_seed, rng
from companion.training import mlp

NAME = "gradient_flow"
T_2 = 4.302652729911275
"""Student's t quantile t(0.975, 2 degrees of freedom), from a table: the
95 % interval of a mean over three seeds is mean +- T_2 * s / sqrt(3)."""
N_TEST = 100
# depths 2, 5, 10, 20; threshold 0.5; margin 5 layers; with the He arm
CONFIG = {**gf.CONFIG_CI, "he_baseline": True}
TRAINED, FAILED = 0.9, 0.2  # far from the threshold: no bootstrap flips them


# ------------------------------------------------------------ synthetic runs
def fake_run(accuracy: float | None, **extra) -> dict:
    """A record as common.record stores it: ``accuracy`` of N_TEST test
    images right (the first ones), or a diverged run (None)."""
    if accuracy is None:
        history = {
            "diverged": True,
            "final_test_accuracy": math.nan,
            "final_test_correct": None,
            "losses": [2.3],
            "steps": [0],
            "test_accuracy": [0.1],
            "train_loss": [math.nan],
        }
    else:
        correct = np.arange(N_TEST) < round(accuracy * N_TEST)
        history = {
            "diverged": False,
            "final_test_accuracy": float(correct.mean()),
            "final_test_correct": correct,
            "losses": [2.3, 1.0],
            "steps": [0, 1],
            "test_accuracy": [0.1, float(correct.mean())],
            "train_loss": [math.nan, 1.0],
        }
    return record(history, **extra)


def seed_runs(deepest: dict[str, int], diverge: bool = False) -> dict:
    """One seed's runs for CONFIG: arm ``"relu/before"`` etc. trains up to
    depth ``deepest[arm]`` and fails deeper (diverges with ``diverge``)."""
    failed = None if diverge else FAILED
    return {
        gf.run_name(activation, arm, depth): fake_run(
            TRAINED if depth <= deepest[f"{activation}/{arm}"] else failed
        )
        for activation in CONFIG["activations"]
        for arm in gf.arms(activation)
        for depth in CONFIG["depths"]
    }


def accuracies(runs: dict) -> dict[str, float]:
    return {
        name: 0.1 if r["diverged"] else r["final_test_accuracy"]
        for name, r in runs.items()
    }


def effects(config=CONFIG) -> dict:
    return {m.claim.key: m.effect for m in gf.measures(config)}


# ------------------------------------------------------------------ helpers
def test_arms_and_run_names():
    assert gf.arms("relu") == ["none", "before", "none_he"]
    assert gf.arms("relu", he_baseline=False) == ["none", "before"]
    assert gf.arms("sigmoid") == ["none", "before"]
    # The He arm only at test and full scale: at CI scale (300 steps) the
    # He network at 20 layers trains on some seeds and not on others.
    ci_claims = [m.claim.key for m in gf.measures(gf.CONFIG_CI)]
    assert ci_claims == ["relu_depth", "sigmoid_depth"]
    assert not gf.CONFIG_CI["he_baseline"] and gf.CONFIG_FULL["he_baseline"]
    assert gf.run_name("relu", "before", 20) == "relu/before/d20"


def test_configs_go_deeper_at_full_scale():
    assert max(gf.CONFIG_FULL["depths"]) > max(gf.CONFIG_CI["depths"])
    assert gf.CONFIG_FULL["steps"] > gf.CONFIG_CI["steps"]


def test_deepest_trained_is_the_largest_depth_at_or_above_threshold():
    acc = {"relu/none/d2": 0.9, "relu/none/d5": 0.6, "relu/none/d10": 0.2}
    assert gf.deepest_trained(acc, "relu", "none", [2, 5, 10], 0.5) == 5
    acc["relu/none/d10"] = 0.5  # exactly the threshold trains
    assert gf.deepest_trained(acc, "relu", "none", [2, 5, 10], 0.5) == 10
    # not monotonic: a shallower failure does not hide a deeper success
    acc = {"relu/none/d2": 0.9, "relu/none/d5": 0.2, "relu/none/d10": 0.7}
    assert gf.deepest_trained(acc, "relu", "none", [2, 5, 10], 0.5) == 10
    nothing = {"relu/none/d2": 0.1, "relu/none/d5": math.nan}
    assert gf.deepest_trained(nothing, "relu", "none", [2, 5], 0.5) == 0


def test_kernel_gradient_norms_are_the_frobenius_norms_of_every_dense():
    model = mlp([5, 4], seed=1)
    x = np.random.default_rng(0).normal(size=(8, 28, 28, 1))
    logits = model(x.astype(np.float32), training=True)
    _, dlogits = softmax_cross_entropy(logits, np.arange(8) % 10)
    model.backward(dlogits)
    grads = [
        layer.grads["kernel"].astype(np.float64)
        for layer in model
        if isinstance(layer, Dense)
    ]
    by_hand = [math.sqrt(float((g * g).sum())) for g in grads]
    assert len(by_hand) == 3  # two hidden layers and the output layer
    assert gf.kernel_gradient_norms(model) == pytest.approx(by_hand)


def test_kernel_gradient_norms_do_not_underflow():
    # A deep sigmoid network's first-layer gradient has float32 entries
    # near 1e-33, whose squares underflow in float32.
    model = mlp([3], activation="sigmoid", seed=0)
    model.build((1, 28, 28, 1))
    for layer in model:
        if isinstance(layer, Dense):
            shape = layer.kernel.shape
            layer.grads = {"kernel": np.full(shape, 1e-33, np.float32)}
    expected = [1e-33 * math.sqrt(784 * 3), 1e-33 * math.sqrt(3 * 10)]
    np.testing.assert_allclose(
        gf.kernel_gradient_norms(model), expected, rtol=1e-5
    )


def test_he_normal_draws_from_the_kernel_streams_with_variance_2_over_fan_in():
    model = gf.build(3, "relu", "none_he", seed=2, width=50)
    dense = [layer for layer in model if isinstance(layer, Dense)]
    assert [d.kernel.shape for d in dense] == [
        (784, 50),
        (50, 50),
        (50, 50),
        (50, 10),
    ]
    for i, layer in enumerate(dense):
        fan_in = layer.kernel.shape[0]
        z = rng(2, KERNELS, i).standard_normal(layer.kernel.shape)
        np.testing.assert_allclose(
            layer.kernel, math.sqrt(2 / fan_in) * z, rtol=1e-6
        )
    # 39,200 draws: the standard deviation of the first layer is sqrt(2/784)
    assert np.std(dense[0].kernel) == pytest.approx(
        math.sqrt(2 / 784), rel=0.02
    )


def test_none_and_before_start_from_the_same_glorot_kernels():
    kernels = {}
    for arm in ("none", "before", "none_he"):
        model = gf.build(2, "sigmoid", arm, seed=3, width=8)
        kernels[arm] = [
            layer.kernel.copy() for layer in model if isinstance(layer, Dense)
        ]
        n_bn = sum(isinstance(layer, BatchNorm) for layer in model)
        assert n_bn == (2 if arm == "before" else 0)
    for a, b in zip(kernels["none"], kernels["before"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(kernels["none"][0], kernels["none_he"][0])


# ---------------------------------------------------------- claim effects
def test_depth_gain_when_bn_trains_to_20_and_plain_to_10():
    runs = seed_runs(
        {
            "relu/none": 10,
            "relu/before": 20,
            "relu/none_he": 5,
            "sigmoid/none": 2,
            "sigmoid/before": 0,
        }
    )
    acc = accuracies(runs)
    eff = effects()
    assert eff["relu_depth"](acc) == 10.0  # 20 - 10 layers
    assert eff["relu_depth_he"](acc) == 15.0  # 20 - 5
    assert eff["sigmoid_depth"](acc) == -2.0  # 0 - 2: none beats BN


def test_a_diverged_run_never_trains():
    runs = seed_runs(
        {
            "relu/none": 0,
            "relu/before": 5,
            "relu/none_he": 0,
            "sigmoid/none": 0,
            "sigmoid/before": 0,
        },
        diverge=True,
    )
    acc = accuracies(runs)
    assert acc["relu/none/d2"] == 0.1  # a diverged run scores chance
    eff = effects()
    assert eff["relu_depth"](acc) == 5.0
    assert eff["sigmoid_depth"](acc) == 0.0
    # ... even with a threshold of 0.1 or below it would count as trained
    # (chance): the configs never set one that low
    for config in (gf.CONFIG_TEST, gf.CONFIG_CI, gf.CONFIG_FULL):
        assert config["trained_threshold"] > 0.1


def test_claims_follow_the_activations_and_the_margin_of_the_config():
    keys = {
        m.claim.key: (m.claim.role, m.claim.margin, m.claim.unit, m.kind)
        for m in gf.measures(CONFIG)
    }
    assert keys == {
        "relu_depth": ("claim", 5.0, "layers", "accuracy"),
        "relu_depth_he": ("control", 5.0, "layers", "accuracy"),
        "sigmoid_depth": ("claim", 5.0, "layers", "accuracy"),
    }
    sigmoid = {**CONFIG, "activations": ["sigmoid"]}
    assert [m.claim.key for m in gf.measures(sigmoid)] == ["sigmoid_depth"]
    relu = {**CONFIG, "activations": ["relu"], "margin_layers": 2.0}
    assert [(m.claim.key, m.claim.margin) for m in gf.measures(relu)] == [
        ("relu_depth", 2.0),
        ("relu_depth_he", 2.0),
    ]


# ------------------------------------------------------ verdicts, by hand
def _judge(per_seed: list[dict]) -> dict:
    return verdicts(gf.measures(CONFIG), per_seed, n_test=N_TEST, n_boot=200)


def test_verdicts_supported_contradicted_and_inconclusive_without_spread():
    deepest = {
        "relu/none": 10,
        "relu/before": 20,  # +10 layers > margin 5: supported
        "relu/none_he": 20,  # 0 layers: inconclusive
        "sigmoid/none": 20,
        "sigmoid/before": 2,  # -18 layers: contradicted
    }
    v = _judge([seed_runs(deepest) for _ in range(3)])
    expected = {
        "relu_depth": (10.0, "supported"),
        "relu_depth_he": (0.0, "inconclusive"),
        "sigmoid_depth": (-18.0, "contradicted"),
    }
    for key, (effect, outcome) in expected.items():
        # the same effect on every seed, and no resample of the test
        # images moves an accuracy across the threshold: a zero-width
        # interval
        assert v[key]["effects"] == [effect] * 3
        assert (v[key]["low"], v[key]["high"]) == (effect, effect)
        assert v[key]["se_sampling"] == 0.0
        assert v[key]["outcome"] == outcome, key


def test_verdicts_with_spread_over_seeds_use_students_interval():
    base = {"relu/none_he": 2, "sigmoid/none": 2, "sigmoid/before": 2}
    # relu: with BN 20, 20, 20 layers; without 5, 5, 10: effects 15, 15, 10
    # mean 40/3, s^2 = 25/3, s/sqrt(3) = 5/3: low = 40/3 - T_2 * 5/3 = 6.16
    supported = [
        seed_runs({**base, "relu/before": 20, "relu/none": none})
        for none in (5, 5, 10)
    ]
    v = _judge(supported)["relu_depth"]
    assert v["effects"] == [15.0, 15.0, 10.0]
    assert v["effect"] == pytest.approx(40 / 3)
    assert v["low"] == pytest.approx(40 / 3 - T_2 * 5 / 3)
    assert v["high"] == pytest.approx(40 / 3 + T_2 * 5 / 3)
    assert v["outcome"] == "supported"
    # effects 10, 15, 5: mean 10, s = 5, half-width T_2 * 5 / sqrt(3) = 12.4
    inconclusive = [
        seed_runs({**base, "relu/before": before, "relu/none": none})
        for before, none in ((20, 10), (20, 5), (10, 5))
    ]
    v = _judge(inconclusive)["relu_depth"]
    assert v["effects"] == [10.0, 15.0, 5.0]
    assert v["low"] == pytest.approx(10 - T_2 * 5 / math.sqrt(3))
    assert v["low"] < 0 < CONFIG["margin_layers"] < v["high"]
    assert v["outcome"] == "inconclusive"


# ------------------------------------------ the shared test-scale result
def test_every_run_is_there_and_the_twinned_arms_have_twins(test_scale):
    result = test_scale(NAME)
    config = result["config"]
    expected = set()
    for activation in config["activations"]:
        for arm in gf.arms(activation):
            for depth in config["depths"]:
                name = gf.run_name(activation, arm, depth)
                expected.add(name)
                if f"{activation}/{arm}" in gf.TWINNED:
                    expected.add(name + TWIN)
    for per_seed in result["results"]["runs"]:
        assert set(per_seed) == expected
    assert {n for n in expected if n.endswith(TWIN)} == {
        f"{arm}/d{d}{TWIN}" for arm in gf.TWINNED for d in config["depths"]
    }


def test_records_have_one_gradient_norm_per_dense_layer(test_scale):
    result = test_scale(NAME)
    config = result["config"]
    for per_seed in result["results"]["runs"]:
        for name, run in per_seed.items():
            _, arm, depth = name.removesuffix(TWIN).split("/")
            depth = int(depth[1:])
            init = run["grad_norm_init"]
            assert len(init) == depth + 1, name  # hidden + output layer
            assert all(isinstance(g, float) and g > 0 for g in init), name
            final = run["grad_norm_final"]
            if run["diverged"]:
                assert final is None
            else:
                assert len(final) == depth + 1 and min(final) > 0, name
                assert run["eval_steps"] == [0, 6, 12]
                assert run["steps_run"] == config["steps"]
            assert ("batchstat_accuracy" in run) == (arm == "before"), name
            if arm == "before":
                batchstat = run["batchstat_accuracy"]
                assert (batchstat is None) == run["diverged"]
                assert run["diverged"] or 0.0 <= batchstat <= 1.0


def test_deepest_trained_summary_agrees_with_the_records(test_scale):
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    threshold = config["trained_threshold"]
    for key, per_seed_values in res["deepest_trained"].items():
        activation, arm = key.split("/")
        assert arm in gf.arms(activation)
        by_hand = []
        for per_seed in res["runs"]:
            reached = [0]
            for depth in config["depths"]:
                run = per_seed[f"{key}/d{depth}"]
                accuracy = run["final_test_accuracy"]
                if accuracy is not None and accuracy >= threshold:
                    reached.append(depth)
            by_hand.append(max(reached))
        assert per_seed_values == by_hand, key
    assert len(res["deepest_trained"]) == 5  # 3 ReLU arms, 2 sigmoid arms


def test_stored_effects_are_the_depth_differences_of_the_records(test_scale):
    result = test_scale(NAME)
    res = result["results"]
    deepest = res["deepest_trained"]
    pairs = {
        "relu_depth": ("relu/before", "relu/none"),
        "relu_depth_he": ("relu/before", "relu/none_he"),
        "sigmoid_depth": ("sigmoid/before", "sigmoid/none"),
    }
    assert set(res["verdicts"]) == set(pairs)
    for key, (a, b) in pairs.items():
        by_hand = [
            float(x - y) for x, y in zip(deepest[a], deepest[b], strict=True)
        ]
        assert res["verdicts"][key]["effects"] == by_hand, key
        assert (
            res["verdicts"][key]["margin"] == result["config"]["margin_layers"]
        )


# ------------------------------------------------- behaviour, tiny runs
def test_init_gradient_norms_are_those_of_the_first_mini_batch():
    config = {**gf.CONFIG_TEST, "steps": 1}
    data = mnist(0)
    for arm in ("none", "before"):
        out = gf.train_once(3, "sigmoid", arm, 0, config)
        model = gf.build(3, "sigmoid", arm, 0, config["width"])
        stream = batches(
            data.x_train,
            data.y_train,
            config["batch_size"],
            seed=derive_seed(0, BATCHES),
            epochs=None,
            drop_last=True,
        )
        xb, yb = next(stream)
        _, dlogits = softmax_cross_entropy(model(xb, training=True), yb)
        model.backward(dlogits)
        by_hand = [
            float(np.linalg.norm(layer.grads["kernel"].astype(np.float64)))
            for layer in model
            if isinstance(layer, Dense)
        ]
        np.testing.assert_allclose(out["grad_norm_init"], by_hand, rtol=1e-5)
        # one step: the first mini-batch is also the last
        assert out["grad_norm_final"] == out["grad_norm_init"]


def test_a_diverged_run_is_recorded_as_such():
    config = {**gf.CONFIG_TEST, "learning_rate": 1e4}
    for arm in ("none", "before"):
        out = gf.train_once(2, "relu", arm, 0, config)
        assert out["diverged"] and out["steps_run"] < config["steps"]
        assert out["final_test_accuracy"] is None
        assert out["test_correct"] is None
        assert out["grad_norm_final"] is None
        # the first step was finite: its gradient norms are there
        assert len(out["grad_norm_init"]) == 3
        assert all(g > 0 for g in out["grad_norm_init"])
        assert out.get("batchstat_accuracy", "absent") == (
            None if arm == "before" else "absent"
        )


class _Stop(Exception):
    pass


def test_a_twin_starts_one_ulp_above_the_he_kernels(monkeypatch):
    """The perturbation comes after He initialization (else the twin
    would start from the same He kernels)."""
    seen = []

    def capture(model, *args, **kwargs):
        seen.append([d.kernel.copy() for d in model if isinstance(d, Dense)])
        raise _Stop

    monkeypatch.setattr(gf, "train", capture)
    for twin in (False, True):
        with pytest.raises(_Stop):
            gf.train_once(2, "relu", "none_he", 0, gf.CONFIG_TEST, twin=twin)
    he = gf.build(2, "relu", "none_he", 0, gf.CONFIG_TEST["width"])
    he_kernels = [d.kernel for d in he if isinstance(d, Dense)]
    for base, twin, expected in zip(*seen, he_kernels, strict=True):
        np.testing.assert_array_equal(base, expected)
        np.testing.assert_array_equal(twin, np.nextafter(base, np.inf))
