"""Interleaved timing: every kernel once per round, medians over rounds.

A busy machine slows whatever runs while it is busy.  Timing kernel A ten
times and then kernel B ten times lets a burst of load land on one of
them; running them in rounds (A B C, B C A, C A B, ...) spreads it over
all, and ratios taken within a round (:func:`paired_ratio`) cancel most of
what remains.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

__all__ = ["Timed", "interleaved", "paired_ratio", "quartiles"]

K = TypeVar("K", bound=Hashable)

Timed = (
    Callable[[], Any]
    | tuple[Callable[[], Any], Callable[[], AbstractContextManager[Any]]]
)
"""A kernel: a callable, or (callable, context factory) when the kernel
runs inside a context (e.g. one BLAS thread) entered outside the timing."""


def _split(
    entry: Timed,
) -> tuple[Callable[[], Any], Callable[[], AbstractContextManager[Any]]]:
    if isinstance(entry, tuple):
        return entry
    return entry, contextlib.nullcontext


def interleaved(
    kernels: Mapping[K, Timed], repeats: int, warmup: int
) -> dict[K, list[float]]:
    """Seconds per call of every kernel, ``repeats`` rounds each.

    Every kernel runs ``warmup`` times first (TensorFlow traces its
    functions on the first call).  In round ``r`` the kernels run in their
    order rotated by ``r``; the garbage collector is off while a kernel
    runs.
    """
    keys = list(kernels)
    parts = {key: _split(kernels[key]) for key in keys}
    for key in keys:
        function, context = parts[key]
        with context():
            for _ in range(warmup):
                function()
    times: dict[K, list[float]] = {key: [] for key in keys}
    for r in range(repeats):
        shift = r % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            function, context = parts[key]
            with context():
                gc.collect()
                gc.disable()
                try:
                    start = time.perf_counter()
                    function()
                    elapsed = time.perf_counter() - start
                finally:
                    gc.enable()
            times[key].append(elapsed)
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile of ``values``."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of a[r] / b[r] (same round, same load)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))
