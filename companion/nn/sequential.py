"""``Sequential``: a stack of layers, forward in order and backward in reverse.

Its weights list has Keras's order (layer by layer, each layer's
``get_weights()`` order), so ``model.set_weights(keras_model.get_weights())``
copies an identically built Keras model.  Chapter 5 assembles the source
text's network with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from companion._validation import describe
from companion.base import Layer

__all__ = ["Sequential"]


class Sequential:
    """Layers applied one after the other.

    Parameters
    ----------
    layers : sequence of layers
        Objects with ``__call__(x, training)``, ``backward(dy)``, ``params``,
        ``grads``, ``get_weights()`` and ``set_weights()`` (every
        :class:`companion.base.Layer`, including ``BatchNorm``).
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        layers = list(layers)
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"layers[{index}] must be a companion layer; received {describe(layer)}"
                )
        self.layers = layers

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(layer) for layer in self.layers)
        return f"Sequential([\n    {inner},\n])"

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        for layer in self.layers:
            x = layer(x, training=training)
        return x

    def backward(self, dy: Any) -> np.ndarray:
        """Backpropagate through every layer in reverse; returns the gradient w.r.t. the input."""
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def build(
        self, input_shape: Sequence[int], dtype: Any = np.float32
    ) -> None:
        """Build every layer by running one inference-mode pass on zeros of ``input_shape``."""
        self(np.zeros((1, *tuple(input_shape)[1:]), dtype=dtype))

    def get_weights(self) -> list[np.ndarray]:
        """All layers' arrays, in Keras's order."""
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Assign a flat list in Keras's order (``keras_model.get_weights()``); all checked first."""
        weights = list(weights)
        counts = [len(layer.weight_names()) for layer in self.layers]
        if len(weights) != sum(counts):
            raise ValueError(
                f"weights must be a list of {sum(counts)} arrays (the model's get_weights() order); "
                f"received {len(weights)}"
            )
        chunks, start = [], 0
        for layer, count in zip(self.layers, counts):
            chunk = weights[start : start + count]
            for name, value, current in zip(
                layer.weight_names(),
                chunk,
                layer.get_weights() if count else [],
            ):
                if np.shape(value) != current.shape:
                    raise ValueError(
                        f"weights for {layer!r} {name!r} have shape {np.shape(value)}; expected {current.shape}"
                    )
            chunks.append(chunk)
            start += count
        for layer, chunk in zip(self.layers, chunks):
            if chunk:
                layer.set_weights(chunk)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Trainable arrays by ``"<index>.<name>"`` (e.g. ``"0.kernel"``)."""
        return {
            f"{i}.{name}": a
            for i, layer in enumerate(self.layers)
            for name, a in layer.params.items()
        }
