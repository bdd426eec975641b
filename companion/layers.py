"""``BatchNorm``: the stateful layer around :mod:`companion.functional`.

Keras semantics (``keras.layers.BatchNormalization``), checked against Keras
in the tests:

* ``training=True`` normalizes with the batch statistics and updates
  ``moving = moving * momentum + batch * (1 - momentum)``, with the *biased*
  batch variance;
* ``training=False`` (the default) normalizes with the moving statistics;
* the moving statistics start at 0 and 1, ``gamma`` at 1 and ``beta`` at 0;
* ``center=False`` drops ``beta``, ``scale=False`` drops ``gamma``.

Chapter 4, *Training versus inference*, derives the two modes; chapter 5
builds networks from this layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from companion._validation import (
    as_float_array,
    channel_axis,
    check_epsilon,
    check_momentum,
    check_rank,
    compute_dtype,
    describe,
)
from companion.base import Layer
from companion.functional import (
    BatchNormCache,
    batchnorm_backward,
    batchnorm_forward,
    batchnorm_inference,
)

__all__ = ["BatchNorm", "batchnorm_layers", "keep_moving_statistics"]

_STATE_ORDER = ("gamma", "beta", "moving_mean", "moving_variance")


class BatchNorm(Layer):
    r"""Batch normalization layer with Keras's defaults and update rule.

    .. math::

        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta, \qquad
        (\mu, \sigma^2) = \begin{cases}
            (\mu_B, \sigma_B^2) & \text{training} \\
            (\text{moving\_mean}, \text{moving\_variance}) & \text{inference}
        \end{cases}

    Parameters
    ----------
    axis : int
        The kept channel axis (``-1`` for NHWC and (N, D), ``1`` for NCHW).
    momentum : float in [0, 1]
        Weight of the old moving value (Keras meaning; PyTorch's momentum is
        ``1 - momentum``).
    epsilon : float > 0
    center, scale : bool
        Whether the layer has ``beta`` / ``gamma``.

    Attributes
    ----------
    gamma
        Scale, shape (C,); None before the first call or with ``scale=False``.
    beta
        Shift, shape (C,); None before the first call or with ``center=False``.
    moving_mean, moving_variance
        Moving statistics, shape (C,); None before the first call.
    grads
        ``{"gamma": dgamma, "beta": dbeta}`` (the parameters the layer has),
        filled by :meth:`backward`.

    Notes
    -----
    The arrays are created on the first call in the input's floating dtype,
    except for 16-bit inputs, which get float32 arrays (Keras's mixed
    precision does the same; in float16, a moving average with momentum 0.99
    stops moving once its update is below half a unit in the last place).
    Updates are made in place, so references to these arrays, and
    assignments into them (``layer.gamma[...] = w``), stay valid.
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an int; received {describe(axis)}")
        for name, flag in (("center", center), ("scale", scale)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(
                    f"{name} must be a bool; received {describe(flag)}"
                )
        self.axis = int(axis)
        self.momentum = check_momentum(momentum)
        self.epsilon = check_epsilon(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.gamma: np.ndarray | None = None
        self.beta: np.ndarray | None = None
        self.moving_mean: np.ndarray | None = None
        self.moving_variance: np.ndarray | None = None

    def __repr__(self) -> str:
        channels = (
            "unbuilt"
            if self.moving_mean is None
            else f"channels={self.channels}"
        )
        return (
            f"BatchNorm(axis={self.axis}, momentum={self.momentum}, epsilon={self.epsilon}, "
            f"center={self.center}, scale={self.scale}; {channels})"
        )

    # ------------------------------------------------------------------ state
    @property
    def channels(self) -> int | None:
        """C, the number of channels, or None before the layer is built."""
        return None if self.moving_mean is None else self.moving_mean.shape[0]

    def weight_names(self) -> list[str]:
        """gamma, beta, moving_mean, moving_variance (Keras's order), less dropped parameters."""
        return [
            name
            for name in _STATE_ORDER
            if (name != "gamma" or self.scale)
            and (name != "beta" or self.center)
        ]

    def trainable_names(self) -> list[str]:
        """gamma and beta, where the layer has them; the moving statistics are not trained."""
        return [
            name
            for name in self.weight_names()
            if not name.startswith("moving_")
        ]

    def _build(self, input_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._build_channels(
            input_shape[channel_axis(self.axis, len(input_shape))], dtype
        )

    def _build_channels(self, channels: int, dtype: np.dtype) -> None:
        """gamma = 1, beta = 0, moving_mean = 0, moving_variance = 1, of shape (C,)."""
        self.gamma = np.ones(channels, dtype) if self.scale else None
        self.beta = np.zeros(channels, dtype) if self.center else None
        self.moving_mean = np.zeros(channels, dtype)
        self.moving_variance = np.ones(channels, dtype)
        self.grads = {}
        self._cache = None
        self._built = True

    def _check_input(self, x: np.ndarray, training: bool = False) -> None:
        check_rank(x)
        kept = channel_axis(self.axis, x.ndim)
        channels = x.shape[kept]
        if self.built and channels != self.channels:
            raise ValueError(
                f"x has {channels} channels on axis {self.axis} (shape {x.shape}), but this "
                f"layer was built for {self.channels} channels; use a new BatchNorm layer"
            )
        if training and x.size // max(channels, 1) < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training; received x of shape "
                f"{x.shape} with axis={self.axis}, which leaves {x.size // max(channels, 1)} "
                "value per channel"
            )

    # ------------------------------------------------------- forward/backward
    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Normalize ``x``; with ``training=True`` also update the moving statistics.

        Raises
        ------
        TypeError, ValueError
            As :func:`companion.functional.batchnorm_forward`, and when ``x``
            has another number of channels than the layer was built for.  A
            failed call leaves the layer unchanged.
        """
        return super().__call__(x, training)

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, BatchNormCache | None]:
        channels = self.channels
        gamma = (
            self.gamma
            if self.gamma is not None
            else np.ones(channels, self.moving_mean.dtype)
        )
        beta = (
            self.beta
            if self.beta is not None
            else np.zeros(channels, self.moving_mean.dtype)
        )
        if not training:
            y = batchnorm_inference(
                x,
                gamma,
                beta,
                self.moving_mean,
                self.moving_variance,
                axis=self.axis,
                epsilon=self.epsilon,
            )
            return y, None
        y, cache = batchnorm_forward(
            x, gamma, beta, axis=self.axis, epsilon=self.epsilon
        )
        keep = self.momentum
        self.moving_mean[...] = self.moving_mean * keep + cache.mean * (
            1.0 - keep
        )
        self.moving_variance[...] = self.moving_variance * keep + cache.var * (
            1.0 - keep
        )
        return y, cache

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Backpropagate through the last training-mode call.

        Stores ``grads["gamma"]`` / ``grads["beta"]`` (for the parameters the
        layer has) and returns ``dx``.  See
        :func:`companion.functional.batchnorm_backward`.

        Raises
        ------
        ValueError
            When the last call was not a training-mode call (there are no
            batch statistics to differentiate), or ``dy`` has the wrong shape.
        """
        return super().backward(dy)

    def _cache_output_shape(self) -> tuple[int, ...]:
        return self._cache.x_hat.shape

    def _backward(
        self, dy: np.ndarray, cache: BatchNormCache
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        dx, dgamma, dbeta = batchnorm_backward(dy, cache)
        grads = {"gamma": dgamma, "beta": dbeta}
        return dx, {name: grads[name] for name in self.trainable_names()}

    # ---------------------------------------------------------- weights I/O
    def set_weights(self, weights: Sequence[Any]) -> None:
        """Set the arrays from a list in Keras's order (as ``keras_layer.get_weights()`` returns).

        Builds the layer if needed.  All arrays are checked before any is
        assigned; a failed call leaves the layer unchanged.
        """
        names = self.weight_names()
        if isinstance(weights, (Mapping, str)) or len(weights) != len(names):
            raise ValueError(
                f"weights must be a list of {len(names)} arrays ({', '.join(names)}); "
                f"received {describe(weights)}"
            )
        self._set_state(dict(zip(names, weights)), source="weights")

    def _set_state(self, state: Mapping[str, Any], source: str) -> None:
        names = self.weight_names()
        if set(state) != set(names):
            raise ValueError(
                f"{source} must hold exactly {names}; received {sorted(state)}"
            )
        arrays = {
            name: as_float_array(state[name], f"{source}[{name!r}]")
            for name in names
        }
        expected = (
            (self.channels,) if self.built else arrays["moving_mean"].shape
        )
        if len(expected) != 1:
            raise ValueError(
                f"{source}['moving_mean'] must have shape (C,); received shape {expected}"
            )
        for name, array in arrays.items():
            if array.shape != expected:
                raise ValueError(
                    f"{source}[{name!r}] has shape {array.shape}; expected {expected}"
                    + (
                        " (the layer's channels)"
                        if self.built
                        else " (the shape of moving_mean)"
                    )
                )
        if not self.built:
            self._build_channels(
                expected[0], compute_dtype(arrays["moving_mean"].dtype)
            )
        for name, array in arrays.items():
            getattr(self, name)[...] = array
        self._cache = None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the arrays to an ``.npz`` file (plain arrays, no pickle)."""
        names = self.weight_names()
        weights = self.get_weights()
        np.savez(path, **dict(zip(names, weights)))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Read arrays written by :meth:`save`, without pickle.

        Raises
        ------
        ValueError
            When the file's arrays do not match the layer (other names, or a
            shape other than the layer's (C,)).  The layer is then unchanged.
        """
        with np.load(path, allow_pickle=False) as data:
            state = {name: data[name] for name in data.files}
        self._set_state(state, source=f"state file {os.fspath(path)!r}")


def batchnorm_layers(model: Any) -> list[BatchNorm]:
    """Every :class:`BatchNorm` in ``model``, in order, looking inside nested models.

    ``model`` is a layer, or anything with a ``layers`` list (a
    ``Sequential``), or an iterable of those.
    """
    found: list[BatchNorm] = []

    def visit(item: Any) -> None:
        if isinstance(item, BatchNorm):
            found.append(item)
        elif hasattr(item, "layers"):
            for inner in item.layers:
                visit(inner)
        elif isinstance(item, Iterable) and not isinstance(item, (str, bytes)):
            for inner in item:
                visit(inner)

    visit(model)
    return found


@contextlib.contextmanager
def keep_moving_statistics(model: Any) -> Iterator[None]:
    """Run the ``with`` block, then put every BatchNorm's moving statistics back.

    For evaluating a model with batch statistics (``training=True``)
    without the side effect of a training-mode call: the moving mean and
    variance of every built :class:`BatchNorm` in ``model`` are copied on
    entry and restored on exit, also when the block raises.  Each layer
    gets its own values back (layers are matched by identity, not by
    position).
    """
    saved = [
        (layer, layer.moving_mean.copy(), layer.moving_variance.copy())
        for layer in batchnorm_layers(model)
        if layer.moving_mean is not None and layer.moving_variance is not None
    ]
    try:
        yield
    finally:
        for layer, mean, variance in saved:
            assert layer.moving_mean is not None
            assert layer.moving_variance is not None
            layer.moving_mean[...] = mean
            layer.moving_variance[...] = variance
