r"""``SGD`` with momentum, Keras's update rule.

.. math::

    v \leftarrow \mu v - \eta\, g, \qquad w \leftarrow w + v

with velocity :math:`v` starting at 0
(``keras.optimizers.SGD(learning_rate=eta, momentum=mu)``;
``tf.compat.v1.train.MomentumOptimizer`` takes the same steps).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from companion._validation import (
    as_float_array,
    check_finite,
    check_momentum,
    check_positive_real,
    describe,
)
from companion.base import Layer, leaf_layers

__all__ = ["SGD"]


def _layers(layers: Any) -> list[Layer]:
    """The companion layers of a model, a layer or an iterable of them."""
    found = list(leaf_layers(layers))
    for item in found:
        if not isinstance(item, Layer):
            raise TypeError(
                "layers must be companion layers (a Sequential, a layer or "
                f"a list of layers); received {describe(item)}"
            )
    return found


class SGD:
    """Stochastic gradient descent with (heavy-ball) momentum.

    Parameters
    ----------
    learning_rate : float > 0
    momentum : float in [0, 1]

    :meth:`step` updates the layers' ``params`` in place from their
    ``grads``.  The optimizer keeps one velocity per layer and parameter
    name; a layer's velocities go away with the layer, so a new layer never
    inherits the velocities of a freed one.

    Examples
    --------
    >>> from companion.nn import Dense
    >>> dense = Dense(1, use_bias=False)
    >>> dense.build((None, 1), np.float64)
    >>> dense.set_weights([np.zeros((1, 1))])
    >>> sgd = SGD(learning_rate=0.1, momentum=0.9)
    >>> for _ in range(2):
    ...     dense.grads = {"kernel": np.ones((1, 1))}
    ...     sgd.step([dense])
    >>> dense.kernel.round(12)  # v = -0.1, then 0.9 * (-0.1) - 0.1
    array([[-0.29]])
    """

    def __init__(
        self, learning_rate: float = 0.01, momentum: float = 0.0
    ) -> None:
        self.learning_rate = check_positive_real(
            learning_rate, "learning_rate"
        )
        self.momentum = check_momentum(momentum)
        # Keyed by the layer itself, weakly: not by id(param), which
        # Python reuses for a new array once the old one is freed.
        self._velocity: weakref.WeakKeyDictionary[
            Layer, dict[str, np.ndarray]
        ] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return (
            f"SGD(learning_rate={self.learning_rate}, "
            f"momentum={self.momentum})"
        )

    def step(self, layers: Any) -> None:
        """One update of every trainable array of ``layers``.

        ``layers`` is a ``Sequential`` (nested ones included), a layer or a
        list of layers.

        Raises
        ------
        ValueError
            When a layer has parameters but no gradients of their shape
            (call ``backward`` first).  Nothing is updated then.
        """
        updates = []
        for layer in _layers(layers):
            for name, param in layer.params.items():
                grad = layer.grads.get(name)
                if grad is None:
                    raise ValueError(
                        f"{type(layer).__name__} has no gradient for "
                        f"{name!r}; run backward() before step()"
                    )
                if np.shape(grad) != param.shape:
                    raise ValueError(
                        f"{type(layer).__name__}'s gradient for {name!r} "
                        f"has shape {np.shape(grad)}; expected {param.shape}"
                    )
                updates.append((self._slot(layer, name, param), param, grad))
        for velocity, param, grad in updates:
            if self.momentum == 0.0:  # v = -lr g: the same numbers, one pass
                np.multiply(grad, -self.learning_rate, out=velocity)
            else:
                velocity *= self.momentum
                velocity -= self.learning_rate * grad
            param += velocity

    def _slot(self, layer: Layer, name: str, param: np.ndarray) -> np.ndarray:
        """The velocity of ``layer.name``, created at 0 on first use."""
        slots = self._velocity.setdefault(layer, {})
        if name not in slots:
            slots[name] = np.zeros_like(param)
        return slots[name]

    def get_slots(self, layers: Any) -> list[np.ndarray]:
        """Copies of the velocities, one per trainable array of ``layers``.

        In the order of ``[p for layer in layers for p in
        layer.params.values()]`` (Keras's order for a ``Sequential``);
        zeros for arrays that were not stepped yet.
        """
        slots = []
        for layer in _layers(layers):
            kept = self._velocity.get(layer, {})
            for name, param in layer.params.items():
                velocity = kept.get(name)
                slots.append(
                    np.zeros_like(param)
                    if velocity is None
                    else velocity.copy()
                )
        return slots

    def set_slots(self, layers: Any, values: Iterable[Any]) -> None:
        """Set the velocities of ``layers`` from :meth:`get_slots`'s list.

        Every value is checked (count, shape, finite) before any is set; a
        failed call leaves the optimizer unchanged.  Values are copied in
        the dtype of their arrays.
        """
        targets = [
            (layer, name, param)
            for layer in _layers(layers)
            for name, param in layer.params.items()
        ]
        if isinstance(values, (Mapping, str, bytes, np.ndarray)) or not (
            isinstance(values, Iterable)
        ):
            raise TypeError(
                f"values must be a list of {len(targets)} arrays (one per "
                f"trainable array); received {describe(values)}"
            )
        items = list(values)
        if len(items) != len(targets):
            raise ValueError(
                f"values must be a list of {len(targets)} arrays (one per "
                f"trainable array); received {len(items)}"
            )
        checked = []
        for index, ((layer, name, param), value) in enumerate(
            zip(targets, items, strict=True)
        ):
            label = f"values[{index}] ({type(layer).__name__} {name!r})"
            array = check_finite(as_float_array(value, label), label)
            if array.shape != param.shape:
                raise ValueError(
                    f"{label} has shape {array.shape}; expected {param.shape}"
                )
            checked.append((layer, name, array.astype(param.dtype)))
        for layer, name, array in checked:
            self._velocity.setdefault(layer, {})[name] = array
