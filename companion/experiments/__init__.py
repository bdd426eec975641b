"""``companion.experiments``: the measured claims of Part III, as seeded, rerunnable functions.

Every experiment is a module of this package with

* ``DESCRIPTION`` -- one line: the claim it measures;
* ``CONFIG_TEST`` / ``CONFIG_CI`` / ``CONFIG_FULL`` -- dicts of settings: a
  tiny scale for the unit tests, the scale a chapter runs in CI (seconds),
  and the full scale (minutes, outside CI);
* ``run(config, seeds) -> dict`` -- plain, JSON-serializable results.

:func:`run_experiment` adds what produced the numbers (name, scale, config,
seeds, wall time); the command line ``python -m companion.experiments NAME
[--full] [--seeds N] [--out FILE]`` writes them to JSON.  Full-scale results
are committed under ``book/data/`` and plotted by the chapters next to their
CI-scale runs.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import time
from types import ModuleType
from typing import Any, Sequence

from companion._validation import describe

__all__ = ["available", "load_results", "run_experiment", "save_results"]

_NOT_EXPERIMENTS = {"__main__", "common"}


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


def run_experiment(
    name: str, *, full: bool = False, seeds: int | Sequence[int] = 3, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run experiment ``name`` at CI scale (or ``full`` scale) for the given seeds.

    Parameters
    ----------
    config : dict, optional
        Settings that replace entries of the scale's config (e.g. the unit
        tests run ``CONFIG_TEST``).
    seeds : int or sequence of int
        ``3`` means seeds 0, 1, 2.

    Returns
    -------
    dict
        ``name``, ``scale``, ``config``, ``seeds``, ``wall_time_s`` and the
        experiment's own ``results``.
    """
    names = available()
    if name not in names:
        raise ValueError(f"name must be one of {sorted(names)}; received {describe(name)}")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1; received {seeds}")
        seed_list = list(range(seeds))
    else:
        seed_list = [int(s) for s in seeds]
    module = _module(name)
    config = {**(module.CONFIG_FULL if full else module.CONFIG_CI), **(config or {})}
    start = time.perf_counter()
    results = module.run(config, seed_list)
    return {
        "name": name,
        "description": module.DESCRIPTION,
        "scale": "full" if full else "ci",
        "config": config,
        "seeds": seed_list,
        "command": f"python -m companion.experiments {name}{' --full' if full else ''} --seeds {len(seed_list)}",
        "wall_time_s": round(time.perf_counter() - start, 1),
        "results": results,
    }


def save_results(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a :func:`run_experiment` result as indented JSON (NaN written as null)."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_jsonable(result), handle, indent=1, allow_nan=False)
        handle.write("\n")


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file written by :func:`save_results` (null comes back as None)."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays to Python, NaN/inf to None, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value
