"""Tests of companion.experiments.small_batch (chapter 16).

The claims' effects and verdicts on synthetic runs whose answers are
worked out by hand here; the records on the shared test-scale run (the
``test_scale`` fixture of tests/conftest.py); the models and the
recalibrated control on tiny runs of their own.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion.experiments import small_batch as sb
from companion.experiments.common import TWIN, record, verdicts
from companion.nn import BatchNorm, Dense, GroupNorm, LayerNorm

NAME = "small_batch"
N_TEST = 100


def fake_run(accuracy: float | None, first: int = 0) -> dict:
    """A record as common.record stores it: ``accuracy`` of N_TEST images
    right from image ``first`` on (cyclically), or a diverged run (None)."""
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


def seed_runs(bn, renorm, gn, ln, recal, b=2, first=0):
    return {
        sb.run_name("bn", b): fake_run(bn, first),
        sb.run_name("renorm", b): fake_run(renorm, first),
        sb.run_name("gn", b): fake_run(gn, first),
        sb.run_name("ln", b): fake_run(ln, first),
        sb.run_name("bn_recal", b): fake_run(recal, first),
    }


def test_the_claims_and_their_effects_by_hand():
    config = {**sb.CONFIG_CI, "batch_sizes": [2, 8]}
    measures = {m.claim.key: m for m in sb.measures(config)}
    assert sorted(measures) == sorted(
        f"{key}_b{b}"
        for b in (2, 8)
        for key in (
            "renorm",
            "groupnorm",
            "groupnorm_vs_renorm",
            "groupnorm_vs_layernorm",
            "recalibrated",
        )
    )
    assert measures["recalibrated_b2"].claim.role == "control"
    assert all(m.claim.unit == "points" for m in measures.values())
    assert all(m.claim.margin == 2.0 for m in measures.values())
    runs = seed_runs(bn=0.30, renorm=0.60, gn=0.75, ln=0.76, recal=0.35)
    effect = {
        k: m.effect_of(runs, N_TEST) for k, m in measures.items() if "b2" in k
    }
    assert effect == pytest.approx(
        {
            "renorm_b2": 30.0,  # 60 - 30
            "groupnorm_b2": 45.0,  # 75 - 30
            "groupnorm_vs_renorm_b2": 15.0,  # 75 - 60
            "groupnorm_vs_layernorm_b2": -1.0,  # 75 - 76
            "recalibrated_b2": 5.0,  # 35 - 30
        }
    )
    # a diverged batch norm run scores chance (10 %), its recalibration too
    runs = seed_runs(bn=None, renorm=0.60, gn=0.75, ln=0.76, recal=None)
    assert measures["renorm_b2"].effect_of(runs, N_TEST) == pytest.approx(50.0)
    assert measures["recalibrated_b2"].effect_of(
        runs, N_TEST
    ) == pytest.approx(0.0)


def test_verdicts_on_synthetic_seeds():
    """Five seeds: renorm beats bn by 30 points every time (supported),
    gn and ln tie (inconclusive), bn_recal loses 30 points to bn
    (contradicted)."""
    config = sb.CONFIG_CI
    runs = [
        seed_runs(bn=0.40, renorm=0.70, gn=0.80, ln=0.80, recal=0.10, first=f)
        for f in range(5)
    ]
    out = verdicts(sb.measures(config), runs, n_test=N_TEST, n_boot=200)
    assert out["renorm_b2"]["outcome"] == "supported"
    assert out["renorm_b2"]["effect"] == pytest.approx(30.0)
    assert out["groupnorm_vs_layernorm_b2"]["outcome"] == "inconclusive"
    assert out["recalibrated_b2"]["outcome"] == "contradicted"


def test_the_arms_share_kernels_and_differ_only_in_the_normalization():
    config = sb.CONFIG_CI
    models = {arm: sb.build(arm, config, seed=3) for arm in sb.ARMS}
    kinds = {
        arm: [type(layer) for layer in model.layers]
        for arm, model in models.items()
    }
    assert kinds["bn"].count(BatchNorm) == 3
    assert kinds["gn"].count(GroupNorm) == 3
    assert kinds["ln"].count(LayerNorm) == 3
    renorm = [
        layer
        for layer in models["renorm"].layers
        if isinstance(layer, BatchNorm)
    ]
    assert all(layer.renorm for layer in renorm)
    assert renorm[0].renorm_clipping == config["renorm_clipping"]
    assert [
        layer.groups
        for layer in models["gn"].layers
        if isinstance(layer, GroupNorm)
    ] == [5] * 3
    for model in models.values():
        model.build((None, 28, 28, 1))
    kernels = {
        arm: [
            layer.kernel for layer in model.layers if isinstance(layer, Dense)
        ]
        for arm, model in models.items()
    }
    for arm in sb.ARMS[1:]:
        for a, b in zip(kernels["bn"], kernels[arm], strict=True):
            np.testing.assert_array_equal(a, b)
    hidden = [
        layer for layer in models["bn"].layers if isinstance(layer, Dense)
    ][:-1]
    assert not any(layer.use_bias for layer in hidden)
    with pytest.raises(ValueError, match="arm must be one of"):
        sb.build("instance", config, seed=0)


def test_records_of_the_test_scale_run(test_scale):
    result = test_scale(NAME)
    res = result["results"]
    config = result["config"]
    names = {
        sb.run_name(arm, b) + suffix
        for arm in (*sb.ARMS, "bn_recal")
        for b in config["batch_sizes"]
        for suffix in ("", TWIN)
    }
    for runs in res["runs"]:
        assert set(runs) == names
        for name, run in runs.items():
            if name.startswith("bn_recal"):
                assert run["steps_run"] == 0
            else:
                assert (
                    run["steps_run"] in (0, config["steps"]) or run["diverged"]
                )
    assert set(res["noise"]) == set(res["verdicts"])


def test_recalibration_replaces_the_moving_statistics(monkeypatch):
    """The "bn_recal" record is the batch norm network after Algorithm 2:
    the same weights, other moving statistics, evaluated once."""
    config = {**sb.CONFIG_TEST, "steps": 6, "eval_every": 3}
    seen = {}
    original = sb.recalibrate

    def spy(model, batches):
        layers = [
            layer for layer in model.layers if isinstance(layer, BatchNorm)
        ]
        seen["before"] = [layer.moving_mean.copy() for layer in layers]
        seen["batches"] = list(batches)
        out = original(model, iter(seen["batches"]))
        seen["after"] = [layer.moving_mean.copy() for layer in layers]
        return out

    monkeypatch.setattr(sb, "recalibrate", spy)
    runs = sb.train_one(config, "bn", 2, seed=0)
    assert sorted(runs) == ["bn/b2", "bn_recal/b2"]
    assert len(seen["batches"]) == config["recalibration_batches"]
    assert all(len(x) == sb.RECALIBRATION_BATCH for x, _ in seen["batches"])
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(seen["before"], seen["after"], strict=True)
    )
    assert runs["bn_recal/b2"]["test_correct"] is not None
    other = sb.train_one(config, "gn", 2, seed=0)
    assert sorted(other) == ["gn/b2"]
