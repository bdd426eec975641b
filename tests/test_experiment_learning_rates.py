"""Tests of companion.experiments.learning_rates (chapter 9).

The claims' effects and verdicts are checked on synthetic runs whose
answers are worked out by hand here; the records on the shared test-scale
run (the ``test_scale`` fixture of tests/conftest.py, run once per
session); behaviour that needs its own run on tiny ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion.experiments import learning_rates as lr_exp
from companion.experiments.common import TWIN, record, verdicts
from companion.nn import Dense
from companion.training import mlp

NAME = "learning_rates"
T_2 = 4.302652729911275
"""Student's t quantile t(0.975, 2 degrees of freedom), from a table."""
N_TEST = 100
CONFIG = lr_exp.CONFIG_CI  # 10^-2 .. 10^1, 7 rates half a decade apart
LOG_LRS = [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0]
EVERY = CONFIG["eval_every"]  # 50
STEPS = CONFIG["steps"]  # 600
EVAL_STEPS = list(range(0, STEPS + 1, EVERY))
GOOD, BAD = 1.0, 0.2  # no resample of 100 images moves them across 0.9


# ------------------------------------------------------------ synthetic runs
def fake_run(accuracy: float | None, reach: int | None = None) -> dict:
    """A record as common.record stores it, on CONFIG's evaluation steps:
    ``accuracy`` of N_TEST test images right at the end (None: diverged at
    the first step); the test accuracy curve first reaches the threshold
    at step ``reach`` (None: never before the end)."""
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
        return record(history)
    correct = np.arange(N_TEST) < round(accuracy * N_TEST)
    final = float(correct.mean())
    curve = [
        final if reach is not None and s >= reach else 0.5 for s in EVAL_STEPS
    ]
    curve[-1] = final
    history = {
        "diverged": False,
        "final_test_accuracy": final,
        "final_test_correct": correct,
        "losses": [1.0] * STEPS,
        "steps": EVAL_STEPS,
        "test_accuracy": curve,
        "train_loss": [math.nan] + [1.0] * (len(EVAL_STEPS) - 1),
    }
    return record(history)


def seed_runs(with_bn: list, without_bn: list) -> dict:
    """One seed's runs: per variant, one fake_run argument per grid rate
    (an accuracy, None, or (accuracy, reach))."""
    runs = {}
    for variant, specs in (("with_bn", with_bn), ("without_bn", without_bn)):
        assert len(specs) == len(LOG_LRS)
        for i, spec in enumerate(specs):
            args = spec if isinstance(spec, tuple) else (spec,)
            runs[lr_exp.run_name(variant, i)] = fake_run(*args)
    return runs


def accuracies(runs: dict) -> dict[str, float]:
    return {
        name: 0.1 if r["diverged"] else r["final_test_accuracy"]
        for name, r in runs.items()
    }


def effects(config=CONFIG) -> dict:
    return {m.claim.key: m.effect for m in lr_exp.measures(config)}


def trains_up_to(k: int) -> list:
    """Trains at the grid rates 0..k, diverges above."""
    return [GOOD if i <= k else None for i in range(len(LOG_LRS))]


# ------------------------------------------------------------------ helpers
def test_grids_are_log_spaced_and_the_full_grid_refines_the_ci_grid():
    test = lr_exp.learning_rates(lr_exp.CONFIG_TEST)
    assert test == pytest.approx([0.01, 10**-0.5, 10.0], rel=1e-12)
    assert lr_exp.grid_step_decades(lr_exp.CONFIG_TEST) == 1.5
    ci = lr_exp.learning_rates(CONFIG)
    assert ci == pytest.approx([10**x for x in LOG_LRS], rel=1e-12)
    assert lr_exp.grid_step_decades(CONFIG) == 0.5
    full = lr_exp.learning_rates(lr_exp.CONFIG_FULL)
    assert len(full) == 19 and lr_exp.grid_step_decades(
        lr_exp.CONFIG_FULL
    ) == pytest.approx(0.25)
    np.testing.assert_allclose(full[4:17:2], ci, rtol=1e-12)
    one = {**CONFIG, "n_lrs": 1}
    assert lr_exp.grid_step_decades(one) == 3.0  # the whole span


def test_run_names_and_variants():
    assert lr_exp.run_name("with_bn", 3) == "with_bn/lr3"
    assert lr_exp.VARIANTS == {"without_bn": "none", "with_bn": "before"}


def test_sq_norms_is_the_mean_squared_column_norm_of_every_dense_kernel():
    model = mlp([5, 4], classes=3, batch_norm="before", seed=3)
    model.build((None, 6))
    kernels = [layer.kernel for layer in model if isinstance(layer, Dense)]
    by_hand = [
        sum(
            float(np.dot(col, col))
            for col in k.astype(np.float64).T  # one weight vector per unit
        )
        / k.shape[1]
        for k in kernels
    ]
    assert len(by_hand) == 3
    assert lr_exp.sq_norms(model) == pytest.approx(by_hand, rel=1e-12)
    kernels[0][0, 0] = np.inf
    assert lr_exp.sq_norms(model)[0] is None  # not finite
    assert lr_exp.sq_norms(model)[1:] == pytest.approx(by_hand[1:])


def test_largest_trained_is_the_largest_grid_rate_reaching_threshold():
    lrs, step = [0.01, 0.1, 1.0, 10.0], 1.0
    names = [lr_exp.run_name("v", i) for i in range(4)]

    def largest(values):
        acc = dict(zip(names, values, strict=True))
        return lr_exp.largest_trained(acc, "v", lrs, 0.9, step)

    assert largest([0.95, 0.9, 0.5, 0.1]) == pytest.approx(-1.0)
    # not contiguous: the largest rate counts
    assert largest([0.95, 0.2, 0.93, 0.1]) == pytest.approx(0.0)
    # trains at no grid rate: one grid step below the smallest
    assert largest([0.5, 0.1, 0.1, 0.1]) == pytest.approx(-3.0)


def test_best_rate_breaks_ties_towards_the_smaller_rate():
    acc = {"v/lr0": 0.90, "v/lr1": 0.95, "v/lr2": 0.95, "v/lr3": 0.1}
    assert lr_exp.best_rate(acc, "v", 4) == 1
    acc["v/lr2"] = 0.96
    assert lr_exp.best_rate(acc, "v", 4) == 2


def test_steps_to_is_the_first_evaluation_at_threshold():
    run = {"eval_steps": [0, 50, 100, 150], "test_accuracy": [0.1] * 4}
    assert lr_exp.steps_to(run, 0.9, never=200.0) == 200.0
    run["test_accuracy"] = [0.1, 0.89, 0.9, 0.95]
    assert lr_exp.steps_to(run, 0.9, never=200.0) == 100.0
    diverged = {"eval_steps": [0], "test_accuracy": [0.1]}
    assert lr_exp.steps_to(diverged, 0.9, never=200.0) == 200.0


# ---------------------------------------------------------- claim effects
def test_largest_rate_effect_in_decades():
    eff = effects()["largest_rate"]
    # with BN trains up to 10^0.5, without up to 10^-1: 1.5 decades
    runs = seed_runs(trains_up_to(5), trains_up_to(2))
    assert eff(accuracies(runs)) == pytest.approx(1.5)
    # without BN trains at no grid rate: it counts as 10^-2.5
    runs = seed_runs(trains_up_to(4), [BAD, BAD] + [None] * 5)
    assert eff(accuracies(runs)) == pytest.approx(0.0 - -2.5)
    # neither trains: 0
    runs = seed_runs([BAD] * 7, [None] * 7)
    assert eff(accuracies(runs)) == 0.0


def test_best_accuracy_effect_in_points():
    eff = effects()["best_accuracy"]
    with_bn = [0.5, 0.9, 0.97, 0.97, 0.93, None, None]
    without_bn = [0.5, 0.94, 0.92, None, None, None, None]
    runs = seed_runs(with_bn, without_bn)
    assert eff(accuracies(runs)) == pytest.approx(3.0)  # 97 - 94
    # every run diverged: chance on both sides
    runs = seed_runs([None] * 7, [None] * 7)
    assert eff(accuracies(runs)) == 0.0


def test_time_to_threshold_at_each_variants_best_rate():
    eff = effects()["time_to_threshold"]
    # with BN: best (0.97) at two rates, a tie that goes to the smaller
    # rate, index 2, which reaches 0.9 at step 300 (index 4 at step 100)
    with_bn = [BAD, 0.95, (0.97, 300), BAD, (0.97, 100), None, None]
    # without BN: the best rate (index 1) reaches 0.9 at step 400; the
    # faster run at index 2 is worse at the end
    without_bn = [BAD, (0.96, 400), (0.94, 50), None, None, None, None]
    runs = seed_runs(with_bn, without_bn)
    assert eff(runs) == pytest.approx(math.log10(400 / 300))


def test_time_to_threshold_counts_a_run_that_never_gets_there():
    eff = effects()["time_to_threshold"]
    never = STEPS + EVERY  # 650
    # without BN never reaches 0.9 (best accuracy 0.5 at rate 0)
    with_bn = [BAD, (GOOD, 100), None, None, None, None, None]
    without_bn = [0.5, BAD, None, None, None, None, None]
    runs = seed_runs(with_bn, without_bn)
    assert eff(runs) == pytest.approx(math.log10(never / 100))
    # neither gets there: 0 decades
    runs = seed_runs(without_bn, without_bn)
    assert eff(runs) == 0.0


def test_claims_units_and_margins_come_from_the_config():
    got = {
        m.claim.key: (m.claim.unit, m.claim.margin, m.kind)
        for m in lr_exp.measures(CONFIG)
    }
    assert got == {
        "largest_rate": ("decades", CONFIG["margin_decades"], "accuracy"),
        "best_accuracy": ("points", CONFIG["margin_points"], "accuracy"),
        "time_to_threshold": (
            "decades",
            CONFIG["margin_steps_decades"],
            "records",
        ),
    }


# ------------------------------------------------------ verdicts, by hand
def _judge(per_seed: list[dict]) -> dict:
    return verdicts(
        lr_exp.measures(CONFIG), per_seed, n_test=N_TEST, n_boot=200
    )


def test_verdicts_of_three_outcomes():
    # with BN trains up to 10^0 and, at its best rate (the first with all
    # images right, 10^-1), reaches 0.9 at step 100; without BN trains up
    # to 10^-1 and reaches 0.9 at step 400 at its best rate: +1 decade,
    # log10(4) = 0.60 decade faster, and the same best accuracy (the same
    # images right): supported, supported, inconclusive
    with_bn = [BAD, BAD, (GOOD, 100), GOOD, GOOD, None, None]
    without_bn = [BAD, (GOOD, 400), GOOD, None, None, None, None]
    v = _judge([seed_runs(with_bn, without_bn)] * 3)
    assert v["largest_rate"]["effects"] == pytest.approx([1.0] * 3)
    assert v["largest_rate"]["outcome"] == "supported"
    assert v["largest_rate"]["se_sampling"] == 0.0
    assert v["time_to_threshold"]["effects"] == pytest.approx(
        [math.log10(4)] * 3
    )
    assert v["time_to_threshold"]["outcome"] == "supported"
    assert v["best_accuracy"]["effects"] == [0.0] * 3
    assert (v["best_accuracy"]["low"], v["best_accuracy"]["high"]) == (0, 0)
    assert v["best_accuracy"]["outcome"] == "inconclusive"
    # swap the variants: contradicted twice
    v = _judge([seed_runs(without_bn, with_bn)] * 3)
    assert v["largest_rate"]["effects"] == pytest.approx([-1.0] * 3)
    assert v["largest_rate"]["outcome"] == "contradicted"
    assert v["time_to_threshold"]["outcome"] == "contradicted"


def test_time_to_threshold_interval_from_the_seeds_alone():
    # speed-ups log10(400/100), log10(400/200), log10(100/100) over three
    # seeds: Student's interval on these three numbers, no bootstrap
    without_bn = [BAD, (GOOD, 400), None, None, None, None, None]
    seeds = [
        seed_runs([BAD, (GOOD, reach), None, None, None, None, None], w)
        for reach, w in (
            (100, without_bn),
            (200, without_bn),
            (100, [BAD, (GOOD, 100), None, None, None, None, None]),
        )
    ]
    d = np.array([math.log10(4), math.log10(2), 0.0])
    half = T_2 * d.std(ddof=1) / math.sqrt(3)
    v = _judge(seeds)["time_to_threshold"]
    assert v["effects"] == pytest.approx(d.tolist())
    assert v["low"] == pytest.approx(d.mean() - half)
    assert v["high"] == pytest.approx(d.mean() + half)
    assert v["se_sampling"] == 0.0 and v["outcome"] == "inconclusive"


# ------------------------------------------ the shared test-scale result
def test_grid_runs_and_twins_of_the_test_scale_result(test_scale):
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    # CONFIG_TEST: 10^-2 .. 10^1 in 3 rates
    assert res["learning_rates"] == pytest.approx([0.01, 10**-0.5, 10.0])
    assert res["grid_step_decades"] == 1.5
    n = config["n_lrs"]
    expected = {
        lr_exp.run_name(v, i) for v in lr_exp.VARIANTS for i in range(n)
    }
    expected |= {lr_exp.run_name("without_bn", i) + TWIN for i in range(n)}
    for per_seed in res["runs"]:
        assert set(per_seed) == expected


def test_records_have_one_squared_norm_per_evaluation(test_scale):
    result = test_scale(NAME)
    config = result["config"]
    n_dense = len(config["hidden"]) + 1
    schedule = list(range(0, config["steps"] + 1, config["eval_every"]))
    for per_seed in result["results"]["runs"]:
        for name, run in per_seed.items():
            curve = run["sq_norm_curve"]
            assert len(curve) == len(run["eval_steps"]), name
            assert all(len(point) == n_dense for point in curve), name
            assert all(v > 0 for v in curve[0]), name
            if run["diverged"]:
                assert run["steps_run"] < config["steps"]
                assert run["eval_steps"] == schedule[: len(run["eval_steps"])]
            else:
                assert run["eval_steps"] == schedule, name
                assert run["steps_run"] == config["steps"]


def test_the_first_squared_norms_are_those_of_the_initial_kernels(test_scale):
    """Both variants start from the same Glorot kernels: the same first
    entry, that of the freshly built network."""
    result = test_scale(NAME)
    config = result["config"]
    runs = result["results"]["runs"]
    for seed, per_seed in zip(result["seeds"], runs, strict=True):
        model = mlp(config["hidden"], seed=seed)
        model.build((None, 28, 28, 1))
        initial = lr_exp.sq_norms(model)
        for i in range(config["n_lrs"]):
            for variant in lr_exp.VARIANTS:
                run = per_seed[lr_exp.run_name(variant, i)]
                assert run["sq_norm_curve"][0] == pytest.approx(
                    initial, rel=1e-12
                )


def test_stored_largest_rate_effects_agree_with_the_records(test_scale):
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    logs = [math.log10(lr) for lr in res["learning_rates"]]
    step, threshold = res["grid_step_decades"], config["threshold"]

    def largest(per_seed, variant):
        trained = [
            log
            for i, log in enumerate(logs)
            if (a := per_seed[f"{variant}/lr{i}"]["final_test_accuracy"])
            is not None
            and a >= threshold
        ]
        return max(trained) if trained else logs[0] - step

    by_hand = [
        largest(runs, "with_bn") - largest(runs, "without_bn")
        for runs in res["runs"]
    ]
    stored = res["verdicts"]["largest_rate"]["effects"]
    assert stored == pytest.approx(by_hand, abs=1e-12)
    assert set(res["verdicts"]) == set(lr_exp.EXPECTED_CI)


# ------------------------------------------------- behaviour, tiny runs
def test_a_huge_learning_rate_diverges_and_is_recorded_as_such():
    config = lr_exp.CONFIG_TEST
    run = lr_exp.train_one(config, "without_bn", 1e4, seed=0)
    assert run["diverged"] and run["steps_run"] < config["steps"]
    assert run["final_test_accuracy"] is None
    assert run["test_correct"] is None
    # diverged before the first evaluation: only the initial point
    assert run["eval_steps"] == [0] and len(run["sq_norm_curve"]) == 1
