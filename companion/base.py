"""``Layer``: what every companion layer shares (Keras-style building and weights).

A layer builds its arrays on the first call, from the input's shape and
floating dtype, under Keras's names and layouts, so that
``layer.set_weights(keras_layer.get_weights())`` copies a Keras layer one to
one.  ``__call__(x, training=False)`` runs the forward pass and keeps what the
backward pass needs; ``backward(dy)`` returns ``dx`` and fills ``grads`` with
one entry per trainable array in ``params``.  Chapter 5 builds networks from
these layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from companion._validation import as_float_array, compute_dtype, describe

__all__ = ["Layer"]


class Layer:
    """Base class: building, the ``training`` flag, the backward cache, weights I/O.

    Subclasses define :meth:`weight_names`, :meth:`trainable_names`,
    ``_build`` (create the arrays for an input shape),
    ``_check_input``, ``_forward`` and ``_backward``.
    """

    def __init__(self) -> None:
        self.grads: dict[str, np.ndarray] = {}
        self._cache: Any = None
        self._built = False
        self._last_training: bool | None = None

    # ------------------------------------------------------------- overrides
    def weight_names(self) -> list[str]:
        """Names of the layer's arrays, in Keras's ``get_weights()`` order."""
        return []

    def trainable_names(self) -> list[str]:
        """Names of the arrays the optimizer updates (a subset of ``weight_names``)."""
        return self.weight_names()

    def _check_input(self, x: np.ndarray, training: bool = False) -> None:
        """Raise ValueError when ``x`` does not fit the layer (called before any state changes)."""

    def _build(self, input_shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Create the arrays for inputs of ``input_shape``."""

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def _backward(
        self, dy: np.ndarray, cache: Any
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        raise NotImplementedError

    # ------------------------------------------------------------ machinery
    @property
    def built(self) -> bool:
        """True once the layer's arrays exist."""
        return self._built

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The trainable arrays by name; these are the arrays themselves, so update them in place."""
        return {name: getattr(self, name) for name in self.trainable_names()}

    def build(
        self, input_shape: Sequence[int], dtype: Any = np.float32
    ) -> None:
        """Create the layer's arrays for inputs of ``input_shape`` (batch axis first)."""
        self._check_input(
            np.empty((0, *tuple(input_shape)[1:]), dtype=np.float32)
        )
        self._build(tuple(input_shape), compute_dtype(np.dtype(dtype)))
        self._built = True

    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        """Forward pass; keeps what :meth:`backward` needs."""
        if not isinstance(training, (bool, np.bool_)):
            raise TypeError(
                f"training must be a bool; received {describe(training)}"
            )
        x = as_float_array(x, "x")
        self._check_input(x, bool(training))
        if not self._built:
            self.build(x.shape, x.dtype)
        y, cache = self._forward(x, bool(training))
        self._cache = cache
        self._last_training = bool(training)
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Backpropagate ``dy`` through the last call; fill ``grads``; return ``dx``."""
        if self._cache is None:
            state = (
                "has not been called"
                if self._last_training is None
                else "was last called with training=False, which keeps nothing to differentiate"
            )
            raise ValueError(
                f"backward(dy) needs a preceding forward call; this {type(self).__name__} {state}"
            )
        dy = as_float_array(dy, "dy")
        expected = self._cache_output_shape()
        if dy.shape != expected:
            raise ValueError(
                f"dy must have the shape of the last output {expected}; received shape {dy.shape}"
            )
        dx, grads = self._backward(dy, self._cache)
        self.grads = grads
        return dx

    def _cache_output_shape(self) -> tuple[int, ...]:
        return self._cache.output_shape

    def get_weights(self) -> list[np.ndarray]:
        """Copies of the arrays in Keras's order."""
        if not self._built:
            raise ValueError(
                f"get_weights() needs a built {type(self).__name__}; call it on an input or build() it first"
            )
        return [getattr(self, name).copy() for name in self.weight_names()]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Assign arrays in Keras's order (``keras_layer.get_weights()``), in place.

        Every array is checked before any is assigned: a failed call leaves
        the layer unchanged.
        """
        names = self.weight_names()
        if (
            isinstance(weights, (dict, str))
            or not hasattr(weights, "__len__")
            or len(weights) != len(names)
        ):
            raise ValueError(
                f"weights must be a list of {len(names)} arrays ({', '.join(names) or 'none'}) for "
                f"{type(self).__name__}; received {describe(weights)}"
            )
        if not self._built:
            raise ValueError(
                f"set_weights() needs a built {type(self).__name__}: call it on an input or build() it first"
            )
        arrays = []
        for name, value in zip(names, weights):
            array = as_float_array(value, f"weights[{name!r}]")
            expected = getattr(self, name).shape
            if array.shape != expected:
                raise ValueError(
                    f"weights[{name!r}] has shape {array.shape}; expected {expected}"
                )
            arrays.append(array)
        for name, array in zip(names, arrays):
            getattr(self, name)[...] = array
