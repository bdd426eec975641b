"""``Sequential``: layers applied in order, backpropagated in reverse.

A ``Sequential`` is itself a :class:`~companion.base.Layer`, so models nest.
Its weights list has Keras's order (layer by layer, each layer's
``get_weights()`` order), so ``model.set_weights(keras_model.get_weights())``
copies an identically built Keras model.  Chapter 5 assembles the source
text's network with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from companion._validation import check_bool, describe
from companion.base import Layer

__all__ = ["Sequential"]


class Sequential(Layer):
    """Layers applied one after the other; a layer itself (models nest).

    Parameters
    ----------
    layers : sequence of layers
        :class:`companion.base.Layer` objects (``BatchNorm`` and other
        ``Sequential`` models included).

    Attributes
    ----------
    params, grads
        The inner layers' trainable arrays and gradients under
        ``"<index>.<name>"`` (``"0.kernel"``; ``"1.0.kernel"`` inside a
        nested model).

    Examples
    --------
    >>> from companion.nn import Dense, ReLU
    >>> model = Sequential([Dense(4, seed=0), ReLU(), Dense(2, seed=1)])
    >>> model.build((None, 3))
    >>> list(model.params)
    ['0.kernel', '0.bias', '2.kernel', '2.bias']
    >>> model(np.ones((5, 3))).shape
    (5, 2)
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        super().__init__()
        layers = list(layers)
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"layers[{index}] must be a companion layer; received "
                    f"{describe(layer)}"
                )
        self.layers = layers

    def __repr__(self) -> str:
        inner = ",\n".join(repr(layer) for layer in self.layers)
        inner = inner.replace("\n", "\n    ")
        return f"Sequential([\n    {inner},\n])"

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------- forward/backward
    @property
    def built(self) -> bool:
        """True once every layer is built."""
        return all(layer.built for layer in self.layers)

    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        training = check_bool(training, "training")
        for layer in self.layers:
            x = layer(x, training=training)
        result: np.ndarray = x
        return result

    def backward(  # type: ignore[override]
        self, dy: Any, *, input_gradient: bool = True
    ) -> np.ndarray | None:
        """Backpropagate through every layer in reverse; returns dx.

        With ``input_gradient=False`` the layers below the first one with
        parameters are skipped and that layer computes its parameters'
        gradients only (nothing needs the gradient of the data); None is
        returned.
        """
        layers = list(self.layers)
        if not check_bool(input_gradient, "input_gradient"):
            trainable = [i for i, layer in enumerate(layers) if layer.params]
            layers = layers[trainable[0] :] if trainable else []
        for i, layer in enumerate(reversed(layers)):
            first = i == len(layers) - 1
            dy = layer.backward(dy, input_gradient=input_gradient or not first)
        return dy if input_gradient else None

    def build(
        self, input_shape: Sequence[int | None], dtype: Any = np.float32
    ) -> None:
        """Build every layer: one inference pass on one example of zeros.

        The batch size in ``input_shape`` is ignored (it may be None).
        """
        _, *rest = tuple(input_shape)
        self(np.zeros((1, *rest), dtype=dtype))

    # ------------------------------------------------- parameters, gradients
    def weight_names(self) -> list[str]:
        """``"<index>.<name>"`` for every array, in Keras's order."""
        return [
            f"{index}.{name}"
            for index, layer in enumerate(self.layers)
            for name in layer.weight_names()
        ]

    def trainable_names(self) -> list[str]:
        """``"<index>.<name>"`` for every trainable array."""
        return [
            f"{index}.{name}"
            for index, layer in enumerate(self.layers)
            for name in layer.trainable_names()
        ]

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Trainable arrays by ``"<index>.<name>"`` (e.g. ``"0.kernel"``)."""
        return {
            f"{index}.{name}": array
            for index, layer in enumerate(self.layers)
            for name, array in layer.params.items()
        }

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """The inner layers' gradients by ``"<index>.<name>"``."""
        return {
            f"{index}.{name}": grad
            for index, layer in enumerate(self.layers)
            for name, grad in layer.grads.items()
        }

    @grads.setter
    def grads(self, value: dict[str, np.ndarray]) -> None:
        raise AttributeError(
            "a Sequential's grads are its layers' grads; set them on "
            "the layers (model.layers[i].grads = ...)"
        )

    # ---------------------------------------------------------- weights I/O
    def get_weights(self) -> list[np.ndarray]:
        """All layers' arrays, in Keras's order (copies)."""
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights: Iterable[Any]) -> None:
        """Assign a flat list in Keras's order (``keras_model.get_weights()``).

        Every array of every layer is checked before any is assigned: a
        failed call leaves the model unchanged.
        """
        super().set_weights(weights)

    def _check_weights(self, weights: Any) -> list[Any]:
        items = self._weights_list(weights)
        checked, start = [], 0
        for index, layer in enumerate(self.layers):
            count = len(layer.weight_names())
            chunk = items[start : start + count]
            try:
                checked.append(layer._check_weights(chunk))
            except (TypeError, ValueError) as error:
                name = repr(layer)
                if "\n" in name:  # a nested Sequential: its class will do
                    name = type(layer).__name__
                raise type(error)(
                    f"weights for layers[{index}] ({name}): {error}"
                ) from None
            start += count
        return checked

    def _assign_weights(self, arrays: list[Any]) -> None:
        for layer, chunk in zip(self.layers, arrays, strict=True):
            layer._assign_weights(chunk)
