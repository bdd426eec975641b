r"""Standardize over a set of axes, and the gradient through it.

Every normalization of the book is one computation with a different set of
axes: subtract the mean of a set :math:`S` of :math:`m` values, divide by
their standard deviation,

.. math::

    \mu = \frac{1}{m}\sum_{i \in S} x_i, \qquad
    \sigma^2 = \frac{1}{m}\sum_{i \in S} (x_i - \mu)^2, \qquad
    \hat x_i = \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}},

and, given :math:`g_i = \partial L / \partial \hat x_i`, the gradient that
flows back through the mean and the variance of :math:`S`,

.. math::

    \frac{\partial L}{\partial x_i} = \frac{1}{\sqrt{\sigma^2+\epsilon}}
    \Bigl(g_i - \frac{1}{m}\sum_{j \in S} g_j
          - \hat x_i \,\frac{1}{m}\sum_{j \in S} g_j \hat x_j\Bigr).

Batch norm takes :math:`S` over the batch (chapters 2 and 3; its own code
is in :mod:`companion.functional`), ghost batch norm over a slice of the
batch, layer norm and group norm within one example (chapter 16, which
derives the gradient for any :math:`S`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from companion._reduce import channel_mean

__all__ = ["Standardized", "standardize", "standardize_backward"]


class Standardized(NamedTuple):
    """The result of :func:`standardize` (statistics with ``keepdims``)."""

    x_hat: np.ndarray
    """(x - mean) / sqrt(var + epsilon)."""
    inv_std: np.ndarray
    """1 / sqrt(var + epsilon)."""
    mean: np.ndarray
    var: np.ndarray
    """The biased (1/m) variance."""


def standardize(
    x: np.ndarray, axes: tuple[int, ...], epsilon: float
) -> Standardized:
    """Standardize ``x`` over ``axes`` (two-pass variance, float64 sums).

    ``x`` is already in its compute dtype; everything is returned in it.
    """
    mean = channel_mean(x, axes)
    centered = x - mean
    var = channel_mean(np.square(centered), axes)
    inv_std = 1.0 / np.sqrt(var + x.dtype.type(epsilon))
    return Standardized(centered * inv_std, inv_std, mean, var)


def standardize_backward(
    g: np.ndarray,
    x_hat: np.ndarray,
    inv_std: np.ndarray,
    axes: tuple[int, ...],
) -> np.ndarray:
    """dL/dx from ``g`` = dL/dx_hat, through the statistics over ``axes``."""
    dx: np.ndarray = inv_std * (
        g - channel_mean(g, axes) - x_hat * channel_mean(g * x_hat, axes)
    )
    return dx
