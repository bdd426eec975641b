r"""``Dense`` and ``Flatten``: the fully connected end of the network.

``Dense`` computes :math:`y = x K + b` with ``kernel`` K of shape (in, out),
Keras's layout.  Chapter 5 uses both.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from companion._validation import check_bool, check_int
from companion.base import Layer
from companion.nn.init import glorot_uniform

__all__ = ["Dense", "Flatten"]


class _DenseCache(NamedTuple):
    x: np.ndarray
    output_shape: tuple[int, ...]


class Dense(Layer):
    r"""Fully connected layer :math:`y = x K + b` on (N, in) inputs.

    Backward: :math:`\partial L/\partial K = x^\top\, dy`,
    :math:`\partial L/\partial b = \sum_n dy_n`,
    :math:`\partial L/\partial x = dy\, K^\top`.

    Parameters
    ----------
    units : int
        Output features.
    use_bias : bool
    seed : int >= 0 or None
        Seed of the Glorot-uniform initialization of ``kernel``.

    Examples
    --------
    >>> dense = Dense(2, seed=0)
    >>> dense.build((None, 3))
    >>> dense.set_weights([np.ones((3, 2)), np.array([0.5, -0.5])])
    >>> dense(np.array([[1.0, 2.0, 3.0]]))
    array([[6.5, 5.5]])
    """

    def __init__(
        self, units: int, use_bias: bool = True, seed: int | None = None
    ) -> None:
        super().__init__()
        self.units = check_int(units, "units", low=1)
        self.use_bias = check_bool(use_bias, "use_bias")
        self.seed = None if seed is None else check_int(seed, "seed", low=0)
        self.kernel: np.ndarray | None = None
        self.bias: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"Dense(units={self.units})"

    def weight_names(self) -> list[str]:
        return ["kernel", "bias"] if self.use_bias else ["kernel"]

    def _check_input(self, x: np.ndarray, training: bool = False) -> None:
        if x.ndim != 2:
            raise ValueError(
                "x must have shape (N, features); received shape "
                f"{x.shape} (use Flatten first)"
            )
        if self.kernel is not None and x.shape[1] != self.kernel.shape[0]:
            raise ValueError(
                f"x has {x.shape[1]} features; this Dense was built for "
                f"{self.kernel.shape[0]}"
            )

    def _build(self, input_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.kernel = glorot_uniform(
            (input_shape[1], self.units),
            input_shape[1],
            self.units,
            self.seed,
            dtype,
        )
        self.bias = np.zeros(self.units, dtype) if self.use_bias else None

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, _DenseCache]:
        y = x @ self._array("kernel")
        if self.bias is not None:
            y += self.bias
        return y, _DenseCache(x=x, output_shape=y.shape)

    def _backward(
        self, dy: np.ndarray, cache: _DenseCache
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        kernel = self._array("kernel")  # K, shape (in, out)
        return dy @ kernel.T, self._parameter_gradients(dy, cache)

    def _parameter_gradients(
        self, dy: np.ndarray, cache: _DenseCache
    ) -> dict[str, np.ndarray]:
        grads = {"kernel": cache.x.T @ dy}
        if self.bias is not None:
            grads["bias"] = dy.sum(axis=0)
        return grads


class _FlattenCache(NamedTuple):
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...), in row-major (C) order.

    As ``keras.layers.Flatten``.
    """

    def __repr__(self) -> str:
        return "Flatten()"

    def _check_input(self, x: np.ndarray, training: bool = False) -> None:
        if x.ndim < 2:
            raise ValueError(
                "x must have a batch axis and at least one more; received "
                f"shape {x.shape}"
            )

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, _FlattenCache]:
        y = x.reshape(x.shape[0], -1)
        return y, _FlattenCache(input_shape=x.shape, output_shape=y.shape)

    def _backward(
        self, dy: np.ndarray, cache: _FlattenCache
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return dy.reshape(cache.input_shape), {}
