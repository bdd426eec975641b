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
