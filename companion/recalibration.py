r"""Recalibrating batch norm statistics: the paper's Algorithm 2.

After training, Ioffe and Szegedy (2015, Algorithm 2, steps 8-10) replace
every batch norm layer's statistics by *population* statistics, averaged
over training mini-batches :math:`B` of :math:`m` values per channel
processed by the trained network:

.. math::

    \mathrm{E}[x] = \mathrm{E}_B[\mu_B], \qquad
    \mathrm{Var}[x] = \frac{m}{m-1}\,\mathrm{E}_B[\sigma_B^2],

with the biased batch variance :math:`\sigma_B^2` and Bessel's correction
:math:`m/(m-1)` (chapter 4 derives both).  Moving averages approximate
these statistics during training; when they lag -- a momentum too high
for a short run, weights that changed after the averages were taken --
one pass of :func:`recalibrate` over training data replaces them
(chapter 15 measures it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from companion._validation import as_float_array, describe
from companion.base import Layer
from companion.layers import BatchNorm, keep_moving_statistics
from companion.nn.sequential import Sequential

__all__ = ["PopulationStatistics", "recalibrate"]


class PopulationStatistics(NamedTuple):
    """What :func:`recalibrate` assigned to one BatchNorm layer."""

    mean: np.ndarray
    """:math:`\\mathrm{E}_B[\\mu_B]`, shape (C,), float64."""
    variance: np.ndarray
    """:math:`\\frac{m}{m-1}\\mathrm{E}_B[\\sigma_B^2]`, (C,), float64."""
    m: int
    """The number of values per channel in each batch."""
    batches: int
    """How many batches were averaged."""


class _Sums:
    """Running sums of one layer's batch means and biased variances."""

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.variance: np.ndarray | None = None
        self.count: int | None = None
        self.batches = 0

    def add(self, x: np.ndarray, axis: int, where: str) -> None:
        kept = axis % x.ndim
        axes = tuple(i for i in range(x.ndim) if i != kept)
        count = int(x.size // x.shape[kept])
        if count < 2:
            raise ValueError(
                f"batch #{self.batches} gives {where} m = {count} value per "
                "channel; the unbiased variance needs m >= 2 (use larger "
                "batches)"
            )
        if self.count is None:
            self.count = count
        elif count != self.count:
            raise ValueError(
                f"every batch must give {where} the same number m of values "
                f"per channel (Algorithm 2 averages batches of one size m); "
                f"batch #{self.batches} gives {count}, the first gave "
                f"{self.count} (drop the last, smaller batch)"
            )
        mean = x.mean(axis=axes, dtype=np.float64)
        variance = x.var(axis=axes, dtype=np.float64)  # biased
        if self.mean is None or self.variance is None:
            self.mean, self.variance = mean, variance
        else:
            self.mean += mean
            self.variance += variance
        self.batches += 1


def _check_chain(model: Any) -> None:
    """The model must be layers chained by (nested) Sequential models."""
    if isinstance(model, Sequential):
        for layer in model.layers:
            _check_chain(layer)
    elif not isinstance(model, Layer):
        raise TypeError(
            "model must be a companion Sequential (nested ones included) or "
            f"a companion layer; received {describe(model)}"
        )
    elif hasattr(model, "layers"):
        raise TypeError(
            f"model contains {type(model).__name__}, a composite layer that "
            "is not a Sequential; recalibrate() runs Sequential chains only"
        )


def _leaves(model: Any) -> list[Layer]:
    if isinstance(model, Sequential):
        return [leaf for layer in model.layers for leaf in _leaves(layer)]
    return [model]


def _batch_input(batch: Any, index: int) -> np.ndarray:
    """x from a batch given as x or as an (x, y) tuple."""
    if isinstance(batch, tuple):
        if len(batch) != 2:
            raise ValueError(
                f"batches[{index}] is a tuple of {len(batch)} items; "
                "expected an array x or a pair (x, y)"
            )
        batch = batch[0]
    return as_float_array(batch, f"batches[{index}]")


def recalibrate(
    model: Any, batches: Iterable[Any]
) -> list[PopulationStatistics]:
    r"""Set every BatchNorm's moving statistics to population statistics.

    The paper's Algorithm 2 (module docstring): the batches go through
    ``model`` in training mode -- every BatchNorm normalizes with its
    batch's statistics, as in the trained network
    :math:`N_{\mathrm{BN}}^{\mathrm{tr}}` -- and each BatchNorm's input
    gives, per batch, :math:`\mu_B` and the biased :math:`\sigma_B^2`
    (accumulated in float64).  Then ``moving_mean`` becomes
    :math:`\mathrm{E}_B[\mu_B]` and ``moving_variance``
    :math:`\frac{m}{m-1}\mathrm{E}_B[\sigma_B^2]`.  Nothing else changes:
    not the weights, not ``gamma`` or ``beta``, not the momentum.

    Parameters
    ----------
    model : companion Sequential or layer
        With at least one built :class:`~companion.layers.BatchNorm`.
        Nested ``Sequential`` models are followed.
    batches : iterable
        Training mini-batches, each an array ``x`` or a pair ``(x, y)``
        (what :func:`companion.data.batches` yields; use
        ``drop_last=True``): every batch must give each BatchNorm the
        same number :math:`m \ge 2` of values per channel.

    Returns
    -------
    list of PopulationStatistics
        Per BatchNorm layer, in order: the statistics assigned, ``m``
        and the number of batches.

    Raises
    ------
    TypeError, ValueError
        No BatchNorm, an unbuilt one, no batches, batches of different
        sizes, :math:`m < 2`, non-finite statistics, or anything a layer
        refuses.  The model is then unchanged.
    """
    _check_chain(model)
    leaves = _leaves(model)
    norms = [layer for layer in leaves if isinstance(layer, BatchNorm)]
    if not norms:
        raise ValueError(
            "model has no BatchNorm layer: there is nothing to recalibrate"
        )
    for layer in norms:
        if layer.moving_mean is None:
            raise ValueError(
                f"{layer!r} is not built; recalibrate() needs a trained "
                "(built) model"
            )
    sums = {id(layer): _Sums() for layer in norms}
    count = 0
    with keep_moving_statistics(model):  # the training-mode calls' updates
        for index, batch in enumerate(batches):
            x = _batch_input(batch, index)
            for position, leaf in enumerate(leaves):
                if isinstance(leaf, BatchNorm):
                    where = f"the BatchNorm at position {position}"
                    sums[id(leaf)].add(x, leaf.axis, where)
                x = leaf(x, training=True)
            count += 1
    if count == 0:
        raise ValueError("batches is empty: Algorithm 2 needs training data")
    results = []
    for layer in norms:
        total = sums[id(layer)]
        assert total.mean is not None and total.variance is not None
        assert total.count is not None
        m = total.count
        mean = total.mean / total.batches
        variance = m / (m - 1) * (total.variance / total.batches)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(variance))):
            raise ValueError(
                f"the population statistics of {layer!r} are not finite "
                "(a batch or the model produced inf or NaN)"
            )
        results.append(PopulationStatistics(mean, variance, m, total.batches))
    for layer, stats in zip(norms, results, strict=True):
        assert layer.moving_mean is not None
        assert layer.moving_variance is not None
        layer.moving_mean[...] = stats.mean
        layer.moving_variance[...] = stats.variance
    return results
