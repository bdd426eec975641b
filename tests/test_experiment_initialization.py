"""Tests of companion.experiments.initialization (chapter 10).

The claims' effects and verdicts are checked on synthetic runs whose
answers are worked out by hand here; the records on the shared test-scale
run (the ``test_scale`` fixture of tests/conftest.py, run once per
session); behaviour that needs its own run on tiny ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion.experiments import initialization as ini
from companion.experiments.common import TWIN, record, verdicts
from companion.seeding import KERNELS, rng
from companion.training import mlp

NAME = "initialization"
T_2 = 4.302652729911275
"""Student's t quantile t(0.975, 2 degrees of freedom), from a table."""
N_TEST = 100
CONFIG = {**ini.CONFIG_CI, "control": True}  # 10^-3 .. 10^1, 9 scales
LOG_SCALES = [-3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0]
WORKS, FAILS = 1.0, 0.2  # no resample of 100 images moves them across 0.8


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


def working(indices) -> list:
    """Works at the grid scales ``indices``, fails (diverges above 10^0)
    at the others."""
    return [
        WORKS if i in indices else (FAILS if i < 7 else None)
        for i in range(len(LOG_SCALES))
    ]


def seed_runs(**variants: list) -> dict:
    """One seed's runs: per variant, one fake_run argument per scale."""
    return {
        ini.run_name(variant, i): fake_run(accuracy)
        for variant, accuracies in variants.items()
        for i, accuracy in enumerate(accuracies)
    }


def accuracies(runs: dict) -> dict[str, float]:
    return {
        name: 0.1 if r["diverged"] else r["final_test_accuracy"]
        for name, r in runs.items()
    }


def effects(config=CONFIG) -> dict:
    return {m.claim.key: m.effect for m in ini.measures(config)}


# ------------------------------------------------------------------ helpers
def test_grids_and_the_full_grid_refines_the_ci_grid():
    assert ini.weight_scales(ini.CONFIG_TEST) == pytest.approx(
        [1e-3, 1e-1, 1e1], rel=1e-12
    )
    assert ini.grid_step_decades(ini.CONFIG_TEST) == 2.0
    ci = ini.weight_scales(ini.CONFIG_CI)
    assert ci == pytest.approx([10**x for x in LOG_SCALES], rel=1e-12)
    assert ini.grid_step_decades(ini.CONFIG_CI) == 0.5
    full = ini.weight_scales(ini.CONFIG_FULL)
    assert ini.grid_step_decades(ini.CONFIG_FULL) == 0.25
    np.testing.assert_allclose(full[::2], ci, rtol=1e-12)


def test_variants_and_run_names():
    assert ini.variants(CONFIG) == ["without_bn", "with_bn", ini.CONTROL]
    assert ini.variants(ini.CONFIG_CI) == ["without_bn", "with_bn"]
    assert ini.run_name("with_bn", 2) == "with_bn/s2"
    assert ini.BATCH_NORM[ini.CONTROL] == "before"


def test_draw_kernels_scales_one_fixed_draw():
    def kernels(scale, skip_output=False):
        model = mlp([5, 4], batch_norm="before", seed=3)
        model.build((None, 28, 28, 1))
        glorot = [layer.kernel.copy() for layer in ini.dense_layers(model)]
        ini.draw_kernels(model, scale, seed=3, skip_output=skip_output)
        drawn = [layer.kernel.copy() for layer in ini.dense_layers(model)]
        return glorot, drawn

    _, small = kernels(0.01)
    _, large = kernels(10.0)
    assert [k.shape for k in small] == [(784, 5), (5, 4), (4, 10)]
    for i, (a, b) in enumerate(zip(small, large, strict=True)):
        # same directions, only the size differs: s Z, Z from stream i
        z = rng(3, KERNELS, i).standard_normal(a.shape)
        np.testing.assert_allclose(a, 0.01 * z, rtol=1e-6)
        np.testing.assert_allclose(b, 1000.0 * a, rtol=1e-5)
    assert np.std(large[0]) == pytest.approx(10.0, rel=0.02)
    glorot, skipped = kernels(10.0, skip_output=True)
    np.testing.assert_array_equal(skipped[-1], glorot[-1])
    np.testing.assert_array_equal(skipped[0], large[0])
    assert not np.array_equal(glorot[0], large[0])


def test_working_range_is_the_span_of_the_working_scales():
    scales = [10**x for x in LOG_SCALES]

    def span(values):
        # as the verdicts score them: a diverged run (None) is at chance
        acc = {
            ini.run_name("v", i): 0.1 if a is None else a
            for i, a in enumerate(values)
        }
        return ini.working_range(acc, "v", scales, 0.8)

    # 10^-2, 10^-1.5, 10^-1: one decade
    assert span(working({2, 3, 4})) == pytest.approx(1.0)
    # not contiguous: from 10^-2.5 to 10^0, 2.5 decades
    assert span(working({1, 6})) == pytest.approx(2.5)
    assert span(working({4})) == 0.0  # one working scale: no span
    assert span(working(set())) == 0.0
    # exactly the threshold works; a diverged run (chance) does not
    assert span([0.8, 0.8] + [0.1] * 7) == pytest.approx(0.5)


# ---------------------------------------------------------- claim effects
def test_working_range_gain_and_the_output_layer_control():
    runs = seed_runs(
        with_bn=working(set(range(9))),  # 4 decades
        without_bn=working({3, 4, 5}),  # 1 decade
        with_bn_default_output=working({1, 2, 3, 4, 5, 6}),  # 2.5 decades
    )
    eff = effects()
    acc = accuracies(runs)
    assert eff["working_range"](acc) == pytest.approx(3.0)
    assert eff["output_layer"](acc) == pytest.approx(2.5 - 4.0)


def test_claims_follow_the_control_setting():
    keys = {
        m.claim.key: (m.claim.role, m.claim.unit, m.claim.margin)
        for m in ini.measures(CONFIG)
    }
    margin = CONFIG["margin_decades"]
    assert keys == {
        "working_range": ("claim", "decades", margin),
        "output_layer": ("control", "decades", margin),
    }
    assert [m.claim.key for m in ini.measures(ini.CONFIG_CI)] == [
        "working_range"
    ]


# ------------------------------------------------------ verdicts, by hand
def _judge(per_seed: list[dict]) -> dict:
    return verdicts(ini.measures(CONFIG), per_seed, n_test=N_TEST, n_boot=200)


def test_verdicts_of_three_outcomes():
    # with BN 4 decades, without 1: +3 (supported); the control 1 decade:
    # 1 - 4 = -3 (contradicted) ...
    runs = seed_runs(
        with_bn=working(set(range(9))),
        without_bn=working({3, 4, 5}),
        with_bn_default_output=working({3, 4, 5}),
    )
    v = _judge([runs] * 3)
    assert v["working_range"]["effects"] == pytest.approx([3.0] * 3)
    assert v["working_range"]["outcome"] == "supported"
    assert v["working_range"]["se_sampling"] == 0.0
    assert v["output_layer"]["effects"] == pytest.approx([-3.0] * 3)
    assert v["output_layer"]["outcome"] == "contradicted"
    # ... and when the control equals with BN: 0, inconclusive
    runs = seed_runs(
        with_bn=working(set(range(9))),
        without_bn=working({3, 4, 5}),
        with_bn_default_output=working(set(range(9))),
    )
    v = _judge([runs] * 3)["output_layer"]
    assert (v["effect"], v["low"], v["high"]) == (0.0, 0.0, 0.0)
    assert v["outcome"] == "inconclusive"


def test_verdict_interval_over_seeds_by_hand():
    # ranges with BN 4, 3, 2 decades, without 1, 1, 1: effects 3, 2, 1,
    # mean 2, s = 1: 2 +- T_2 / sqrt(3) = [-0.48, 4.48], inconclusive
    control = working(set(range(9)))
    seeds = [
        seed_runs(
            with_bn=working(set(range(start, 9))),
            without_bn=working({3, 4, 5}),
            with_bn_default_output=control,
        )
        for start in (0, 2, 4)
    ]
    v = _judge(seeds)["working_range"]
    assert v["effects"] == pytest.approx([3.0, 2.0, 1.0])
    assert v["low"] == pytest.approx(2 - T_2 / math.sqrt(3))
    assert v["high"] == pytest.approx(2 + T_2 / math.sqrt(3))
    assert v["outcome"] == "inconclusive"


# ------------------------------------------ the shared test-scale result
def test_variants_claims_and_twins_of_the_test_scale_result(test_scale):
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    assert config["control"]
    assert res["variants"] == ["without_bn", "with_bn", ini.CONTROL]
    assert res["weight_scales"] == pytest.approx([1e-3, 1e-1, 1e1])
    assert set(res["verdicts"]) == {"working_range", "output_layer"}
    n = config["n_scales"]
    expected = {ini.run_name(v, i) for v in res["variants"] for i in range(n)}
    expected |= {ini.run_name("without_bn", i) + TWIN for i in range(n)}
    for per_seed in res["runs"]:
        assert set(per_seed) == expected


def test_records_initial_loss_and_weight_change(test_scale):
    result = test_scale(NAME)
    config = result["config"]
    for per_seed in result["results"]["runs"]:
        for name, run in per_seed.items():
            # the first mini-batch's loss is missing only when the run
            # diverged on it
            assert (run["initial_loss"] is None) == (run["steps_run"] == 0)
            for key in ("hidden_change", "output_change"):
                value = run[key]
                assert (value is None) == run["diverged"], (name, key)
                assert value is None or value > 0, (name, key)
            if not run["diverged"]:
                assert run["steps_run"] == config["steps"]
                assert run["eval_steps"] == [0, 4, 8]
        # at scale 10^-3 the logits are ~0 (with BN too: the output
        # kernel is 10^-3 Z): the first loss is ln 10
        for variant in ("without_bn", "with_bn"):
            run = per_seed[ini.run_name(variant, 0)]
            assert run["initial_loss"] == pytest.approx(math.log(10), abs=1e-3)
        # at scale 10 without batch norm the first loss is astronomical:
        # the run stops at once, without an update
        huge = per_seed[ini.run_name("without_bn", 2)]
        assert huge["diverged"] and huge["steps_run"] == 0


def test_working_range_summary_agrees_with_the_records(test_scale):
    result = test_scale(NAME)
    config, res = result["config"], result["results"]
    logs = [math.log10(s) for s in res["weight_scales"]]
    for variant, per_seed_values in res["working_range"].items():
        by_hand = []
        for per_seed in res["runs"]:
            works = [
                log
                for i, log in enumerate(logs)
                if (a := per_seed[f"{variant}/s{i}"]["final_test_accuracy"])
                is not None
                and a >= config["threshold"]
            ]
            by_hand.append(max(works) - min(works) if len(works) > 1 else 0)
        assert per_seed_values == pytest.approx(by_hand), variant
    ranges = res["working_range"]
    for key, (a, b) in {
        "working_range": ("with_bn", "without_bn"),
        "output_layer": (ini.CONTROL, "with_bn"),
    }.items():
        by_hand = [x - y for x, y in zip(ranges[a], ranges[b], strict=True)]
        assert res["verdicts"][key]["effects"] == pytest.approx(by_hand)


# ------------------------------------------------- behaviour, tiny runs
class _Stop(Exception):
    pass


def _initial_kernels(monkeypatch, variant, scale, twin=False):
    """The Dense kernels train_one hands to the training loop."""
    seen = []

    def capture(model, *args, **kwargs):
        seen.append([d.kernel.copy() for d in ini.dense_layers(model)])
        raise _Stop

    monkeypatch.setattr(ini, "train", capture)
    with pytest.raises(_Stop):
        ini.train_one(ini.CONFIG_TEST, variant, scale, 0, twin=twin)
    return seen[0]


def test_a_twin_starts_one_ulp_above_the_scaled_kernels(monkeypatch):
    base = _initial_kernels(monkeypatch, "without_bn", 0.1)
    twin = _initial_kernels(monkeypatch, "without_bn", 0.1, twin=True)
    for i, (a, b) in enumerate(zip(base, twin, strict=True)):
        z = rng(0, KERNELS, i).standard_normal(a.shape)
        np.testing.assert_allclose(a, 0.1 * z, rtol=1e-6)
        np.testing.assert_array_equal(b, np.nextafter(a, np.inf))


def test_the_control_keeps_the_output_layer_at_glorot(monkeypatch):
    hidden = ini.CONFIG_TEST["hidden"]
    glorot = mlp(hidden, batch_norm="before", seed=0)
    glorot.build((None, 28, 28, 1))
    output = ini.dense_layers(glorot)[-1].kernel
    control = _initial_kernels(monkeypatch, ini.CONTROL, 10.0)
    with_bn = _initial_kernels(monkeypatch, "with_bn", 10.0)
    np.testing.assert_array_equal(control[-1], output)
    z_out = rng(0, KERNELS, len(hidden)).standard_normal(output.shape)
    np.testing.assert_allclose(with_bn[-1], 10.0 * z_out, rtol=1e-6)
    for a, b in zip(control[:-1], with_bn[:-1], strict=True):
        np.testing.assert_array_equal(a, b)  # hidden kernels: s Z in both
