"""Test configuration shared by the unit tests and the nbval notebook runs.

At the repository root so that it is loaded for every pytest run, including
`pytest book/NN_chapter.ipynb` alone: the kernels nbval starts inherit the
environment set here.
"""

from __future__ import annotations

import os

# Set before TensorFlow can be imported, here and in every kernel that nbval
# starts (kernels inherit this process's environment).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("COMPANION_NO_PROGRESS", "1")  # stable notebook outputs
os.environ.setdefault(
    "PYTHONHASHSEED", "0"
)  # kernels: the same set/dict orders as `make execute`
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import pytest
from hypothesis import HealthCheck, settings

# Property tests are derandomized: the same examples on every run, so CI is
# reproducible; run with --hypothesis-profile=explore to search afresh.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# `make test` runs pytest on two workers that take whole modules and whole
# notebooks (--dist loadscope --no-loadscope-reorder), in collection order.
# The longest units go first, so that the workers end together instead of
# one running a five-minute module while the other waits: the robustness
# reruns (one module, ~5 minutes), then the notebooks (~1 minute each),
# then the test modules with long fixtures, then the rest.
LONGEST_FIRST = (
    "tests/test_robustness.py",
    "book/",
    "tests/test_tf_models.py",
    "tests/test_rendered_book.py",
    "tests/test_bench.py",
)


def _rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    for rank, prefix in enumerate(LONGEST_FIRST):
        if path.startswith(prefix):
            return rank
    return len(LONGEST_FIRST)


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    items.sort(key=_rank)  # stable: each module and notebook keeps its order
    # The robustness reruns run code the unit tests cover; tracing it adds
    # ~20 %.  Only while coverage is on: pytest-cov's no_cover marker fails
    # under --no-cov (as `make robustness` runs).
    tracing = config.pluginmanager.hasplugin("_cov") and not getattr(
        config.option, "no_cov", False
    )
    if tracing:
        for item in items:
            if item.get_closest_marker("robustness"):
                item.add_marker(pytest.mark.no_cover)
