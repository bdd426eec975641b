r"""Normalization layers: ``BatchNorm``, ``LayerNorm``, ``GroupNorm``.

``BatchNorm`` has Keras's semantics (``keras.layers.BatchNormalization``),
checked against Keras in the tests:

* ``training=True`` normalizes with the batch statistics and updates
  ``moving = moving * momentum + batch * (1 - momentum)``, with the *biased*
  batch variance;
* ``training=False`` (the default) normalizes with the moving statistics,
  and :meth:`~companion.layers.BatchNorm.backward` then differentiates that
  fixed affine map (a frozen batch norm, as Keras's ``trainable=False``);
* the moving statistics start at 0 and 1, ``gamma`` at 1 and ``beta`` at 0;
* ``center=False`` drops ``beta``, ``scale=False`` drops ``gamma``;
* ``renorm=True`` (batch renormalization) and ``virtual_batch_size`` (ghost
  batch norm) change the training-mode pass as tf-keras's options of the
  same names do (:mod:`companion.batch_renorm`).

Chapter 4, *Training versus inference*, derives the two modes; chapter 5
builds networks from this layer; chapter 16, *Alternatives*, adds the
options for small batches and the layers that normalize within each
example, ``LayerNorm`` and ``GroupNorm`` (:mod:`companion.per_example`;
Keras's ``LayerNormalization`` and ``GroupNormalization``).
:meth:`~companion.layers.BatchNorm.save` and
:meth:`~companion.layers.BatchNorm.load` keep a batch norm layer in an
``.npz`` file (``companion._state_file``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from companion import _fast_bn, _state_file
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
from companion.batch_renorm import (
    RenormCache,
    check_renorm_clipping,
    check_virtual_batch_size,
    renorm_correction,
)
from companion.batch_renorm import _backward as _renorm_backward
from companion.batch_renorm import _forward as _renorm_forward
from companion.functional import (
    BatchNormCache,
    batchnorm_inference,
    batchnorm_inference_backward,
)
from companion.per_example import (
    PerExampleCache,
    _layer_axes,
    groupnorm_backward,
    groupnorm_forward,
    layernorm_backward,
    layernorm_forward,
)

__all__ = [
    "BatchNorm",
    "GroupNorm",
    "LayerNorm",
    "batchnorm_layers",
    "keep_moving_statistics",
]

_STATE_ORDER = ("gamma", "beta", "moving_mean", "moving_variance")
_RENORM_ORDER = ("moving_stddev", "renorm_mean", "renorm_stddev")


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
    renorm : bool
        Batch renormalization (Ioffe 2017) in training mode: the output is
        corrected by :math:`(r, d)` toward the renorm moving statistics
        (:func:`companion.batch_renorm.batch_renorm_forward`); inference is
        unchanged.  Adds ``moving_stddev``, ``renorm_mean`` and
        ``renorm_stddev``, and derives ``moving_variance`` from
        ``moving_stddev`` as Keras does.
    renorm_clipping : dict or None
        ``{"rmax": ..., "rmin": ..., "dmax": ...}`` (any subset; missing:
        no clipping on that side); only with ``renorm=True``.
    renorm_momentum : float in [0, 1]
        Momentum of ``renorm_mean`` and ``renorm_stddev``, the statistics
        :math:`(r, d)` are computed from; ``momentum`` still drives the
        inference statistics.
    virtual_batch_size : int or None
        Ghost batch norm (Hoffer et al. 2017): in training mode, normalize
        ghost batches of this many examples separately (tf-keras's layout,
        :func:`companion.batch_renorm.ghost_batchnorm_forward`); it must
        divide every training batch.  Axis 0 must be the batch axis.

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
    moving_stddev, renorm_mean, renorm_stddev
        With ``renorm=True``: the inference standard deviation and the
        statistics of the renorm correction, shape (C,); else None.
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
        *,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.axis = check_int(axis, "axis")
        self.momentum = check_momentum(momentum)
        self.epsilon = check_epsilon(epsilon)
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
        self.renorm = check_bool(renorm, "renorm")
        self.renorm_clipping = check_renorm_clipping(renorm_clipping)
        if self.renorm_clipping and not self.renorm:
            raise ValueError(
                f"renorm_clipping={renorm_clipping!r} needs renorm=True; "
                "received renorm=False"
            )
        self.renorm_momentum = check_momentum(renorm_momentum)
        self.virtual_batch_size = (
            None
            if virtual_batch_size is None
            else check_int(virtual_batch_size, "virtual_batch_size", low=1)
        )
        if self.virtual_batch_size is not None and self.axis == 0:
            raise ValueError(
                "virtual_batch_size needs axis 0 to be the batch axis; "
                "received axis=0"
            )
        self.gamma: np.ndarray | None = None
        self.beta: np.ndarray | None = None
        self.moving_mean: np.ndarray | None = None
        self.moving_variance: np.ndarray | None = None
        self.moving_stddev: np.ndarray | None = None
        self.renorm_mean: np.ndarray | None = None
        self.renorm_stddev: np.ndarray | None = None

    def __repr__(self) -> str:
        built = (
            "unbuilt" if self.channels is None else f"channels={self.channels}"
        )
        options = "".join(
            f", {key}={value!r}"
            for key, value in self.get_config().items()
            if key not in ("axis", "momentum", "epsilon", "center", "scale")
        )
        return (
            f"BatchNorm(axis={self.axis}, momentum={self.momentum}, "
            f"epsilon={self.epsilon}, center={self.center}, "
            f"scale={self.scale}{options}; {built})"
        )

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments (``BatchNorm(**layer.get_config())``).

        The options of chapter 16 appear only when they are set, as in
        tf-keras's ``get_config``.

        >>> BatchNorm(axis=1).get_config()
        {'axis': 1, 'momentum': 0.99, 'epsilon': 0.001, 'center': True, \
'scale': True}
        >>> BatchNorm(virtual_batch_size=4).get_config()["virtual_batch_size"]
        4
        """
        config: dict[str, Any] = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
        }
        if self.renorm:
            config["renorm"] = True
            config["renorm_clipping"] = dict(self.renorm_clipping)
            config["renorm_momentum"] = self.renorm_momentum
        if self.virtual_batch_size is not None:
            config["virtual_batch_size"] = self.virtual_batch_size
        return config

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
        ``scale=False``); with ``renorm=True`` followed by
        ``moving_stddev``, ``renorm_mean``, ``renorm_stddev`` (Keras's
        order too).
        """
        names = [
            name
            for name in _STATE_ORDER
            if (name != "gamma" or self.scale)
            and (name != "beta" or self.center)
        ]
        return names + list(_RENORM_ORDER) if self.renorm else names

    def trainable_names(self) -> list[str]:
        """gamma and beta, where the layer has them (not the statistics)."""
        return [
            name
            for name in self.weight_names()
            if not name.startswith(("moving_", "renorm_"))
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
        if self.renorm:  # Keras: sqrt of moving_variance's initial value
            self.moving_stddev = np.ones(channels, dtype)
            self.renorm_mean = np.zeros(channels, dtype)
            self.renorm_stddev = np.ones(channels, dtype)
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
            size = self.virtual_batch_size
            if size is not None:
                check_virtual_batch_size(size, x.shape[0], kept)
                if (x.size // channels) // (x.shape[0] // size) < 2:
                    raise ValueError(
                        "Expected more than 1 value per channel in each "
                        f"ghost batch when training; received x of shape "
                        f"{x.shape} with virtual_batch_size={size}, which "
                        "leaves 1"
                    )

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
    ) -> tuple[np.ndarray, BatchNormCache | RenormCache | _InferenceCache]:
        gamma, beta, mean, variance = self._state()
        settings: dict[str, Any] = {
            "axis": self.axis,
            "epsilon": self.epsilon,
            "check_finite": False,  # a diverged run propagates NaN
        }
        if not training:
            y = batchnorm_inference(x, gamma, beta, mean, variance, **settings)
            return y, _InferenceCache(x, gamma, mean, variance)
        if self.renorm or self.virtual_batch_size is not None:
            return self._small_batch_forward(x, gamma, beta)
        # batchnorm_forward's arithmetic: __call__ has checked x
        # (_check_input) and gamma, beta are the layer's own arrays.  From
        # 4,096 values per channel it runs in cache-sized blocks
        # (companion._fast_bn, chapter 19); below, it is the same code.
        kept = self.axis % x.ndim
        reduce_axes = tuple(i for i in range(x.ndim) if i != kept)
        shape = tuple(x.shape[i] if i == kept else 1 for i in range(x.ndim))
        y, cache = _fast_bn.training_forward(
            x, gamma, beta, kept, reduce_axes, shape, self.epsilon
        )
        keep = self.momentum
        mean[...] = mean * keep + cache.mean * (1.0 - keep)
        variance[...] = variance * keep + cache.var * (1.0 - keep)
        return y, cache

    def _small_batch_forward(
        self, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray
    ) -> tuple[np.ndarray, RenormCache]:
        r"""Training with ``renorm`` and/or ``virtual_batch_size``.

        The moving statistics are updated as tf-keras does: from the batch
        statistics (with ghost batches, the means over the ghost batches
        of their means and variances); with renorm, the standard
        deviations :math:`\sqrt{\sigma_B^2 + \epsilon}` are averaged
        and ``moving_variance`` is :math:`\max(0,
        \text{moving\_stddev}^2 - \epsilon)`.
        """
        correct = None
        if self.renorm:
            renorm_mean = self._array("renorm_mean")
            renorm_stddev = self._array("renorm_stddev")
            clipping, eps = self.renorm_clipping, self.epsilon

            def correct(
                mean: np.ndarray, var: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
                return renorm_correction(
                    mean,
                    var,
                    renorm_mean,
                    renorm_stddev,
                    epsilon=eps,
                    clipping=clipping,
                )

        kept = self.axis % x.ndim
        y, cache = _renorm_forward(
            x,
            gamma,
            beta,
            kept,
            self.epsilon,
            self.virtual_batch_size,
            correct,
        )
        keep = self.momentum
        mean, variance = (
            self._array("moving_mean"),
            self._array("moving_variance"),
        )
        mean[...] = mean * keep + cache.mean * (1.0 - keep)
        if not self.renorm:
            variance[...] = variance * keep + cache.var * (1.0 - keep)
            return y, cache
        eps_t = cache.var.dtype.type(self.epsilon)
        stddev = np.sqrt(cache.var + eps_t)
        fast = self.renorm_momentum
        r_mean, r_std = (
            self._array("renorm_mean"),
            self._array("renorm_stddev"),
        )
        r_mean[...] = r_mean * fast + cache.mean * (1.0 - fast)
        r_std[...] = r_std * fast + stddev * (1.0 - fast)
        m_std = self._array("moving_stddev")
        m_std[...] = m_std * keep + stddev * (1.0 - keep)
        variance[...] = np.maximum(m_std * m_std - eps_t, 0)
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
        if isinstance(cache, RenormCache):
            return cache.x_shape
        return tuple(cache.x_hat.shape)

    def _backward(
        self,
        dy: np.ndarray,
        cache: BatchNormCache | RenormCache | _InferenceCache,
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
        elif isinstance(cache, RenormCache):  # r, d held constant
            dx, dgamma, dbeta = _renorm_backward(dy, cache)
        else:  # batchnorm_backward's arithmetic; backward() checked dy
            dy = dy.astype(cache.x_hat.dtype, copy=False)
            dx, dgamma, dbeta = _fast_bn.training_backward(dy, cache)
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

        The file holds the arrays of
        :meth:`~companion.base.Layer.get_weights` under their names,
        ``format_version`` and ``config`` (the constructor's arguments and
        the arrays' dtype, as JSON) -- plain arrays, read without pickle.
        ``.npz`` is appended to a path without it, as ``np.savez`` does.
        With ``renorm=True`` the file also holds ``moving_stddev``,
        ``renorm_mean`` and ``renorm_stddev``, and the config the options
        of chapter 16 that are set.
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


class _PerExampleNorm(Layer):
    """What :class:`LayerNorm` and :class:`GroupNorm` share.

    ``gamma`` and ``beta`` only, no moving statistics: training and
    inference compute the same thing, and ``backward`` differentiates the
    last call whatever its mode.
    """

    _name = ""

    def __init__(self, epsilon: float, center: bool, scale: bool) -> None:
        super().__init__()
        self.epsilon = check_epsilon(epsilon)
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
        self.gamma: np.ndarray | None = None
        self.beta: np.ndarray | None = None
        self._param_shape: tuple[int, ...] | None = None
        self._dtype = np.dtype(np.float32)

    def weight_names(self) -> list[str]:
        """gamma, beta (Keras's order), where the layer has them."""
        return [
            name
            for name, present in (("gamma", self.scale), ("beta", self.center))
            if present
        ]

    def _build(self, input_shape: tuple[int, ...], dtype: np.dtype) -> None:
        shape = self._shape_for(input_shape)
        self._param_shape = shape
        self._dtype = np.dtype(dtype)
        self.gamma = np.ones(shape, dtype) if self.scale else None
        self.beta = np.zeros(shape, dtype) if self.center else None
        self._grads = {}
        self._cache = None
        self._built = True

    def _shape_for(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def _check_input(self, x: np.ndarray, training: bool = False) -> None:
        shape = self._shape_for(tuple(x.shape))  # raises for a bad x
        if self._param_shape is not None and shape != self._param_shape:
            raise ValueError(
                f"x of shape {x.shape} needs parameters of shape {shape}, "
                f"but this {self._name} was built for {self._param_shape}; "
                f"use a new {self._name} layer"
            )

    def _params(self) -> tuple[np.ndarray, np.ndarray]:
        shape = self._param_shape
        if shape is None:
            raise ValueError(f"this {self._name} is not built")
        dtype = self._dtype
        gamma = np.ones(shape, dtype) if self.gamma is None else self.gamma
        beta = np.zeros(shape, dtype) if self.beta is None else self.beta
        return gamma, beta

    def _cache_output_shape(self) -> tuple[int, ...]:
        return tuple(self._cache.x_shape)

    def _backward(
        self, dy: np.ndarray, cache: PerExampleCache
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        backward = (
            layernorm_backward
            if cache.method == "layernorm"
            else groupnorm_backward
        )
        dx, dgamma, dbeta = backward(dy, cache)
        grads = {"gamma": dgamma, "beta": dbeta}
        return dx, {name: grads[name] for name in self.trainable_names()}


class LayerNorm(_PerExampleNorm):
    r"""Layer normalization, Keras's ``LayerNormalization``.

    :math:`y = \gamma \hat x + \beta`, each example standardized over
    ``axis`` (:func:`companion.per_example.layernorm_forward`): no batch
    statistics, no moving averages, the same output in training and
    inference, for any batch size.  Chapter 16, *Alternatives*.

    Parameters
    ----------
    axis : int or sequence of ints
        The axes normalized within each example (not 0); ``gamma`` and
        ``beta`` have their shape.
    epsilon : float > 0
    center, scale : bool
        Whether the layer has ``beta`` / ``gamma``.

    Examples
    --------
    >>> layer = LayerNorm()
    >>> layer(np.array([[1.0, 3.0], [10.0, 30.0]])).round(4)
    array([[-0.9995,  0.9995],
           [-1.    ,  1.    ]])
    """

    _name = "LayerNorm"

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
    ) -> None:
        super().__init__(epsilon, center, scale)
        if isinstance(axis, Sequence) and not isinstance(axis, (str, bytes)):
            self.axis: int | list[int] = [
                check_int(a, "axis entry") for a in axis
            ]
            if not self.axis:
                raise ValueError(
                    "axis must name at least one axis; received []"
                )
        else:
            self.axis = check_int(axis, "axis")

    def __repr__(self) -> str:
        return (
            f"LayerNorm(axis={self.axis}, epsilon={self.epsilon}, "
            f"center={self.center}, scale={self.scale})"
        )

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments."""
        return {
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
        }

    def _shape_for(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) < 2:
            raise ValueError(
                f"x must have rank >= 2 (a batch axis and a feature axis); "
                f"received shape {input_shape}"
            )
        axes = _layer_axes(self.axis, len(input_shape))
        shape = tuple(input_shape[a] for a in axes)
        if int(np.prod(shape)) < 2:
            raise ValueError(
                f"LayerNorm(axis={self.axis}) on x of shape {input_shape} "
                "normalizes 1 value per example; expected at least 2"
            )
        return shape

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, PerExampleCache]:
        gamma, beta = self._params()
        return layernorm_forward(
            x,
            gamma,
            beta,
            axis=self.axis,
            epsilon=self.epsilon,
            check_finite=False,  # a diverged run propagates NaN
        )


class GroupNorm(_PerExampleNorm):
    r"""Group normalization, Keras's ``GroupNormalization``.

    The channels on ``axis`` form ``groups`` contiguous groups; each
    example is standardized over each group and every position
    (:func:`companion.per_example.groupnorm_forward`), then
    :math:`y = \gamma \hat x + \beta` per channel.  ``groups=1`` is layer
    norm over all of an example, ``groups=C`` instance norm.  Chapter 16,
    *Alternatives*.

    Parameters
    ----------
    groups : int >= 1
        Must divide the number of channels (Keras's default is 32).
    axis : int
        The channel axis (not 0).
    epsilon : float > 0
    center, scale : bool
        Whether the layer has ``beta`` / ``gamma``, of shape (C,).

    Examples
    --------
    >>> layer = GroupNorm(groups=2)
    >>> layer(np.array([[1.0, 3.0, 10.0, 30.0]])).round(4)
    array([[-0.9995,  0.9995, -1.    ,  1.    ]])
    """

    _name = "GroupNorm"

    def __init__(
        self,
        groups: int = 32,
        axis: int = -1,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
    ) -> None:
        super().__init__(epsilon, center, scale)
        self.groups = check_int(groups, "groups", low=1)
        self.axis = check_int(axis, "axis")

    def __repr__(self) -> str:
        return (
            f"GroupNorm(groups={self.groups}, axis={self.axis}, "
            f"epsilon={self.epsilon}, center={self.center}, "
            f"scale={self.scale})"
        )

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments."""
        return {
            "groups": self.groups,
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
        }

    def _shape_for(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) < 2:
            raise ValueError(
                f"x must have rank >= 2 (a batch axis and a channel axis); "
                f"received shape {input_shape}"
            )
        kept = channel_axis(self.axis, len(input_shape))
        if kept == 0:
            raise ValueError(
                f"axis={self.axis} is the batch axis; group norm needs the "
                "channel axis"
            )
        channels = input_shape[kept]
        if channels % self.groups:
            raise ValueError(
                f"groups={self.groups} does not divide the {channels} "
                f"channels on axis {self.axis} (x of shape {input_shape}); "
                f"expected a divisor of {channels}"
            )
        per_group = (
            int(np.prod(input_shape[1:])) // self.groups
        )  # values per group and example
        if per_group < 2:
            raise ValueError(
                f"GroupNorm(groups={self.groups}) on x of shape "
                f"{input_shape} normalizes 1 value per group; expected at "
                "least 2"
            )
        return (channels,)

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, PerExampleCache]:
        gamma, beta = self._params()
        return groupnorm_forward(
            x,
            gamma,
            beta,
            groups=self.groups,
            axis=self.axis,
            epsilon=self.epsilon,
            check_finite=False,  # a diverged run propagates NaN
        )


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
    position).  With ``renorm=True`` the renorm statistics and
    ``moving_stddev`` are restored too.
    """
    saved = [
        (layer, name, layer._array(name).copy())
        for layer in batchnorm_layers(model)
        if layer.built
        for name in layer.weight_names()
        if name not in layer.trainable_names()
    ]
    try:
        yield
    finally:
        for layer, name, values in saved:
            getattr(layer, name)[...] = values
