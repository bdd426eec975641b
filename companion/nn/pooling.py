"""``MaxPool2D``: max-pooling over NHWC windows.

The gradient of each window goes to the position of its maximum.

Chapter 5 builds the source text's conv -> BN -> ReLU -> pool block from it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from companion._validation import check_int
from companion.base import Layer

__all__ = ["MaxPool2D"]


class _PoolCache(NamedTuple):
    input_shape: tuple[int, ...]
    argmax: np.ndarray
    """(N, H', W', C): flat index (i * pw + j) of each window's maximum."""
    output_shape: tuple[int, ...]


class MaxPool2D(Layer):
    r"""Max-pooling with Keras's ``padding="valid"`` semantics.

    .. math::

        y_{n,h,w,c} = \max_{i < p_h,\ j < p_w} x_{n,\, s h + i,\, s w + j,\, c}

    Output size :math:`\lfloor (H - p_h) / s \rfloor + 1`: as in Keras, rows
    and columns that do not fill a whole window at the bottom/right are
    dropped (a 7 x 7 map pools to 3 x 3 with a 2 x 2 pool and stride 2).  The
    backward pass sends each output's gradient to the position of its
    window's maximum (the first one, in row-major order, on ties).

    Parameters
    ----------
    pool_size : int
        Square window p_h = p_w.
    strides : int or None
        Defaults to ``pool_size`` (non-overlapping windows).
    """

    def __init__(self, pool_size: int = 2, strides: int | None = None) -> None:
        super().__init__()
        self.pool_size = check_int(pool_size, "pool_size", low=1)
        self.strides = (
            self.pool_size
            if strides is None
            else check_int(strides, "strides", low=1)
        )

    def __repr__(self) -> str:
        return f"MaxPool2D(pool_size={self.pool_size}, strides={self.strides})"

    def _check_input(self, x: np.ndarray, training: bool = False) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"x must be an NHWC batch of rank 4; received shape {x.shape}"
            )
        if min(x.shape[1], x.shape[2]) < self.pool_size:
            raise ValueError(
                f"x of height x width {x.shape[1]} x {x.shape[2]} is smaller "
                f"than the {self.pool_size} x {self.pool_size} pooling window"
            )

    def _windows(self, x: np.ndarray) -> np.ndarray:
        """(N, H', W', C, p*p) view of the strided windows."""
        p, s = self.pool_size, self.strides
        windows = sliding_window_view(x, (p, p), axis=(1, 2))[:, ::s, ::s]
        return windows.reshape(*windows.shape[:4], p * p)

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, _PoolCache]:
        windows = self._windows(x)
        argmax = windows.argmax(axis=-1)
        y = np.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]
        return y, _PoolCache(
            input_shape=x.shape, argmax=argmax, output_shape=y.shape
        )

    def _backward(
        self, dy: np.ndarray, cache: _PoolCache
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        p, s = self.pool_size, self.strides
        n, h, w, c = dy.shape
        # Input coordinates of every window's maximum, each (N, H', W', C).
        rows = np.arange(h).reshape(1, h, 1, 1) * s + cache.argmax // p
        cols = np.arange(w).reshape(1, 1, w, 1) * s + cache.argmax % p
        index = (np.arange(n).reshape(n, 1, 1, 1), rows, cols, np.arange(c))
        dx = np.zeros(cache.input_shape, dtype=dy.dtype)
        if s >= p:
            # Disjoint windows: every input position receives at most once.
            dx[index] = dy
        else:
            np.add.at(dx, index, dy)  # overlapping windows can share a max
        return dx, {}
