"""Tests of companion.experiments.sigmoid_paper (chapter 12).

The claims' effects and verdicts are checked on synthetic runs whose
answers are worked out by hand here; the records on the shared test-scale
run (the ``test_scale`` fixture of tests/conftest.py, run once per
session); behaviour that needs its own run on tiny ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion.experiments import sigmoid_paper as sp
from companion.experiments.common import TWIN, record, verdicts
from companion.functional import batchnorm_forward
from companion.layers import BatchNorm
from companion.nn import Dense
from companion.seeding import KERNELS, rng
from companion.training import mlp

NAME = "sigmoid_paper"
T_2 = 4.302652729911275
"""Student's t quantile t(0.975, 2 degrees of freedom), from a table."""
N_TEST = 100
CONFIG = sp.CONFIG_CI  # control on; margins 2 and 10 points


# ------------------------------------------------------------ synthetic runs
def fake_run(accuracy: float | None) -> dict:
    """A record as common.record stores it: ``accuracy`` of N_TEST test
    images right (the first ones), or a run that diverged (None)."""
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
    return record(history)


def seed_runs(**pairs: tuple) -> dict:
    """One seed's runs: ``paper=(with BN, without BN)`` accuracies, ..."""
    return {
        f"{prefix}/{variant}": fake_run(value)
        for prefix, (with_bn, without_bn) in pairs.items()
        for variant, value in (
            ("with_bn", with_bn),
            ("without_bn", without_bn),
        )
    }


def effects(config=CONFIG) -> dict:
    return {m.claim.key: m.effect for m in sp.measures(config)}


# ------------------------------------------------------------------ helpers
def test_record_steps_include_zero_and_the_last_step():
    assert sp.record_steps(20, 10) == [0, 10, 20]
    assert sp.record_steps(25, 10) == [0, 10, 20, 25]
    assert sp.record_steps(5, 10) == [0, 5]


def test_full_scale_is_the_papers_experiment():
    full = sp.CONFIG_FULL
    assert full["hidden"] == [100, 100, 100] and full["steps"] == 50000
    assert (
        full["batch_size"] == 60
        and full["init_std"] == sp.CONFIG_CI["init_std"]
    )
    assert len(full["deep_hidden"]) == 8 and full["control"]


def test_gaussian_kernels_draw_the_same_kernels_for_both_variants():
    kernels = {}
    for batch_norm in ("none", "before"):
        model = mlp([5, 4], activation="sigmoid", batch_norm=batch_norm)
        model.build((None, 28, 28, 1))
        sp.gaussian_kernels(model, 0.5, seed=2)
        dense = [layer for layer in model if isinstance(layer, Dense)]
        kernels[batch_norm] = [layer.kernel.copy() for layer in dense]
        assert all(d.bias is None or not d.bias.any() for d in dense)
    assert [k.shape for k in kernels["none"]] == [(784, 5), (5, 4), (4, 10)]
    for i, (a, b) in enumerate(
        zip(kernels["none"], kernels["before"], strict=True)
    ):
        np.testing.assert_array_equal(a, b)
        z = rng(2, KERNELS, i).standard_normal(a.shape)
        np.testing.assert_allclose(a, 0.5 * z, rtol=1e-6)
    assert np.std(kernels["none"][0]) == pytest.approx(0.5, rel=0.05)


def test_sigmoid_inputs_without_bn_are_the_pre_activations():
    model = mlp([6, 5], activation="sigmoid", seed=1)
    x = np.random.default_rng(0).uniform(size=(30, 28, 28, 1))
    x = x.astype(np.float32)
    model(x)
    dense = [layer for layer in model if isinstance(layer, Dense)]
    z1 = x.reshape(30, -1) @ dense[0].kernel + dense[0].bias
    z2 = (1 / (1 + np.exp(-z1))) @ dense[1].kernel + dense[1].bias
    inputs = sp.sigmoid_inputs(model, x)
    assert len(inputs) == 2
    np.testing.assert_allclose(inputs[0], z1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inputs[1], z2, rtol=1e-5, atol=1e-6)


def test_sigmoid_inputs_with_bn_use_the_batch_and_keep_moving_stats():
    model = mlp([6, 5], activation="sigmoid", batch_norm="before", seed=1)
    x = np.random.default_rng(0).uniform(size=(30, 28, 28, 1))
    x = x.astype(np.float32)
    model(x, training=True)  # moves the moving statistics off 0 and 1
    bns = [layer for layer in model if isinstance(layer, BatchNorm)]
    before = [(b.moving_mean.copy(), b.moving_variance.copy()) for b in bns]
    inputs = sp.sigmoid_inputs(model, x)
    for b, (mean, variance) in zip(bns, before, strict=True):
        np.testing.assert_array_equal(b.moving_mean, mean)
        np.testing.assert_array_equal(b.moving_variance, variance)
    dense = next(layer for layer in model if isinstance(layer, Dense))
    expected, _ = batchnorm_forward(
        x.reshape(30, -1) @ dense.kernel,
        bns[0].gamma,
        bns[0].beta,
        epsilon=bns[0].epsilon,
    )
    np.testing.assert_allclose(inputs[0], expected, rtol=1e-5, atol=1e-6)
    # beta = 0: every unit has batch mean 0
    np.testing.assert_allclose(inputs[1].mean(axis=0), 0.0, atol=1e-5)


# ---------------------------------------------------------- claim effects
def test_gains_are_with_minus_without_in_points():
    eff = effects()
    runs = seed_runs(paper=(0.95, None), glorot=(0.97, 0.96), deep=(0.9, 0.1))
    acc = {
        name: 0.1 if r["diverged"] else r["final_test_accuracy"]
        for name, r in runs.items()
    }
    assert eff["paper_init"](acc) == pytest.approx(85.0)  # 95 - chance
    assert eff["glorot_init"](acc) == pytest.approx(1.0)
    assert eff["deep"](acc) == pytest.approx(80.0)


def test_the_glorot_control_is_a_claim_only_with_control():
    got = {
        m.claim.key: (m.claim.role, m.claim.unit, m.claim.margin)
        for m in sp.measures(CONFIG)
    }
    assert got == {
        "paper_init": ("claim", "points", CONFIG["margin_points"]),
        "glorot_init": ("control", "points", CONFIG["margin_points"]),
        "deep": ("claim", "points", CONFIG["deep_margin_points"]),
    }
    without = sp.measures({**CONFIG, "control": False})
    assert [m.claim.key for m in without] == ["paper_init", "deep"]


# ------------------------------------------------------ verdicts, by hand
def test_verdicts_of_three_outcomes():
    # paper: every image right with BN, diverged without (chance): +90
    # points on every seed, and no resample moves either: supported.
    # glorot: the same images right: 0, inconclusive.  deep: no image
    # right with BN, all without: -100, contradicted.
    runs = seed_runs(paper=(1.0, None), glorot=(0.9, 0.9), deep=(0.0, 1.0))
    v = verdicts(sp.measures(CONFIG), [runs] * 3, n_test=N_TEST, n_boot=200)
    expected = {
        "paper_init": (90.0, "supported"),
        "glorot_init": (0.0, "inconclusive"),
        "deep": (-100.0, "contradicted"),
    }
    for key, (effect, outcome) in expected.items():
        assert v[key]["effects"] == pytest.approx([effect] * 3), key
        assert v[key]["low"] == pytest.approx(effect), key
        assert v[key]["high"] == pytest.approx(effect), key
        assert v[key]["outcome"] == outcome, key


def test_the_test_set_bounds_the_precision_of_a_gain():
    """+12 points on every seed (the seeds agree: s = 0), from 12 images
    of 100 that only BN gets right: the interval is the bootstrap's,
    Var(100 mean(d)) = 100^2 p (1 - p) / n with p = 0.12, i.e. 10.56
    points^2 per seed.  Its lower end, 12 - T_2 sqrt(10.56 / 3) = 3.9,
    clears the paper's margin (2) but not the deep network's (10)."""
    runs = seed_runs(paper=(1.0, 0.88), glorot=(0.9, 0.9), deep=(1.0, 0.88))
    measures = sp.measures(CONFIG)
    v = verdicts(measures, [runs] * 3, n_test=N_TEST, n_boot=1000)
    se = math.sqrt(10.56 / 3)
    for key, outcome in (
        ("paper_init", "supported"),
        ("deep", "inconclusive"),
    ):
        assert v[key]["effect"] == pytest.approx(12.0)
        assert v[key]["se_seeds"] == 0.0
        assert v[key]["se_sampling"] == pytest.approx(se, rel=0.1)
        # the interval uses exactly that standard error (s = 0)
        low = 12 - T_2 * v[key]["se_sampling"]
        assert v[key]["low"] == pytest.approx(low)
        assert v[key]["outcome"] == outcome, key


# ------------------------------------------ the shared test-scale result
def test_runs_claims_and_twins_of_the_test_scale_result(test_scale):
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    assert config["control"]
    assert res["record_steps"] == [0, 10, 20]
    assert res["deep_eval_steps"] == [0, 10, 20]
    assert res["percentiles"] == list(sp.PERCENTILES) == [15, 50, 85]
    expected = {
        f"{part}/{variant}"
        for part in ("paper", "glorot", "deep")
        for variant in ("with_bn", "without_bn")
    }
    expected |= {name + TWIN for name in sp.TWINNED}
    for per_seed in res["runs"]:
        assert set(per_seed) == expected
    assert set(res["verdicts"]) == {"paper_init", "glorot_init", "deep"}


def test_paper_records_have_percentiles_and_saturation_per_step(test_scale):
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    n_layers = len(config["hidden"])
    for per_seed in res["runs"]:
        for name, run in per_seed.items():
            if name.startswith("deep/"):
                assert "percentiles" not in run
                if not run["diverged"]:
                    assert run["eval_steps"] == res["deep_eval_steps"]
                    assert run["steps_run"] == config["deep_steps"]
                continue
            if not run["diverged"]:
                assert run["eval_steps"] == res["record_steps"], name
                assert run["steps_run"] == config["steps"]
            points = len(run["eval_steps"])
            assert len(run["percentiles"]) == points, name
            for p15, p50, p85 in run["percentiles"]:
                assert p15 <= p50 <= p85, name
            assert len(run["saturated_fraction"]) == points, name
            for fractions in run["saturated_fraction"]:
                assert len(fractions) == n_layers
                assert all(0.0 <= f <= 1.0 for f in fractions)
            assert run["median_range_unit"] >= 0.0
            assert run["median_range_units"] >= 0.0
            train_acc = run["final_train_accuracy"]
            assert (train_acc is None) == run["diverged"]
            assert train_acc is None or 0.0 <= train_acc <= 1.0


def test_step_zero_inputs_of_the_papers_initialization(test_scale):
    """At step 0 without BN, the recorded unit of the last hidden layer
    receives sum_i W_i h_i with h_i in (0, 1), W = init_std Z and no bias:
    its percentiles lie between the sums of the negative and of the
    positive W_i; the later hidden layers cannot saturate."""
    result = test_scale(NAME)
    config = result["config"]
    last = len(config["hidden"]) - 1
    for seed, per_seed in zip(
        result["seeds"], result["results"]["runs"], strict=True
    ):
        run = per_seed["paper/without_bn"]
        shape = (config["hidden"][last - 1], config["hidden"][last])
        w = config["init_std"] * rng(seed, KERNELS, last).standard_normal(
            shape
        )
        column = w[:, config["unit"]]
        low, high = column[column < 0].sum(), column[column > 0].sum()
        assert all(low <= p <= high for p in run["percentiles"][0])
        assert run["saturated_fraction"][0][1:] == [0.0] * last


def test_stored_effects_are_the_accuracy_gains_of_the_records(test_scale):
    res = test_scale(NAME)["results"]

    def acc(run):
        return 0.1 if run["diverged"] else run["final_test_accuracy"]

    for key, prefix in (
        ("paper_init", "paper"),
        ("glorot_init", "glorot"),
        ("deep", "deep"),
    ):
        by_hand = [
            100
            * (acc(r[f"{prefix}/with_bn"]) - acc(r[f"{prefix}/without_bn"]))
            for r in res["runs"]
        ]
        assert res["verdicts"][key]["effects"] == pytest.approx(by_hand)


# ------------------------------------------------- behaviour, tiny runs
class _Stop(Exception):
    pass


def test_a_twin_starts_one_ulp_above_the_papers_kernels(monkeypatch):
    seen = []

    def capture(model, *args, **kwargs):
        seen.append([d.kernel.copy() for d in model if isinstance(d, Dense)])
        raise _Stop

    monkeypatch.setattr(sp, "train", capture)
    for twin in (False, True):
        with pytest.raises(_Stop):
            sp.train_paper(sp.CONFIG_TEST, "paper", "without_bn", 0, twin=twin)
    std = sp.CONFIG_TEST["init_std"]
    for i, (base, twin) in enumerate(zip(*seen, strict=True)):
        z = rng(0, KERNELS, i).standard_normal(base.shape)
        np.testing.assert_allclose(base, std * z, rtol=1e-6)
        np.testing.assert_array_equal(twin, np.nextafter(base, np.inf))


def test_a_diverged_run_keeps_what_it_recorded_before():
    config = {**sp.CONFIG_TEST, "learning_rate": 1e4}
    run = sp.train_paper(config, "glorot", "without_bn", 0)
    assert run["diverged"] and run["final_test_accuracy"] is None
    assert run["test_correct"] is None
    assert run["final_train_accuracy"] is None
    # diverged before the first recording after step 0
    assert run["eval_steps"] == [0]
    assert len(run["percentiles"]) == len(run["saturated_fraction"]) == 1
    assert run["median_range_unit"] == 0.0  # one point: no movement
