"""``companion.experiments``: the measured claims of Part III, as seeded,
rerunnable functions.

Every experiment is a module of this package with

* ``DESCRIPTION`` -- one line: the claim it measures;
* ``CONFIG_TEST`` / ``CONFIG_CI`` / ``CONFIG_FULL`` -- dicts of settings: a
  tiny scale for the unit tests, the scale a chapter runs in CI (seconds),
  and the full scale (minutes, outside CI);
* ``measures(config)`` -- its claims (:class:`companion.stats.Claim`, with
  margins fixed before any run) and how a seed's runs give each effect
  (:class:`~companion.experiments.common.Measure`);
* ``EXPECTED_CI`` -- the verdict the book states for each claim at CI
  scale: the chapter asserts it for its seeds (:func:`book_seeds`) and
  ``make robustness`` for as many seeds the book never uses
  (:func:`robustness_seeds`);
* ``CI_SEEDS`` (optional, default 5) -- how many seeds the chapter's CI
  run needs for stable verdicts (the module says why when it is more);
* ``run(config, seeds) -> dict`` -- plain, JSON-serializable results with
  ``runs`` (per seed, ``{run name: record}``) and ``verdicts``.

:func:`run_experiment` adds what produced the numbers (name, scale, config,
seeds, provenance, wall time); the command line ``python -m
companion.experiments NAME [--full] [--seeds N] [--first-seed K] [--out
FILE]`` writes them to JSON.  Full-scale results are committed under
``book/data/`` and plotted by the chapters next to their CI-scale runs.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from companion._validation import check_int, describe
from companion.provenance import provenance

__all__ = [
    "BOOK_SEEDS",
    "ROBUSTNESS_SEEDS",
    "available",
    "book_seeds",
    "load_results",
    "outcomes",
    "rejudge",
    "robustness_seeds",
    "run_experiment",
    "save_results",
]

_NOT_EXPERIMENTS = {"__main__", "common", "report"}

BOOK_SEEDS = list(range(5))
"""The seeds of every full-scale file, and of the CI runs by default."""
ROBUSTNESS_SEEDS = list(range(1000, 1005))
"""Seeds the book never uses: ``make robustness`` checks the verdicts
with them (more of them for an experiment with more CI seeds)."""


def available() -> dict[str, str]:
    """Experiment names and their one-line descriptions."""
    names = sorted(
        info.name
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_") and info.name not in _NOT_EXPERIMENTS
    )
    return {name: _module(name).DESCRIPTION for name in names}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def book_seeds(name: str) -> list[int]:
    """The seeds of experiment ``name``'s CI run in its chapter: 0, 1, ..."""
    return list(range(getattr(_module(name), "CI_SEEDS", len(BOOK_SEEDS))))


def robustness_seeds(name: str) -> list[int]:
    """As many seeds as :func:`book_seeds`, from 1000 on: never in the book."""
    count = len(book_seeds(name))
    return list(range(ROBUSTNESS_SEEDS[0], ROBUSTNESS_SEEDS[0] + count))


def run_experiment(
    name: str,
    *,
    full: bool = False,
    seeds: int | Sequence[int] = 5,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run experiment ``name`` at CI scale (or ``full`` scale) for ``seeds``.

    Parameters
    ----------
    config : dict, optional
        Settings that replace entries of the scale's config (e.g. the unit
        tests run ``CONFIG_TEST``).
    seeds : int or sequence of int
        ``5`` means seeds 0 to 4 (:data:`BOOK_SEEDS`).

    Returns
    -------
    dict
        ``name``, ``description``, ``scale``, ``config``, ``seeds``,
        ``command``, ``provenance`` (:func:`companion.provenance.provenance`),
        ``wall_time_s`` and the experiment's own ``results``.
    """
    names = available()
    if name not in names:
        raise ValueError(
            f"name must be one of {sorted(names)}; received {describe(name)}"
        )
    if isinstance(seeds, bool) or not isinstance(seeds, Sequence):
        seed_list = list(range(check_int(seeds, "seeds", low=1)))
    else:
        seed_list = [check_int(s, "seeds[i]", low=0) for s in seeds]
        if not seed_list or len(set(seed_list)) != len(seed_list):
            raise ValueError(
                "seeds must be a non-empty list of distinct ints; received "
                f"{describe(seeds)}"
            )
    module = _module(name)
    base = module.CONFIG_FULL if full else module.CONFIG_CI
    unknown = set(config or {}) - set(base)
    if unknown:
        raise ValueError(
            f"config has keys {sorted(unknown)} that {name} does not know; "
            f"expected a subset of {sorted(base)}"
        )
    config = {**base, **(config or {})}
    command = f"python -m companion.experiments {name}"
    command += " --full" if full else ""
    command += f" --seeds {len(seed_list)}"
    if seed_list != list(range(len(seed_list))):
        command += f" --first-seed {seed_list[0]}"
    origin = provenance(command)  # the code as it is when the run starts
    start = time.perf_counter()
    results = module.run(config, seed_list)
    return {
        "name": name,
        "description": module.DESCRIPTION,
        "scale": "full" if full else "ci",
        "config": config,
        "seeds": seed_list,
        "command": command,
        "provenance": origin,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "results": results,
    }


def outcomes(result: dict[str, Any]) -> dict[str, str]:
    """``{claim key: outcome}`` of a :func:`run_experiment` result."""
    return {
        key: verdict["outcome"]
        for key, verdict in result["results"]["verdicts"].items()
    }


def rejudge(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with its verdicts and noise computed again from its runs.

    The runs, the configuration and the provenance of the training stay
    as they were; the claims are those of the current code, and
    ``judged`` records its commit and the date.  This is how a results
    file follows a change of the rule that judges it (not of the runs).
    """
    from companion.experiments.common import noise, verdicts

    module = _module(result["name"])
    measures = module.measures(result["config"])
    runs = result["results"]["runs"]
    twins = result["config"].get("twins", False)
    results = {
        **result["results"],
        "verdicts": verdicts(measures, runs),
        "noise": noise(measures, runs) if twins else None,
    }
    judged = provenance(f"rejudge {result['name']}")
    return {
        **result,
        "results": results,
        "judged": {"commit": judged["commit"], "date": judged["date"]},
    }


def save_results(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a :func:`run_experiment` result as indented JSON (NaN written as
    null).
    """
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_jsonable(result), handle, indent=1, allow_nan=False)
        handle.write("\n")


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file written by :func:`save_results` (null becomes None)."""
    with open(path, encoding="utf-8") as handle:
        result: dict[str, Any] = json.load(handle)
    return result


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays to Python, NaN/inf to None, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, float) and (
        value != value or value in (float("inf"), float("-inf"))
    ):
        return None
    return value
