"""``Layer``: what every companion layer shares (building and weights I/O).

A layer builds its arrays on the first call, from the input's shape and
floating dtype, under Keras's names and layouts, so that
``layer.set_weights(keras_layer.get_weights())`` copies a Keras layer one to
one.  ``__call__(x, training=False)`` runs the forward pass and keeps what
the backward pass needs; ``backward(dy)`` returns ``dx`` and fills
``grads`` with one entry per trainable array in ``params``
(``backward(dy, input_gradient=False)`` fills ``grads`` only: a network's
first layer has no use for ``dx``).  Chapter 5 builds networks from these
layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np

from companion._validation import (
    as_float_array,
    check_bool,
    check_finite,
    check_int,
    compute_dtype,
    describe,
)

__all__ = ["Layer", "leaf_layers"]


class Layer:
    """Base class: building, the ``training`` flag, the cache, weights I/O.

    Subclasses define :meth:`weight_names`, :meth:`trainable_names`,
    ``_build`` (create the arrays for an input shape), ``_check_input``,
    ``_forward`` and ``_backward``.
    """

    def __init__(self) -> None:
        self._grads: dict[str, np.ndarray] = {}
        self._cache: Any = None
        self._built = False
        self._last_training: bool | None = None

    # ------------------------------------------------------------- overrides
    def weight_names(self) -> list[str]:
        """Names of the layer's arrays, in Keras's ``get_weights()`` order."""
        return []

    def trainable_names(self) -> list[str]:
        """Names of the arrays the optimizer updates (in ``weight_names``)."""
        return self.weight_names()

    def _check_input(self, x: np.ndarray, training: bool = False) -> None:
        """Raise when ``x`` does not fit the layer (before any change)."""

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

    def _parameter_gradients(
        self, dy: np.ndarray, cache: Any
    ) -> dict[str, np.ndarray]:
        """The parameters' gradients alone (``backward(dy,
        input_gradient=False)``); layers that can skip ``dx`` override it."""
        return self._backward(dy, cache)[1]

    # ------------------------------------------------------------ machinery
    @property
    def built(self) -> bool:
        """True once the layer's arrays exist."""
        return self._built

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The trainable arrays by name (the arrays themselves).

        Update them in place (``param -= lr * grad``), as the optimizer
        does.  Empty before the layer is built.
        """
        if not self.built:
            return {}
        return {name: getattr(self, name) for name in self.trainable_names()}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """Gradients of the trainable arrays by name, from :meth:`backward`."""
        return self._grads

    @grads.setter
    def grads(self, value: dict[str, np.ndarray]) -> None:
        self._grads = value

    def build(
        self, input_shape: Sequence[int | None], dtype: Any = np.float32
    ) -> None:
        """Create the arrays for inputs of ``input_shape`` (batch axis first).

        The batch size may be None (unknown), as in Keras.
        """
        batch, *rest = tuple(input_shape)
        shape = tuple(
            check_int(size, "input_shape entry", low=0)
            for size in (1 if batch is None else batch, *rest)
        )
        # A stand-in of that shape (no memory) for the input checks.
        probe = np.broadcast_to(np.float32(0), shape)
        self._check_input(probe)
        self._build(tuple(probe.shape), compute_dtype(np.dtype(dtype)))
        self._built = True

    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        """Forward pass; keeps what :meth:`backward` needs."""
        training = check_bool(training, "training")
        x = as_float_array(x, "x")
        self._check_input(x, training)
        if x.ndim >= 1 and x.shape[0] == 0:
            raise ValueError(
                f"x has an empty batch (shape {x.shape}); expected at least "
                "one example"
            )
        if not self._built:
            self.build(x.shape, x.dtype)
        y, cache = self._forward(x, training)
        self._cache = cache
        self._last_training = training
        return y

    @overload
    def backward(
        self, dy: Any, *, input_gradient: Literal[True] = ...
    ) -> np.ndarray: ...

    @overload
    def backward(
        self, dy: Any, *, input_gradient: bool
    ) -> np.ndarray | None: ...

    def backward(
        self, dy: Any, *, input_gradient: bool = True
    ) -> np.ndarray | None:
        """Backpropagate ``dy`` through the last call; fill ``grads``.

        Returns ``dx``, the gradient with respect to the last input; with
        ``input_gradient=False`` it fills ``grads`` only and returns None
        (the first layer of a network, whose input is the data).
        """
        if self._cache is None:
            state = (
                "has not been called"
                if self._last_training is None
                else "has not been called since its weights were set"
            )
            raise ValueError(
                "backward(dy) needs a preceding forward call; this "
                f"{type(self).__name__} {state}"
            )
        dy = as_float_array(dy, "dy")
        expected = self._cache_output_shape()
        if dy.shape != expected:
            raise ValueError(
                f"dy must have the shape of the last output {expected}; "
                f"received shape {dy.shape}"
            )
        if not check_bool(input_gradient, "input_gradient"):
            self._grads = self._parameter_gradients(dy, self._cache)
            return None
        dx, grads = self._backward(dy, self._cache)
        self._grads = grads
        return dx

    def _array(self, name: str) -> np.ndarray:
        """The layer's array ``name``; an error before the layer is built."""
        array = getattr(self, name)
        if array is None:
            raise ValueError(
                f"this {type(self).__name__} is not built (it has no {name})"
            )
        return array  # type: ignore[no-any-return]

    def _cache_output_shape(self) -> tuple[int, ...]:
        return tuple(self._cache.output_shape)

    # ---------------------------------------------------------- weights I/O
    def get_weights(self) -> list[np.ndarray]:
        """Copies of the arrays in Keras's order."""
        if not self._built:
            raise ValueError(
                f"get_weights() needs a built {type(self).__name__}; call it "
                "on an input or build() it first"
            )
        return [getattr(self, name).copy() for name in self.weight_names()]

    def set_weights(self, weights: Iterable[Any]) -> None:
        """Assign arrays in Keras's order (``keras_layer.get_weights()``).

        ``weights`` is any iterable of arrays (a list, a tuple, a
        generator).  Every array is checked (count, shape, a real floating
        or integer dtype, finite values) before any is assigned: a failed
        call leaves the layer unchanged.  The arrays are copied into the
        layer's own, in place, in the layer's dtype.
        """
        self._assign_weights(self._check_weights(weights))

    def _weights_list(self, weights: Any) -> list[Any]:
        """``weights`` as a list of as many entries as ``weight_names()``."""
        names = self.weight_names()
        expected = (
            f"a list of {len(names)} arrays ({', '.join(names) or 'none'}) "
            f"for {type(self).__name__}"
        )
        if isinstance(weights, (Mapping, str, bytes, np.ndarray)) or not (
            isinstance(weights, Iterable)
        ):
            raise TypeError(
                f"weights must be {expected}; received {describe(weights)}"
            )
        items = list(weights)
        if len(items) != len(names):
            raise ValueError(
                f"weights must be {expected}; received {len(items)} arrays"
            )
        return items

    def _check_weights(self, weights: Any) -> list[np.ndarray]:
        """Check ``weights`` for :meth:`set_weights`; assign nothing."""
        items = self._weights_list(weights)
        if not items:
            return []
        if not self._built:
            raise ValueError(
                f"set_weights() needs a built {type(self).__name__}: call it "
                "on an input or build() it first"
            )
        arrays = []
        for name, value in zip(self.weight_names(), items, strict=True):
            label = f"weights[{name!r}]"
            array = as_float_array(value, label)
            expected = getattr(self, name).shape
            if array.shape != expected:
                raise ValueError(
                    f"{label} has shape {array.shape}; expected {expected}"
                )
            arrays.append(check_finite(array, label))
        return arrays

    def _assign_weights(self, arrays: list[np.ndarray]) -> None:
        """Copy checked arrays into the layer's arrays, in place."""
        for name, array in zip(self.weight_names(), arrays, strict=True):
            getattr(self, name)[...] = array


def leaf_layers(model: Any) -> Iterator[Any]:
    """The layers of ``model`` in order, looking inside nested models.

    ``model`` is a layer, anything with a ``layers`` list (a
    ``Sequential``), or an iterable of those.  Items that are neither are
    yielded as they are (callers decide whether they accept them).
    """
    if hasattr(model, "layers"):
        for inner in model.layers:
            yield from leaf_layers(inner)
    elif isinstance(model, (Layer, str, bytes)):
        yield model
    elif isinstance(model, Iterable):
        for inner in model:
            yield from leaf_layers(inner)
    else:
        yield model
