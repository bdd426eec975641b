"""``BatchNorm``: the stateful layer around :mod:`companion.functional`.

Keras semantics (``keras.layers.BatchNormalization``), checked against Keras
in the tests:

* ``training=True`` normalizes with the batch statistics and updates
  ``moving = moving * momentum + batch * (1 - momentum)``, with the *biased*
  batch variance;
* ``training=False`` (the default) normalizes with the moving statistics,
  and :meth:`BatchNorm.backward` then differentiates that fixed affine map
  (a frozen batch norm, as Keras's ``trainable=False``);
* the moving statistics start at 0 and 1, ``gamma`` at 1 and ``beta`` at 0;
* ``center=False`` drops ``beta``, ``scale=False`` drops ``gamma``.

Chapter 4, *Training versus inference*, derives the two modes; chapter 5
builds networks from this layer.  :meth:`BatchNorm.save` and
:meth:`BatchNorm.load` keep a layer in an ``.npz`` file
(:mod:`companion._state_file`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from companion import _state_file
from companion._validation import (
    as_float_array,
    channel_axis,
    check_bool,
    check_epsilon,
    check_int,
    check_momentum,
    check_normalizable,
    check_training_count,
    compute_dtype,
)
from companion.base import Layer, leaf_layers
from companion.functional import (
    BatchNormCache,
    _training_backward,
    _training_forward,
    batchnorm_inference,
    batchnorm_inference_backward,
)

__all__ = ["BatchNorm", "batchnorm_layers", "keep_moving_statistics"]

_STATE_ORDER = ("gamma", "beta", "moving_mean", "moving_variance")


class _InferenceCache(NamedTuple):
    """What an inference-mode call keeps for the backward pass."""

    x: np.ndarray
    gamma: np.ndarray
    moving_mean: np.ndarray
    moving_variance: np.ndarray


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
        Scale, shape (C,); None before the first call or with
        ``scale=False``.
    beta
        Shift, shape (C,); None before the first call or with
        ``center=False``.
    moving_mean, moving_variance
        Moving statistics, shape (C,); None before the first call.
    grads
        ``{"gamma": dgamma, "beta": dbeta}`` (the parameters the layer has),
        filled by :meth:`backward`.

    Notes
    -----
    The arrays are created on the first call in the input's floating
    dtype, except for 16-bit inputs, which get float32 arrays (Keras's mixed
    precision does the same; in float16, a moving average with momentum
    0.99 stops moving once its update is below half a unit in the last
    place).  Updates are made in place, so references to these arrays, and
    assignments into them (``layer.gamma[...] = w``), stay valid.

    Examples
    --------
    >>> layer = BatchNorm(momentum=0.9)
    >>> layer(np.array([[4.0], [6.0]]), training=True).round(4)
    array([[-0.9995],
           [ 0.9995]])
    >>> layer.moving_mean, layer.moving_variance  # 0.9 * old + 0.1 * batch
    (array([0.5]), array([1.]))
    >>> dx = layer.backward(np.ones((2, 1)))
    >>> layer.grads
    {'gamma': array([0.]), 'beta': array([2.])}
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
        self.axis = check_int(axis, "axis")
        self.momentum = check_momentum(momentum)
        self.epsilon = check_epsilon(epsilon)
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
        self.gamma: np.ndarray | None = None
        self.beta: np.ndarray | None = None
        self.moving_mean: np.ndarray | None = None
        self.moving_variance: np.ndarray | None = None

    def __repr__(self) -> str:
        built = (
            "unbuilt" if self.channels is None else f"channels={self.channels}"
        )
        return (
            f"BatchNorm(axis={self.axis}, momentum={self.momentum}, "
            f"epsilon={self.epsilon}, center={self.center}, "
            f"scale={self.scale}; {built})"
        )

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments (``BatchNorm(**layer.get_config())``).

        >>> BatchNorm(axis=1).get_config()
        {'axis': 1, 'momentum': 0.99, 'epsilon': 0.001, 'center': True, \
'scale': True}
        """
        return {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
        }

    # ------------------------------------------------------------------ state
    @property
    def channels(self) -> int | None:
        """C, the number of channels, or None before the layer is built."""
        if self.moving_mean is None:
            return None
        return int(self.moving_mean.shape[0])

    def weight_names(self) -> list[str]:
        """gamma, beta, moving_mean, moving_variance, in Keras's order.

        Without the parameters the layer does not have (``center=False``,
        ``scale=False``).
        """
        return [
            name
            for name in _STATE_ORDER
            if (name != "gamma" or self.scale)
            and (name != "beta" or self.center)
        ]

    def trainable_names(self) -> list[str]:
        """gamma and beta, where the layer has them (not the statistics)."""
        return [
            name
            for name in self.weight_names()
            if not name.startswith("moving_")
        ]

    def _build(self, input_shape: tuple[int, ...], dtype: np.dtype) -> None:
        kept = channel_axis(self.axis, len(input_shape))
        self._build_channels(input_shape[kept], dtype)

    def _build_channels(self, channels: int, dtype: np.dtype) -> None:
        """gamma = 1, beta = 0, moving_mean = 0, moving_variance = 1; (C,)."""
        self.gamma = np.ones(channels, dtype) if self.scale else None
        self.beta = np.zeros(channels, dtype) if self.center else None
        self.moving_mean = np.zeros(channels, dtype)
        self.moving_variance = np.ones(channels, dtype)
        self._grads = {}
        self._cache = None
        self._built = True

    def _check_input(self, x: np.ndarray, training: bool = False) -> None:
        kept = check_normalizable(x, self.axis)
        channels = x.shape[kept]
        if self.channels is not None and channels != self.channels:
            raise ValueError(
                f"x has {channels} channels on axis {self.axis} (shape "
                f"{x.shape}), but this layer was built for {self.channels} "
                "channels; use a new BatchNorm layer"
            )
        if training:
            check_training_count(x, kept, self.axis)

    def _state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """gamma, beta (1 and 0 where dropped), moving mean and variance."""
        mean, variance = self.moving_mean, self.moving_variance
        if mean is None or variance is None:
            raise ValueError(f"this {type(self).__name__} is not built")
        gamma = np.ones_like(mean) if self.gamma is None else self.gamma
        beta = np.zeros_like(mean) if self.beta is None else self.beta
        return gamma, beta, mean, variance

    # ------------------------------------------------------- forward/backward
    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        """Normalize ``x``; ``training=True`` updates the moving statistics.

        Raises
        ------
        TypeError, ValueError
            As :func:`companion.functional.batchnorm_forward`, and when
            ``x`` has another number of channels than the layer was built
            for.  A failed call leaves the layer unchanged.
        """
        return super().__call__(x, training)

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, BatchNormCache | _InferenceCache]:
        gamma, beta, mean, variance = self._state()
        settings: dict[str, Any] = {
            "axis": self.axis,
            "epsilon": self.epsilon,
            "check_finite": False,  # a diverged run propagates NaN
        }
        if not training:
            y = batchnorm_inference(x, gamma, beta, mean, variance, **settings)
            return y, _InferenceCache(x, gamma, mean, variance)
        # batchnorm_forward's arithmetic: __call__ has checked x
        # (_check_input) and gamma, beta are the layer's own arrays.
        kept = self.axis % x.ndim
        reduce_axes = tuple(i for i in range(x.ndim) if i != kept)
        shape = tuple(x.shape[i] if i == kept else 1 for i in range(x.ndim))
        y, cache = _training_forward(
            x, gamma, beta, kept, reduce_axes, shape, self.epsilon
        )
        keep = self.momentum
        mean[...] = mean * keep + cache.mean * (1.0 - keep)
        variance[...] = variance * keep + cache.var * (1.0 - keep)
        return y, cache

    def backward(  # type: ignore[override]
        self, dy: Any, *, input_gradient: bool = True
    ) -> np.ndarray | None:
        r"""Backpropagate through the last call; fill ``grads``; return dx.

        After a training-mode call: through the batch statistics
        (:func:`companion.functional.batchnorm_backward`).  After an
        inference-mode call: through the fixed affine map
        :math:`\gamma (x - \text{moving\_mean}) /
        \sqrt{\text{moving\_variance} + \epsilon} + \beta`
        (:func:`companion.functional.batchnorm_inference_backward`), as a
        frozen batch norm layer trains.  ``grads`` holds ``"gamma"`` and
        ``"beta"`` for the parameters the layer has.

        Raises
        ------
        ValueError
            Before any call, after ``set_weights``/``load``, or when ``dy``
            does not have the shape of the last output.
        """
        return super().backward(dy, input_gradient=input_gradient)

    def _cache_output_shape(self) -> tuple[int, ...]:
        cache = self._cache
        if isinstance(cache, _InferenceCache):
            return tuple(cache.x.shape)
        return tuple(cache.x_hat.shape)

    def _backward(
        self, dy: np.ndarray, cache: BatchNormCache | _InferenceCache
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if isinstance(cache, _InferenceCache):
            dx, dgamma, dbeta = batchnorm_inference_backward(
                dy,
                cache.x,
                cache.gamma,
                cache.moving_mean,
                cache.moving_variance,
                axis=self.axis,
                epsilon=self.epsilon,
                check_finite=False,
            )
        else:  # batchnorm_backward's arithmetic; backward() checked dy
            dy = dy.astype(cache.x_hat.dtype, copy=False)
            dx, dgamma, dbeta = _training_backward(dy, cache)
        grads = {"gamma": dgamma, "beta": dbeta}
        return dx, {name: grads[name] for name in self.trainable_names()}

    # ---------------------------------------------------------- weights I/O
    def set_weights(self, weights: Iterable[Any]) -> None:
        """Set the arrays from a list in Keras's order.

        ``keras_layer.get_weights()`` gives such a list; any iterable of
        arrays works.  Builds the layer if needed (in the dtype of the
        arrays, float32 for 16-bit ones).  All arrays are checked (count,
        shape (C,), finite, ``moving_variance`` >= 0) before any is
        assigned; a failed call leaves the layer unchanged.
        """
        super().set_weights(weights)

    def _check_weights(self, weights: Any) -> list[np.ndarray]:
        items = self._weights_list(weights)
        names = self.weight_names()
        arrays = {
            name: as_float_array(value, f"weights[{name!r}]")
            for name, value in zip(names, items, strict=True)
        }
        _state_file.check_arrays(arrays, self.channels, label="weights")
        return [arrays[name] for name in names]

    def _assign_weights(self, arrays: list[np.ndarray]) -> None:
        by_name = dict(zip(self.weight_names(), arrays, strict=True))
        dtype = compute_dtype(by_name["moving_mean"].dtype)
        self._assign_state(by_name, dtype)

    def _assign_state(
        self, arrays: dict[str, np.ndarray], dtype: np.dtype
    ) -> None:
        """Copy checked arrays in; build the layer first if needed."""
        if not self.built:
            self._build_channels(arrays["moving_mean"].shape[0], dtype)
        for name, array in arrays.items():
            getattr(self, name)[...] = array
        self._cache = None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the layer to an ``.npz`` file; returns the file's path.

        The file holds the arrays of :meth:`get_weights` under their names,
        ``format_version`` and ``config`` (the constructor's arguments and
        the arrays' dtype, as JSON) -- plain arrays, read without pickle.
        ``.npz`` is appended to a path without it, as ``np.savez`` does.
        """
        if not self.built:
            raise ValueError(
                f"save() needs a built {type(self).__name__}; call it on an "
                "input, build() it or set_weights() first"
            )
        arrays = dict(
            zip(self.weight_names(), self.get_weights(), strict=True)
        )
        dtype = arrays["moving_mean"].dtype
        return _state_file.write(path, arrays, self.get_config(), dtype)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Read a layer written by :meth:`save` (without pickle), in place.

        ``path`` may omit the ``.npz`` suffix.  The file must have been
        written by a layer with this layer's config (axis, momentum,
        epsilon, center, scale) and, if this layer is built, its number of
        channels and dtype; its arrays must be finite, with
        ``moving_variance`` >= 0.  An unbuilt layer is built from the file.

        Raises
        ------
        FileNotFoundError
            Neither ``path`` nor ``path + ".npz"`` exists.
        ValueError
            Anything else that does not fit, named in the message; the
            layer is then unchanged.
        """
        dtype = (
            self.moving_mean.dtype if self.moving_mean is not None else None
        )
        arrays, file_dtype = _state_file.read(
            path,
            self.get_config(),
            self.weight_names(),
            channels=self.channels,
            dtype=dtype,
        )
        self._assign_state(arrays, file_dtype)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BatchNorm:
        """A new layer with the config and arrays stored by :meth:`save`."""
        layer = cls(**_state_file.read_config(path))
        layer.load(path)
        return layer


def batchnorm_layers(model: Any) -> list[BatchNorm]:
    """Every :class:`BatchNorm` in ``model``, in order, also in nested models.

    ``model`` is a layer, or anything with a ``layers`` list (a
    ``Sequential``, nested ones included), or an iterable of those.
    """
    return [
        layer for layer in leaf_layers(model) if isinstance(layer, BatchNorm)
    ]


@contextlib.contextmanager
def keep_moving_statistics(model: Any) -> Iterator[None]:
    """Run the ``with`` block, then put every BatchNorm's statistics back.

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
