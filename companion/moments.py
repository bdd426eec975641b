r"""Merging per-device statistics into the statistics of the whole batch.

Synchronized batch norm (chapter 17) splits a batch across K devices
(replicas); each computes the statistics of its share, and the devices
exchange them so that every device normalizes with the statistics of the
whole batch.  Two ways to merge, for replica k with :math:`n_k` values:

* **Chan et al. (1979)**, from each replica's count, mean and sum of
  squared deviations :math:`M_{2,k} = \sum_{i \in k} (x_i - \bar x_k)^2`.
  Two parts a and b combine as

  .. math::

      n = n_a + n_b, \quad \delta = \bar x_b - \bar x_a, \quad
      \bar x = \bar x_a + \delta \frac{n_b}{n}, \quad
      M_2 = M_{2,a} + M_{2,b} + \delta^2 \frac{n_a n_b}{n},

  applied pairwise up a tree (:func:`merge_moments`).  Every term is a
  deviation from a mean: nothing large is subtracted from anything large.
* **Power sums**, what Keras's ``synchronized=True`` exchanges: the sums
  :math:`\sum x` and :math:`\sum x^2`, then
  :math:`\sigma^2 = \mathrm{E}[x^2] - \mathrm{E}[x]^2` (clamped at 0)
  (:func:`merge_power_sums`).  One all-reduce of two sums, but when the
  mean is large compared with the spread the two terms agree in most of
  their digits and the difference keeps few of them (chapter 2 shows the
  same cancellation within one device).

Both return the biased variance :math:`M_2 / n`, the one batch norm
normalizes with.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from companion._reduce import channel_mean, channel_sum
from companion._validation import (
    as_float_array,
    channel_axis,
    check_rank,
    compute_dtype,
    describe,
)

__all__ = ["merge_moments", "merge_power_sums", "moments", "power_sums"]


def moments(
    x: np.ndarray, axis: int = -1
) -> tuple[int, np.ndarray, np.ndarray]:
    r"""One replica's (count, mean, M2) per channel, over all axes but
    ``axis``.

    :math:`M_2 = \sum_i (x_i - \bar x)^2` by two passes (center, then
    square), sums accumulated in float64 and rounded to the compute dtype.

    >>> moments(np.array([[1.0], [3.0]]))
    (2, array([2.]), array([2.]))
    """
    x_a = _check_x(x)
    kept = channel_axis(axis, x_a.ndim)
    axes = tuple(i for i in range(x_a.ndim) if i != kept)
    work = x_a.astype(compute_dtype(x_a.dtype), copy=False)
    mean = channel_mean(work, axes)
    m2 = channel_sum(np.square(work - mean), axes)
    return int(x_a.size // x_a.shape[kept]), mean.reshape(-1), m2.reshape(-1)


def power_sums(
    x: np.ndarray, axis: int = -1
) -> tuple[int, np.ndarray, np.ndarray]:
    r"""One replica's (count, :math:`\sum x`, :math:`\sum x^2`) per channel.

    Summed in the compute dtype (float32 for float32 input), as a device
    does before the all-reduce.

    >>> power_sums(np.array([[1.0], [3.0]]))
    (2, array([4.]), array([10.]))
    """
    x_a = _check_x(x)
    kept = channel_axis(axis, x_a.ndim)
    axes = tuple(i for i in range(x_a.ndim) if i != kept)
    work = x_a.astype(compute_dtype(x_a.dtype), copy=False)
    return (
        int(x_a.size // x_a.shape[kept]),
        work.sum(axis=axes),
        np.square(work).sum(axis=axes),
    )


def _check_x(x: Any) -> np.ndarray:
    x_a = as_float_array(x, "x")
    check_rank(x_a)
    if x_a.size == 0:
        raise ValueError(f"x of shape {x_a.shape} is empty")
    return x_a


def _check_counts(counts: Any) -> list[int]:
    if isinstance(counts, (str, bytes)) or not isinstance(
        counts, (Sequence, np.ndarray)
    ):
        raise TypeError(
            "counts must be a sequence of ints, one per replica; received "
            f"{describe(counts)}"
        )
    values = list(np.asarray(counts).reshape(-1)) if len(counts) else []
    out = []
    for i, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, numbers.Integral
        ):
            raise TypeError(
                f"counts[{i}] must be an int; received {describe(value)}"
            )
        if value < 0:
            raise ValueError(f"counts[{i}] must be >= 0; received {value}")
        out.append(int(value))
    if not out:
        raise ValueError("counts must hold at least one replica; received []")
    if sum(out) == 0:
        raise ValueError(
            f"counts must add up to at least 1 value; received {out}"
        )
    return out


def _check_per_replica(values: Any, name: str, replicas: int) -> np.ndarray:
    array = as_float_array(values, name)
    if array.ndim not in (1, 2) or array.shape[0] != replicas:
        raise ValueError(
            f"{name} must have shape ({replicas},) or ({replicas}, C), one "
            f"row per replica as counts; received shape {array.shape}"
        )
    return array.astype(compute_dtype(array.dtype), copy=False)


def merge_moments(
    counts: Sequence[int],
    means: np.ndarray,
    m2s: np.ndarray,
) -> tuple[int, np.ndarray, np.ndarray]:
    r"""Merge per-replica (count, mean, M2) into the whole batch's statistics.

    Chan, Golub and LeVeque's pairwise update (see the module docstring),
    applied up a balanced tree: replicas 0 and 1, 2 and 3, ... then the
    pairs of pairs.  A replica with count 0 contributes nothing (its mean
    and M2 are ignored).  Computed in the dtype of ``means`` (float32
    stays float32).  Derived in chapter 17.

    Parameters
    ----------
    counts : sequence of K ints >= 0
        Values per channel on each replica; at least one > 0.
    means, m2s : arrays of shape (K,) or (K, C)
        Each replica's mean and sum of squared deviations from it.

    Returns
    -------
    count : int
        The total number of values per channel.
    mean, var : ndarrays of shape () or (C,)
        The mean and the biased variance :math:`M_2 / n` of the whole
        batch.

    Raises
    ------
    TypeError, ValueError
        Counts that are not ints >= 0 or add up to 0, arrays whose first
        axis is not one row per replica, shapes that differ, or a negative
        M2.

    Examples
    --------
    The batch [1, 3 | 10, 30] in two replicas:

    >>> merge_moments([2, 2], np.array([2.0, 20.0]), np.array([2.0, 200.0]))
    (4, array(11.), array(131.5))
    """
    n = _check_counts(counts)
    mean_a = _check_per_replica(means, "means", len(n))
    m2_a = _check_per_replica(m2s, "m2s", len(n))
    if mean_a.shape != m2_a.shape:
        raise ValueError(
            f"means and m2s must have one shape; received {mean_a.shape} "
            f"and {m2_a.shape}"
        )
    if np.any(m2_a < 0):
        raise ValueError(
            "m2s must be >= 0 (sums of squared deviations); received "
            f"minimum {float(m2_a.min())!r}"
        )
    dtype = np.result_type(mean_a.dtype, m2_a.dtype)
    parts = [
        (k, mean_a[i].astype(dtype), m2_a[i].astype(dtype))
        for i, k in enumerate(n)
        if k > 0
    ]
    while len(parts) > 1:
        merged = []
        for j in range(0, len(parts) - 1, 2):
            (na, ma, sa), (nb, mb, sb) = parts[j], parts[j + 1]
            total = na + nb
            delta = mb - ma
            mean = ma + delta * dtype.type(nb / total)
            m2 = sa + sb + np.square(delta) * dtype.type(na * nb / total)
            merged.append((total, mean, m2))
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    total, mean, m2 = parts[0]
    return total, np.asarray(mean), np.asarray(m2 / dtype.type(total))


def merge_power_sums(
    counts: Sequence[int],
    sums: np.ndarray,
    sums_of_squares: np.ndarray,
) -> tuple[int, np.ndarray, np.ndarray]:
    r"""The whole batch's statistics from per-replica power sums (Keras's way).

    .. math::

        n = \sum_k n_k, \quad \bar x = \frac{1}{n}\sum_k S_k, \quad
        \sigma^2 = \max\Bigl(0,\; \frac{1}{n}\sum_k Q_k - \bar x^2\Bigr),

    with :math:`S_k = \sum_{i \in k} x_i`, :math:`Q_k = \sum_{i \in k}
    x_i^2`: what ``keras.layers.BatchNormalization(synchronized=True)``
    all-reduces on TensorFlow.  Computed in the dtype of ``sums``.  Exact
    in exact arithmetic; in floating point the subtraction cancels when
    :math:`|\bar x| \gg \sigma` (chapter 17 measures it).

    Parameters and returns as :func:`merge_moments`, with ``sums`` and
    ``sums_of_squares`` for the means and M2s.

    Examples
    --------
    >>> merge_power_sums([2, 2], np.array([4.0, 40.0]),
    ...                  np.array([10.0, 1000.0]))
    (4, array(11.), array(131.5))
    """
    n = _check_counts(counts)
    s = _check_per_replica(sums, "sums", len(n))
    q = _check_per_replica(sums_of_squares, "sums_of_squares", len(n))
    if s.shape != q.shape:
        raise ValueError(
            f"sums and sums_of_squares must have one shape; received "
            f"{s.shape} and {q.shape}"
        )
    dtype = np.result_type(s.dtype, q.dtype)
    total = sum(n)
    count = dtype.type(total)
    mean = s.astype(dtype).sum(axis=0) / count
    mean_square = q.astype(dtype).sum(axis=0) / count
    var = np.maximum(mean_square - np.square(mean), dtype.type(0))
    return total, np.asarray(mean), np.asarray(var)
