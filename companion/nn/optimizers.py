r"""``SGD`` with momentum, Keras's update rule.

.. math::

    v \leftarrow \mu v - \eta\, g, \qquad w \leftarrow w + v

with velocity :math:`v` starting at 0 (``keras.optimizers.SGD(learning_rate=eta,
momentum=mu)``; ``tf.compat.v1.train.MomentumOptimizer`` takes the same steps).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np

from companion._validation import check_momentum, describe

__all__ = ["SGD"]


class SGD:
    """Stochastic gradient descent with (heavy-ball) momentum.

    Parameters
    ----------
    learning_rate : float > 0
    momentum : float in [0, 1]

    :meth:`step` updates the layers' ``params`` in place from their ``grads``;
    the velocities are kept per array.
    """

    def __init__(
        self, learning_rate: float = 0.01, momentum: float = 0.0
    ) -> None:
        if isinstance(learning_rate, bool) or not isinstance(
            learning_rate, numbers.Real
        ):
            raise TypeError(
                f"learning_rate must be a float; received {describe(learning_rate)}"
            )
        if not (np.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(
                f"learning_rate must be finite and > 0; received {learning_rate!r}"
            )
        self.learning_rate = float(learning_rate)
        self.momentum = check_momentum(momentum)
        self._velocity: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"SGD(learning_rate={self.learning_rate}, momentum={self.momentum})"

    def step(self, layers: Iterable) -> None:
        """One update of every trainable array of ``layers`` (a ``Sequential`` or a list of layers).

        Raises
        ------
        ValueError
            When a layer has parameters but no gradients for them (call
            ``backward`` first).  Nothing is updated then.
        """
        pairs = []
        for layer in layers:
            for name, param in layer.params.items():
                if name not in layer.grads:
                    raise ValueError(
                        f"{type(layer).__name__} has no gradient for {name!r}; run backward() before step()"
                    )
                pairs.append((param, layer.grads[name]))
        for param, grad in pairs:
            velocity = self._velocity.setdefault(
                id(param), np.zeros_like(param)
            )
            velocity *= self.momentum
            velocity -= self.learning_rate * grad
            param += velocity
