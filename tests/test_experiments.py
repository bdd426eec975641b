"""companion.experiments: the protocol every experiment follows, the runner,
the command line, the verdicts and the committed full-scale files.

Each experiment runs once per test session at its tiny CONFIG_TEST scale
(the ``test_scale`` fixture of tests/conftest.py); each experiment's own
behaviour is tested in tests/test_experiment_<name>.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from companion import experiments, stats
from companion.experiments import (
    BOOK_SEEDS,
    _module,
    available,
    load_results,
    outcomes,
    run_experiment,
    save_results,
)
from companion.experiments.common import (
    TWIN,
    mnist,
    noise,
    perturb_ulp,
    summarize,
    verdicts,
)
from companion.training import mlp

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(available())
PART_III = {
    "gradient_flow",
    "learning_rates",
    "initialization",
    "regularization",
    "sigmoid_paper",
    "placement",
}


def test_the_book_has_its_six_experiments():
    assert set(NAMES) >= PART_III, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_experiment_module_follows_the_protocol(name):
    module = _module(name)
    assert isinstance(module.DESCRIPTION, str) and module.DESCRIPTION
    for config in (module.CONFIG_TEST, module.CONFIG_CI, module.CONFIG_FULL):
        assert isinstance(config, dict) and set(config) == set(
            module.CONFIG_CI
        )
    assert "Chapter" in module.__doc__
    claims = [m.claim for m in module.measures(module.CONFIG_CI)]
    keys = [c.key for c in claims]
    assert len(set(keys)) == len(keys) and set(module.EXPECTED_CI) == set(keys)
    assert set(module.EXPECTED_CI.values()) <= set(stats.OUTCOMES)
    full_keys = {m.claim.key for m in module.measures(module.CONFIG_FULL)}
    assert set(keys) <= full_keys
    for claim in claims:
        assert claim.statement and claim.effect and claim.unit
    assert not module.CONFIG_CI["twins"] and module.CONFIG_FULL["twins"]


@pytest.mark.parametrize("name", NAMES)
def test_results_have_the_common_shape(name, test_scale):
    result = test_scale(name)
    res = result["results"]
    assert result["seeds"] == [0, 1, 2] and result["scale"] == "ci"
    assert len(res["runs"]) == 3
    names = set(res["runs"][0])
    for per_seed in res["runs"]:
        assert set(per_seed) == names  # every seed has the same runs
        for run in per_seed.values():
            assert run["diverged"] == (run["final_test_accuracy"] is None)
            assert (run["test_correct"] is None) == run["diverged"]
            if not run["diverged"]:
                correct = stats.unpack_correct(run["test_correct"], 1000)
                assert correct.mean() == pytest.approx(
                    run["final_test_accuracy"]
                )
                assert run["test_accuracy"][-1] == run["final_test_accuracy"]
    assert any(n.endswith(TWIN) for n in names)  # CONFIG_TEST has twins
    provenance = result["provenance"]
    assert provenance["command"] == result["command"]
    assert provenance["versions"]["numpy"] == np.__version__


@pytest.mark.parametrize("name", NAMES)
def test_stored_verdicts_are_recomputed_from_the_stored_runs(name, test_scale):
    result = test_scale(name)
    module = _module(name)
    # Through JSON, as the chapters read the files.
    res = json.loads(json.dumps(experiments._jsonable(result)))["results"]
    measures = module.measures(result["config"])
    assert verdicts(measures, res["runs"]) == res["verdicts"]
    assert noise(measures, res["runs"]) == res["noise"]
    for verdict in res["verdicts"].values():
        assert verdict["outcome"] in stats.OUTCOMES
        assert verdict["low"] <= verdict["effect"] <= verdict["high"]
        assert len(verdict["effects"]) == 3


@pytest.mark.parametrize("name", NAMES)
def test_experiment_is_deterministic_and_serializes(
    name, test_scale, tmp_path
):
    """A second run of two seeds gives the same records, bit for bit."""
    first = test_scale(name)
    again = _module(name).run(first["config"], [1, 2])
    assert json.dumps(experiments._jsonable(again["runs"])) == json.dumps(
        experiments._jsonable(first["results"]["runs"][1:])
    )
    path = tmp_path / f"{name}.json"
    save_results(first, path)
    loaded = load_results(path)
    assert outcomes(loaded) == outcomes(first)
    assert loaded["results"]["runs"] == json.loads(
        json.dumps(experiments._jsonable(first["results"]["runs"]))
    )


def test_a_twin_starts_one_ulp_away():
    model = mlp([4], seed=0)
    model.build((None, 28, 28, 1))
    kernel = model.layers[1].kernel.copy()
    perturb_ulp(model)
    assert np.all(model.layers[1].kernel > kernel)
    np.testing.assert_array_equal(
        model.layers[1].kernel, np.nextafter(kernel, np.inf)
    )


@pytest.mark.parametrize("name", sorted(PART_III))
def test_committed_full_scale_results(name):
    """The files the chapters read: full scale, 5 seeds, provenance, and
    verdicts that the current code computes from the stored runs."""
    path = ROOT / "book" / "data" / f"{name}.json"
    result = load_results(path)
    module = _module(name)
    assert result["name"] == name and result["scale"] == "full"
    assert result["config"] == module.CONFIG_FULL
    assert result["seeds"] == BOOK_SEEDS
    assert result["command"] == (
        f"python -m companion.experiments {name} --full --seeds 5"
    )
    # its provenance: test_every_committed_result_says_where_it_came_from
    assert result["wall_time_s"] > 0
    res = result["results"]
    measures = module.measures(result["config"])
    assert verdicts(measures, res["runs"]) == res["verdicts"]
    assert noise(measures, res["runs"]) == res["noise"]


def test_runner_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"name must be one of .*'nope'"):
        run_experiment("nope")
    with pytest.raises(ValueError, match=r"seeds=0 is out of range"):
        run_experiment(NAMES[0], seeds=0)
    with pytest.raises(ValueError, match="distinct ints"):
        run_experiment(NAMES[0], seeds=[1, 1])
    with pytest.raises(ValueError, match=r"config has keys \['nope'\]"):
        run_experiment(NAMES[0], config={"nope": 1})


def test_jsonable_turns_numpy_and_nan_into_json():
    value = {
        "a": np.float32(1.5),
        "b": np.arange(2),
        "c": [math.nan, math.inf, 1.0],
        3: (np.int64(4),),
    }
    assert experiments._jsonable(value) == {
        "a": 1.5,
        "b": [0, 1],
        "c": [None, None, 1.0],
        "3": [4],
    }


def test_summarize_counts_missing_values_and_ignores_them():
    s = summarize([1.0, 3.0, math.nan, None])
    assert (s["mean"], s["min"], s["max"], s["n_missing"]) == (
        2.0,
        1.0,
        3.0,
        2,
    )
    assert s["std"] == pytest.approx(math.sqrt(2.0))
    assert summarize([2.0])["std"] == 0.0
    empty = summarize([math.nan])
    assert math.isnan(empty["mean"]) and empty["n_missing"] == 1


def test_mnist_split_changes_with_the_seed_and_is_cached_read_only():
    split = mnist(0)
    assert mnist(0) is split and split.x_train.shape == (4000, 28, 28, 1)
    other = mnist(1)
    assert not np.array_equal(split.y_test, other.y_test)
    assert np.bincount(other.y_test).tolist() == [100] * 10  # stratified
    with pytest.raises(ValueError, match="read-only"):
        split.x_train[0, 0, 0, 0] = 1.0


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMPANION_NO_PROGRESS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "companion.experiments", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_command_line_help_lists_the_experiments():
    result = _cli("--help")
    assert result.returncode == 0
    for name in NAMES:
        assert name in result.stdout


def test_command_line_rejects_bad_arguments():
    assert "invalid choice: 'nope'" in _cli("nope").stderr
    message = "--seeds must be >= 2; received 1"
    assert message in _cli(NAMES[0], "--seeds", "1").stderr
    message = "--first-seed must be >= 0; received -1"
    assert message in _cli(NAMES[0], "--first-seed", "-1").stderr


def test_command_line_writes_and_prints_json(tmp_path, monkeypatch, capsys):
    """In-process (fast, counted by coverage), with the tiny config as CI."""
    from companion.experiments import __main__ as cli

    name = "placement"
    module = _module(name)
    tiny = {**module.CONFIG_TEST, "twins": False}
    monkeypatch.setattr(module, "CONFIG_CI", tiny)
    out = tmp_path / "out.json"
    assert (
        cli.main(
            [name, "--seeds", "2", "--first-seed", "7", "--out", str(out)]
        )
        == 0
    )
    written = load_results(out)
    assert written["seeds"] == [7, 8]
    assert written["command"].endswith(f"{name} --seeds 2 --first-seed 7")
    capsys.readouterr()
    assert cli.main([name, "--seeds", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seeds"] == [0, 1] and printed["name"] == name


def _gap_measure(margin: float) -> object:
    from companion.experiments.common import Measure

    claim = stats.Claim(
        key="gap",
        statement="a beats b",
        effect="a minus b",
        unit="points",
        margin=margin,
    )
    return Measure(
        claim, lambda runs: runs["a"]["v"] - runs["b"]["v"], kind="records"
    )


def _gap_runs(effects, twin_shift):
    return [
        {
            "a": {"v": effect},
            "a" + TWIN: {"v": effect + twin_shift},
            "b": {"v": 0.0},
        }
        for effect in effects
    ]


def test_noise_larger_than_the_stated_margin_becomes_the_margin():
    """An effect a one-ulp perturbation can produce is not counted: with
    twins 3 points away, effects of 2.5 (CI [2, 3]) clear the stated
    margin of 1 but not the measured noise of 3."""
    measure = _gap_measure(1.0)
    runs = _gap_runs([2.0, 2.5, 3.0, 2.5, 2.5], twin_shift=3.0)
    (verdict,) = verdicts([measure], runs).values()
    assert verdict["stated_margin"] == 1.0
    assert verdict["definition"] == "a minus b"  # the claim's, not the mean
    assert verdict["margin"] == pytest.approx(3.0)
    assert verdict["outcome"] == "inconclusive"
    quiet = verdicts([measure], _gap_runs([2.0, 2.5, 3.0, 2.5, 2.5], 0.5))
    assert quiet["gap"]["margin"] == 1.0
    assert quiet["gap"]["outcome"] == "supported"
    untwinned = [
        {k: v for k, v in seed.items() if not k.endswith(TWIN)}
        for seed in runs
    ]
    alone = verdicts([measure], untwinned)["gap"]
    assert alone["margin"] == 1.0 and alone["outcome"] == "supported"
    # a measure whose runs have no twins gets no noise, even when other
    # runs of the seed have twins
    from companion.experiments.common import Measure

    untwinned_measure = Measure(
        measure.claim, measure.effect, kind="records", twinned=False
    )
    assert noise([untwinned_measure], runs)["gap"] == {
        "differences": None,
        "rms": None,
    }


def test_rejudge_recomputes_verdicts_and_keeps_the_runs(test_scale, tmp_path):
    from companion.experiments import __main__ as cli

    name = "placement"
    stored = json.loads(json.dumps(test_scale(name)))
    key = next(iter(stored["results"]["verdicts"]))
    stored["results"]["verdicts"][key]["outcome"] = "stale"
    again = experiments.rejudge(stored)
    assert again["results"]["runs"] == stored["results"]["runs"]
    assert again["provenance"] == stored["provenance"]
    assert again["judged"]["commit"] and again["judged"]["date"]
    measures = _module(name).measures(stored["config"])
    expected = verdicts(measures, stored["results"]["runs"])
    assert again["results"]["verdicts"] == expected
    assert expected[key]["outcome"] != "stale"
    path = tmp_path / "stale.json"
    save_results(stored, path)
    assert cli.main([name, "--rejudge", str(path)]) == 0
    assert load_results(path)["results"]["verdicts"] == expected
    assert _cli("gradient_flow", "--rejudge", str(path)).returncode != 0


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "book" / "data").glob("*.json")),
    ids=lambda p: p.name,
)
def test_every_committed_result_says_where_it_came_from(path):
    """Every file the book reads was made from a clean commit, and says
    by which command, with which libraries, on which CPU and when."""
    provenance = json.loads(path.read_text())["provenance"]
    for key in ("command", "commit", "versions", "cpu", "blas", "date"):
        assert provenance[key], key
    # a clean checkout's full hash: no "+dirty"
    assert re.fullmatch("[0-9a-f]{40}", provenance["commit"]), provenance
    assert provenance["versions"]["numpy"]
