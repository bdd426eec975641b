"""``make robustness``: the CI-scale verdicts hold for seeds the book never
uses.

Every chapter of Part III asserts the verdicts of its CI-scale run
(``EXPECTED_CI``) for its own seeds.  A verdict that held only for those
seeds would be an accident of the seeds; here every experiment runs again
at CI scale with as many other seeds (1000, 1001, ...) and must reach the
same verdict on every claim.
"""

from __future__ import annotations

import pytest

from companion.experiments import (
    _module,
    outcomes,
    robustness_seeds,
    run_experiment,
)
from companion.experiments.report import CHAPTERS


@pytest.mark.robustness
@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_ci_verdicts_hold_for_seeds_the_book_never_uses(name):
    seeds = robustness_seeds(name)
    assert min(seeds) >= 1000
    result = run_experiment(name, seeds=seeds)
    found = outcomes(result)
    details = {
        key: (v["effect"], v["low"], v["high"], v["margin"])
        for key, v in result["results"]["verdicts"].items()
    }
    assert found == _module(name).EXPECTED_CI, details
