"""Tests of companion.experiments.regularization (chapter 11) and its
Dropout layer.

The claims' effects and verdicts are checked on synthetic runs whose
answers are worked out by hand here; the records on the shared test-scale
run (the ``test_scale`` fixture of tests/conftest.py, run once per
session); behaviour that needs its own run on tiny ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion.experiments import regularization as reg
from companion.experiments.common import TWIN, mnist, record, verdicts
from companion.gradcheck import numerical_gradient, rel_error
from companion.nn import Dense, ReLU
from companion.training import evaluate

NAME = "regularization"
T_2 = 4.302652729911275
"""Student's t quantile t(0.975, 2 degrees of freedom), from a table."""
N_TEST = 100
CONFIG = {**reg.CONFIG_CI, "batch_arms": True}  # margins 1 point, 10 %
CURVES = (
    "train_loss_curve",
    "train_accuracy_curve",
    "test_loss_curve",
    "test_accuracy_curve",
    "minibatch_loss_curve",
)
BATCHSTAT = tuple(
    f"batchstat_{split}_{what}"
    for split in ("train", "test")
    for what in ("loss", "accuracy")
)


# ------------------------------------------------------------ synthetic runs
def fake_run(accuracy: float, loss_gap: float | None = 0.1) -> dict:
    """A record as common.record stores it, with the field the loss-gap
    claims read: ``accuracy`` of N_TEST test images right (the first
    ones)."""
    correct = np.arange(N_TEST) < round(accuracy * N_TEST)
    history = {
        "diverged": False,
        "final_test_accuracy": float(correct.mean()),
        "final_test_correct": correct,
        "losses": [1.0],
        "steps": [0, 1],
        "test_accuracy": [0.1, float(correct.mean())],
        "train_loss": [math.nan, 1.0],
    }
    return record(history, loss_gap=loss_gap)


def seed_runs(accuracy: dict | None = None, gaps: dict | None = None):
    """One seed's eight runs; unnamed runs: accuracy 0.9, gap 0.1."""
    accuracy, gaps = accuracy or {}, gaps or {}
    return {
        name: fake_run(accuracy.get(name, 0.9), gaps.get(name, 0.1))
        for name in reg.RUNS
    }


def effects(config=CONFIG) -> dict:
    return {m.claim.key: m.effect for m in reg.measures(config)}


def _judge(per_seed: list[dict], n_boot: int = 200) -> dict:
    measures = reg.measures(CONFIG)
    return verdicts(measures, per_seed, n_test=N_TEST, n_boot=n_boot)


# ------------------------------------------------------------------ helpers
def test_eval_epochs_include_zero_and_the_last_epoch():
    assert reg.eval_epochs({"epochs": 7, "eval_every_epochs": 3}) == [
        0,
        3,
        6,
        7,
    ]
    assert reg.eval_epochs({"epochs": 4, "eval_every_epochs": 2}) == [
        0,
        2,
        4,
    ]


def test_batch_size_and_learning_rate_follow_the_linear_scaling_rule():
    config = {**reg.CONFIG_TEST, "learning_rate": 0.2}
    assert reg.batch_size_and_learning_rate(config, "bn") == (60, 0.2)
    batch, lr = reg.batch_size_and_learning_rate(config, "bn_large")
    assert batch == 240 and lr == pytest.approx(0.8)
    batch, lr = reg.batch_size_and_learning_rate(config, "none_small")
    assert batch == 15 and lr == pytest.approx(0.05)


def test_at_train_loss_interpolates_in_log_loss():
    losses = [2.0, 0.1, 0.01, 0.001]
    values = [0.0, 10.0, 20.0, 30.0]
    assert reg.at_train_loss(losses, values, 0.1) == 10.0
    # halfway between 0.1 and 0.01 in log loss: halfway between 10 and 20
    level = math.sqrt(0.1 * 0.01)
    assert reg.at_train_loss(losses, values, level) == pytest.approx(15.0)
    assert reg.at_train_loss(losses, values, 5.0) == 0.0  # starts there
    assert math.isnan(reg.at_train_loss(losses, values, 1e-4))  # never
    assert math.isnan(reg.at_train_loss([2.0, math.nan], values[:2], 0.1))


def test_build_model_puts_dropout_after_every_hidden_relu():
    config = {**reg.CONFIG_TEST, "hidden": [8, 6, 4]}
    model = reg.build_model(config, "bn_dropout", seed=1)
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == [
        "Flatten",
        *["Dense", "BatchNorm", "ReLU", "Dropout"] * 3,
        "Dense",
    ]
    drops = [layer for layer in model if isinstance(layer, reg.Dropout)]
    assert all(d.rate == config["dropout_rate"] for d in drops)
    assert len({d.seed for d in drops}) == 3  # a mask stream per layer
    for run in ("none", "bn", "bn_small", "none_large"):
        plain = reg.build_model(config, run, seed=1)
        assert not any(isinstance(x, reg.Dropout) for x in plain)
    kinds = [type(x).__name__ for x in reg.build_model(config, "dropout", 1)]
    assert "BatchNorm" not in kinds and kinds.count("Dropout") == 3


def test_the_runs_vary_one_thing_at_a_time():
    assert reg.RUNS["none"] == ("none", False, "batch_size")
    assert reg.RUNS["bn_dropout"] == ("before", True, "batch_size")
    for size in ("small", "large"):
        assert reg.RUNS[f"bn_{size}"][:2] == ("before", False)
        assert reg.RUNS[f"none_{size}"][:2] == ("none", False)
        assert reg.RUNS[f"bn_{size}"][2] == f"{size}_batch"


def test_the_batch_size_arms_are_trained_only_with_batch_arms():
    assert reg.run_names(CONFIG) == list(reg.RUNS)
    without = reg.run_names({**CONFIG, "batch_arms": False})
    assert without == ["none", "bn", "dropout", "bn_dropout"]
    assert set(reg.BATCH_ARMS) == set(reg.RUNS) - set(without)


# ----------------------------------------------------------------- Dropout
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
        h = relu(dense(v, training=True), training=True)
        return drop(h, training=True)

    dy = rng.normal(size=(6, 4))
    forward(x)
    dx = dense.backward(relu.backward(drop.backward(dy)))
    assert rel_error(dx, numerical_gradient(forward, x, dy)) < 1e-8


def test_dropout_inference_is_the_identity_and_backward_passes_dy():
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    layer = reg.Dropout(0.5, seed=0)
    np.testing.assert_array_equal(layer(x), x)
    dy = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    zero = reg.Dropout(0.0, seed=0)
    np.testing.assert_array_equal(zero(x, training=True), x)


def test_dropout_keeps_the_expected_fraction_and_the_mean_in_float32():
    x = np.ones((200, 500), dtype=np.float32)
    layer = reg.Dropout(0.3, seed=5)
    y = layer(x, training=True)
    assert y.dtype == np.float32
    kept = y != 0
    # 100,000 draws: the kept fraction has standard deviation 0.0014
    assert abs(kept.mean() - 0.7) < 0.005
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01  # inverted dropout keeps the mean
    again = reg.Dropout(0.3, seed=5)(x, training=True)
    np.testing.assert_array_equal(y, again)  # seeded
    assert not np.array_equal(y, layer(x, training=True))  # fresh masks


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, True, "0.5", None])
def test_dropout_rejects_bad_rates(rate):
    with pytest.raises(ValueError, match=r"rate must be a float in \[0, 1\)"):
        reg.Dropout(rate)


def test_dropout_rejects_a_fixed_mask_of_the_wrong_shape():
    layer = reg.Dropout(0.5)
    layer.fixed_mask = np.ones((2, 2), dtype=bool)
    with pytest.raises(ValueError, match="fixed_mask has shape"):
        layer(np.ones((3, 2)), training=True)
    assert repr(layer) == "Dropout(rate=0.5)"


# ---------------------------------------------------------- claim effects
def test_accuracy_effects_in_points():
    eff = effects()
    acc = {"none": 0.93, "bn": 0.95, "dropout": 0.96}
    assert eff["test_accuracy"](acc) == pytest.approx(2.0)
    assert eff["replaces_dropout"](acc) == pytest.approx(-1.0)


def test_loss_gap_effect_is_the_gap_bn_removes_in_nats():
    eff = effects()["loss_gap"]
    runs = seed_runs(gaps={"none": 0.4, "bn": 0.1})
    assert eff(runs) == pytest.approx(0.3)  # 0.4 - 0.1
    runs = seed_runs(gaps={"none": 0.2, "bn": 0.3})
    assert eff(runs) == pytest.approx(-0.1)  # BN widens the gap
    runs = seed_runs(gaps={"none": 0.2, "bn": -0.1})
    assert eff(runs) == pytest.approx(0.3)  # BN reverses it
    # A diverged run scores chance on both sets: its gap counts as 0.
    runs = seed_runs(gaps={"none": 0.2})
    runs["bn"] = {**runs["bn"], "diverged": True, "loss_gap": None}
    assert eff(runs) == pytest.approx(0.2)


def test_batch_noise_compares_the_reductions_at_small_and_large_batch():
    eff = effects()["batch_noise"]
    gaps = {
        "none_small": 0.5,
        "bn_small": 0.1,  # removes 0.4 nats
        "none_large": 0.4,
        "bn_large": 0.3,  # removes 0.1 nats
    }
    assert eff(seed_runs(gaps=gaps)) == pytest.approx(0.3)


def test_claims_roles_units_and_margins():
    got = {
        m.claim.key: (m.claim.role, m.claim.unit, m.claim.margin, m.kind)
        for m in reg.measures(CONFIG)
    }
    points, nats = CONFIG["margin_points"], CONFIG["margin_gap_nats"]
    assert got == {
        "test_accuracy": ("claim", "points", points, "accuracy"),
        "loss_gap": ("claim", "nats", nats, "records"),
        "replaces_dropout": ("claim", "points", points, "accuracy"),
        "batch_noise": ("control", "nats", nats, "records"),
    }
    # the control needs the runs at other batch sizes
    without = reg.measures({**CONFIG, "batch_arms": False})
    assert [m.claim.key for m in without] == [
        "test_accuracy",
        "loss_gap",
        "replaces_dropout",
    ]


# ------------------------------------------------------ verdicts, by hand
def test_verdicts_of_three_outcomes():
    # loss gap: BN removes 0.30, 0.24, 0.28 nats on three seeds: mean
    # 0.82/3, s^2 = 0.0028/3 * ... ; by hand below; low >> 0.02: supported.
    # batch noise: the gap removed at batch 15 is 0.2 nats smaller than at
    # 240 on every seed: contradicted.  Test accuracy: the same images
    # right with and without BN: 0, inconclusive.
    removed = (0.30, 0.24, 0.28)
    seeds = [
        seed_runs(
            accuracy={"bn": 0.9, "none": 0.9},
            gaps={
                "none": 0.4,
                "bn": 0.4 - r,
                "none_small": 0.4,
                "bn_small": 0.3,  # removes 0.1
                "none_large": 0.4,
                "bn_large": 0.1,  # removes 0.3
            },
        )
        for r in removed
    ]
    v = _judge(seeds)
    gap = v["loss_gap"]
    mean = sum(removed) / 3
    var = sum((r - mean) ** 2 for r in removed) / 2
    assert gap["effects"] == pytest.approx(list(removed))
    assert gap["low"] == pytest.approx(mean - T_2 * math.sqrt(var / 3))
    assert gap["se_sampling"] == 0.0  # a records claim: seeds only
    assert gap["outcome"] == "supported"
    assert v["batch_noise"]["effects"] == pytest.approx([-0.2] * 3)
    assert v["batch_noise"]["outcome"] == "contradicted"
    accuracy = v["test_accuracy"]
    assert (accuracy["effect"], accuracy["low"], accuracy["high"]) == (
        0.0,
        0.0,
        0.0,
    )
    assert accuracy["outcome"] == "inconclusive"


def test_accuracy_verdict_includes_test_set_sampling():
    """BN gets every image right, dropout 20 of 100, on every seed: the
    seeds agree (s = 0), so the interval is the bootstrap's alone:
    Var(100 (1 - acc_dropout)) = 100^2 p (1 - p) / n = 16 points^2."""
    seeds = [seed_runs(accuracy={"bn": 1.0, "dropout": 0.2})] * 3
    v = _judge(seeds, n_boot=1000)["replaces_dropout"]
    assert v["effects"] == pytest.approx([80.0] * 3)
    assert v["se_seeds"] == 0.0
    se = math.sqrt(16 / 3)
    assert v["se_sampling"] == pytest.approx(se, rel=0.1)
    assert v["low"] == pytest.approx(80 - T_2 * v["se_sampling"])
    assert v["outcome"] == "supported"


# ------------------------------------------ the shared test-scale result
def test_runs_spec_and_twins_of_the_test_scale_result(test_scale):
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    assert res["eval_epochs"] == reg.eval_epochs(config) == [0, 1, 2]
    assert config["batch_arms"]  # the test scale trains every run
    expected = set(reg.RUNS) | {name + TWIN for name in reg.TWINNED}
    for per_seed in res["runs"]:
        assert set(per_seed) == expected
    spec = res["runs_spec"]
    assert set(spec) == set(reg.RUNS)
    sizes = [spec[n]["batch_size"] for n in ("none", "bn_small", "bn_large")]
    assert sizes == [60, 15, 240]
    rates = [
        spec[n]["learning_rate"] for n in ("none", "bn_small", "bn_large")
    ]
    assert rates == pytest.approx([0.1, 0.025, 0.4])
    assert spec["bn_dropout"] == {
        "batch_norm": "before",
        "dropout": True,
        "batch_size": 60,
        "learning_rate": 0.1,
    }
    assert set(res["verdicts"]) == {
        "test_accuracy",
        "loss_gap",
        "replaces_dropout",
        "batch_noise",
    }


def test_records_curves_finals_and_loss_gap(test_scale):
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    n_eval = len(res["eval_epochs"])
    for per_seed in res["runs"]:
        for name, run in per_seed.items():
            assert not run["diverged"], name
            for key in CURVES:
                assert len(run[key]) == n_eval, (name, key)
            for key in ("train_loss", "train_accuracy", "test_loss"):
                assert run[f"final_{key}"] == run[f"{key}_curve"][-1]
            # the training loop's last evaluation is the curve's last
            assert run["final_test_accuracy"] == run["test_accuracy_curve"][-1]
            assert run["loss_gap"] == pytest.approx(
                run["final_test_loss"] - run["final_train_loss"], abs=1e-12
            )
            batch = res["runs_spec"][name.removesuffix(TWIN)]["batch_size"]
            steps = config["epochs"] * (config["n_train"] // batch)
            assert run["steps_run"] == steps, name
            assert run["eval_steps"] == [0, steps]
            mini = run["minibatch_loss_curve"]
            assert mini[0] is None and all(v > 0 for v in mini[1:])
            level = config["matched_train_loss"]
            reached = any(v <= level for v in run["train_loss_curve"])
            assert (run["matched_epoch"] is not None) == reached


def test_batch_statistics_only_for_batch_norm_runs_without_dropout(
    test_scale,
):
    res = test_scale(NAME)["results"]
    for per_seed in res["runs"]:
        for name, run in per_seed.items():
            spec = res["runs_spec"][name.removesuffix(TWIN)]
            expected = spec["batch_norm"] != "none" and not spec["dropout"]
            for key in BATCHSTAT:
                assert (run[key] is not None) == expected, (name, key)
        assert {
            n for n, r in per_seed.items() if r["batchstat_test_loss"]
        } == {"bn", "bn~ulp", "bn_small", "bn_large"}


def test_epoch_zero_is_the_untrained_network(test_scale):
    """Before any step, every run without BN is the same network (the
    same kernels; dropout is off in inference mode), and so is every run
    with BN: the same epoch-0 losses, those of a freshly built model."""
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    n = config["n_train"]
    for seed, per_seed in zip(result["seeds"], res["runs"], strict=True):
        data = mnist(seed)
        for group in (
            ("none", "dropout", "none_small", "none_large"),
            ("bn", "bn_dropout", "bn_small", "bn_large"),
        ):
            first = {per_seed[g]["train_loss_curve"][0] for g in group}
            assert len(first) == 1, group
            model = reg.build_model(config, group[0], seed)
            fresh = evaluate(model, data.x_train[:n], data.y_train[:n])
            assert first.pop() == pytest.approx(fresh.loss, rel=1e-5)


def test_stored_loss_gap_effects_agree_with_the_records(test_scale):
    res = test_scale(NAME)["results"]
    by_hand = [
        runs["none"]["loss_gap"] - runs["bn"]["loss_gap"]
        for runs in res["runs"]
    ]
    assert res["verdicts"]["loss_gap"]["effects"] == pytest.approx(by_hand)


# ------------------------------------------------- behaviour, tiny runs
def test_a_diverged_run_pads_its_curves_and_has_no_gap():
    config = {**reg.CONFIG_TEST, "learning_rate": 1e4}
    for name in ("none", "bn"):
        run = reg.train_one(config, name, 0)
        assert run["diverged"] and run["final_test_accuracy"] is None
        assert run["test_correct"] is None
        for key in CURVES:
            assert len(run[key]) == 3 and run[key][-1] is None, key
        assert run["train_loss_curve"][0] is not None  # epoch 0 was fine
        assert run["loss_gap"] is None and run["final_test_loss"] is None
        assert all(run[key] is None for key in BATCHSTAT)
