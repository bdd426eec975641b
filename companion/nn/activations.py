r"""Element-wise nonlinearities: ``ReLU`` and ``Sigmoid``.

``ReLU``: :math:`y = \max(x, 0)`, :math:`dx = dy \cdot [x > 0]` (0 at
x = 0, as TensorFlow); a NaN input gives a NaN output, so a diverged run
stays visible behind a ReLU.  ``Sigmoid``: :math:`y = 1/(1 + e^{-x})`,
:math:`dx = dy \cdot y (1 - y)`; it saturates for large ``|x|``, which
chapter 12 measures.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from companion.base import Layer

__all__ = ["ReLU", "Sigmoid"]


class _ActivationCache(NamedTuple):
    local_gradient: np.ndarray
    """dy/dx element-wise, the shape of the output."""
    output_shape: tuple[int, ...]


class ReLU(Layer):
    """Rectified linear unit, element-wise; NaN in, NaN out.

    >>> ReLU()(np.array([[-1.0, 0.0, 2.0, np.nan]]))
    array([[ 0.,  0.,  2., nan]])
    """

    def __repr__(self) -> str:
        return "ReLU()"

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, _ActivationCache]:
        # np.maximum propagates NaN (np.where(x > 0, x, 0) would give 0).
        y = np.maximum(x, x.dtype.type(0)).astype(x.dtype, copy=False)
        positive = x > 0  # f'(x) as a mask: dy * mask multiplies by 1 or 0
        return y, _ActivationCache(positive, x.shape)

    def _backward(
        self, dy: np.ndarray, cache: _ActivationCache
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return dy * cache.local_gradient, {}


class Sigmoid(Layer):
    """Logistic sigmoid, element-wise, without overflow for large ``|x|``.

    >>> Sigmoid()(np.array([[-1000.0, 0.0, 1000.0]]))
    array([[0. , 0.5, 1. ]])
    """

    def __repr__(self) -> str:
        return "Sigmoid()"

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, _ActivationCache]:
        e = np.exp(-np.abs(x))  # never overflows
        y = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        y = y.astype(x.dtype, copy=False)
        return y, _ActivationCache(y * (1.0 - y), x.shape)

    def _backward(
        self, dy: np.ndarray, cache: _ActivationCache
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return dy * cache.local_gradient, {}
