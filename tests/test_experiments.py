"""companion.experiments: the protocol every experiment follows, the runner and the command line.

Each experiment's own behaviour is tested in tests/test_experiment_<name>.py;
here every discovered experiment is run at its tiny CONFIG_TEST scale.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from companion import experiments
from companion.experiments import _module, available, load_results, run_experiment, save_results
from companion.experiments.common import mnist, summarize

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(available())
VERDICTS = {"supported", "not supported at this scale", "mixed", "contradicted"}


def test_the_book_has_its_six_experiments():
    assert set(NAMES) >= {"gradient_flow", "learning_rates", "initialization"}, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_experiment_module_follows_the_protocol(name):
    module = _module(name)
    assert isinstance(module.DESCRIPTION, str) and module.DESCRIPTION
    for config in (module.CONFIG_TEST, module.CONFIG_CI, module.CONFIG_FULL):
        assert isinstance(config, dict) and set(config) == set(module.CONFIG_CI)
    assert "Chapter" in module.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_experiment_runs_deterministically_and_serializes(name, tmp_path):
    test_config = _module(name).CONFIG_TEST
    first = run_experiment(name, config=test_config, seeds=2)
    second = run_experiment(name, config=test_config, seeds=[0, 1])
    assert first["results"] == second["results"] or _equal_with_nan(first["results"], second["results"])
    assert first["scale"] == "ci" and first["seeds"] == [0, 1] and first["config"] == {**_module(name).CONFIG_CI, **test_config}
    headline = first["results"]["headline"]
    assert headline["verdict"] in VERDICTS
    for key in ("claim", "metric", "effect_definition", "verdict_rule"):
        assert isinstance(headline[key], str) and headline[key]
    for side in ("with_bn", "without_bn"):
        assert len(headline[side]["values"]) == 2
    path = tmp_path / f"{name}.json"
    save_results(first, path)
    assert load_results(path)["results"]["headline"]["verdict"] == headline["verdict"]


def _equal_with_nan(a, b):
    return json.dumps(experiments._jsonable(a)) == json.dumps(experiments._jsonable(b))


@pytest.mark.parametrize("name", NAMES)
def test_committed_full_scale_results_exist_and_match_the_command(name):
    path = ROOT / "book" / "data" / f"{name}.json"
    result = load_results(path)
    assert result["name"] == name and result["scale"] == "full"
    assert result["config"] == _module(name).CONFIG_FULL
    assert result["command"] == f"python -m companion.experiments {name} --full --seeds {len(result['seeds'])}"
    assert len(result["seeds"]) >= 3 and result["wall_time_s"] > 0


def test_runner_rejects_unknown_names_and_seed_counts():
    with pytest.raises(ValueError, match=r"name must be one of \[.*\]; received 'nope'"):
        run_experiment("nope")
    with pytest.raises(ValueError, match=r"seeds must be >= 1; received 0"):
        run_experiment(NAMES[0], seeds=0)


def test_jsonable_turns_numpy_and_nan_into_json():
    import numpy as np

    value = {"a": np.float32(1.5), "b": np.arange(2), "c": [math.nan, math.inf, 1.0], 3: (np.int64(4),)}
    assert experiments._jsonable(value) == {"a": 1.5, "b": [0, 1], "c": [None, None, 1.0], "3": [4]}


def test_summarize_counts_nans_and_ignores_them():
    s = summarize([1.0, 3.0, math.nan])
    assert (s["mean"], s["min"], s["max"], s["n_nan"]) == (2.0, 1.0, 3.0, 1)
    assert s["std"] == pytest.approx(math.sqrt(2.0))
    assert summarize([2.0])["std"] == 0.0
    empty = summarize([math.nan])
    assert math.isnan(empty["mean"]) and empty["n_nan"] == 1


def test_mnist_is_cached_and_read_only():
    split = mnist()
    assert mnist() is split and split.x_train.shape == (4000, 28, 28, 1)
    with pytest.raises(ValueError, match="read-only"):
        split.x_train[0, 0, 0, 0] = 1.0


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMPANION_NO_PROGRESS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "companion.experiments", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_command_line_help_lists_the_experiments():
    result = _cli("--help")
    assert result.returncode == 0
    for name in NAMES:
        assert name in result.stdout


def test_command_line_rejects_bad_arguments():
    assert "invalid choice: 'nope'" in _cli("nope").stderr
    assert "--seeds must be >= 1; received 0" in _cli(NAMES[0], "--seeds", "0").stderr


def test_command_line_writes_and_prints_json(tmp_path, monkeypatch):
    """In-process (fast, counted by coverage), with the tiny config patched in as CI scale."""
    from companion.experiments import __main__ as cli

    name = NAMES[0]
    module = _module(name)
    monkeypatch.setattr(module, "CONFIG_CI", {**module.CONFIG_CI, **module.CONFIG_TEST})
    out = tmp_path / "out.json"
    assert cli.main([name, "--seeds", "1", "--out", str(out)]) == 0
    written = load_results(out)
    assert written["seeds"] == [0] and written["command"].endswith(f"{name} --seeds 1")
    assert cli.main([name, "--seeds", "1"]) == 0



def test_paired_margin_verdict():
    from companion.experiments.common import paired_margin_verdict

    assert paired_margin_verdict([0.03, 0.02], 0.02) == "supported"
    assert paired_margin_verdict([-0.05, -0.02], 0.02) == "contradicted"
    assert paired_margin_verdict([0.01, -0.01], 0.02) == "not supported at this scale"
    assert paired_margin_verdict([0.05, 0.0], 0.02) == "mixed"
