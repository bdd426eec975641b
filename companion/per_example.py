r"""Normalization within each example: layer norm and group norm (chapter 16).

Batch norm standardizes each channel over the batch, so an example's
output depends on the other examples of its batch, and the statistics of a
batch of two are noise.  Layer norm (Ba, Kiros and Hinton, 2016) and group
norm (Wu and He, 2018) take the statistics *within one example* instead:

* **layer norm** standardizes every example over the ``axis`` (or axes)
  it is given -- ``axis=-1``: over the D features of an (N, D) input, over
  the C channels at every position of an NHWC input, as
  ``keras.layers.LayerNormalization``;
* **group norm** splits the C channels on ``axis`` into ``groups``
  contiguous groups of C / G channels and standardizes every example over
  each group *and every position* (H, W), as
  ``keras.layers.GroupNormalization``.  ``groups=1`` is layer norm over
  (H, W, C) in Wu and He's sense; ``groups=C`` is instance norm (Ulyanov et
  al., 2016).

Then each output is scaled and shifted, :math:`y = \gamma \hat x + \beta`,
with ``gamma`` and ``beta`` of the shape of the normalized axes (layer
norm) or of shape (C,) (group norm).  Training and inference compute the
same thing: there are no moving statistics.

The contract is batch norm's (:mod:`companion.functional`): ``forward``
returns the output and a cache, ``backward(dy, cache)`` returns ``dx``,
``dgamma``, ``dbeta``.  Dtypes: 16-bit floats are computed in float32 and
cast back; integer input is cast to float64.  Chapter 16 derives the
gradient, which is batch norm's with the sums taken within each example
(``companion._standardize``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from companion._reduce import channel_sum
from companion._standardize import standardize, standardize_backward
from companion._validation import (
    as_float_array,
    channel_axis,
    check_epsilon,
    check_int,
    check_rank,
    compute_dtype,
    describe,
)
from companion._validation import check_finite as require_finite

__all__ = [
    "PerExampleCache",
    "groupnorm_backward",
    "groupnorm_forward",
    "layernorm_backward",
    "layernorm_forward",
]


class PerExampleCache(NamedTuple):
    """What :func:`layernorm_forward` and :func:`groupnorm_forward` keep.

    Arrays live in the *work shape*: the input's shape, with the channel
    axis split into (groups, channels per group) for group norm.
    """

    method: str
    """``"layernorm"`` or ``"groupnorm"``: which backward it belongs to."""
    x_hat: np.ndarray
    """The standardized input, in the work shape and the compute dtype."""
    inv_std: np.ndarray
    """1 / sqrt(var + epsilon) per example (and group), keepdims."""
    gamma: np.ndarray
    """The scale, broadcastable against ``x_hat``."""
    stat_axes: tuple[int, ...]
    """The axes of the work shape the statistics are taken over."""
    param_axes: tuple[int, ...]
    """The axes of the work shape ``gamma`` and ``beta`` extend along."""
    x_shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    x_dtype: np.dtype
    gamma_dtype: np.dtype
    beta_dtype: np.dtype

    @property
    def count(self) -> int:  # type: ignore[override]
        """The number m of values each mean and variance is taken over."""
        return int(np.prod([self.x_hat.shape[i] for i in self.stat_axes]))


def _check_param(
    value: object, name: str, shape: tuple[int, ...], finite: bool
) -> np.ndarray:
    array = as_float_array(value, name)
    if array.shape != shape:
        raise ValueError(
            f"{name} must have shape {shape}, the shape of the normalized "
            f"axes; received shape {array.shape}"
        )
    return require_finite(array, name) if finite else array


def _check_x(x: object) -> np.ndarray:
    x_array = as_float_array(x, "x")
    check_rank(x_array)
    if x_array.size == 0:
        raise ValueError(
            f"x of shape {x_array.shape} is empty; expected at least one "
            "example with at least one value"
        )
    return x_array


def _check_count(count: int, what: str, shape: tuple[int, ...]) -> None:
    if count < 2:
        raise ValueError(
            f"Expected more than 1 value per {what}; received x of shape "
            f"{shape}, which leaves {count} (the variance of one value is 0 "
            "for every input and the output would be just beta)"
        )


def _layer_axes(axis: object, ndim: int) -> tuple[int, ...]:
    """``axis`` (an int or a sequence of ints) as sorted non-negative axes."""
    if isinstance(axis, Sequence) and not isinstance(axis, (str, bytes)):
        items = list(axis)
        if not items:
            raise ValueError(
                "axis must name at least one axis; received an empty "
                f"{type(axis).__name__}"
            )
    else:
        items = [axis]
    axes = [channel_axis(item, ndim) for item in items]
    if len(set(axes)) != len(axes):
        raise ValueError(
            f"axis must name each axis once; received {describe(axis)} "
            f"(axes {axes} for an input of rank {ndim})"
        )
    if 0 in axes:
        raise ValueError(
            f"axis={describe(axis)} includes axis 0, the batch axis; layer "
            "norm normalizes within each example, over axes 1 to "
            f"{ndim - 1} (batch norm normalizes over the batch)"
        )
    return tuple(sorted(axes))


def _finish(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    work: np.ndarray,
    method: str,
    stat_axes: tuple[int, ...],
    param_axes: tuple[int, ...],
    eps: float,
) -> tuple[np.ndarray, PerExampleCache]:
    """Standardize ``work`` over ``stat_axes``, scale and shift."""
    dtype = work.dtype
    bshape = tuple(
        work.shape[i] if i in param_axes else 1 for i in range(work.ndim)
    )
    gamma_b = gamma.astype(dtype).reshape(bshape)
    beta_b = beta.astype(dtype).reshape(bshape)
    x_hat, inv_std, _, _ = standardize(work, stat_axes, eps)
    y = (gamma_b * x_hat + beta_b).reshape(x.shape)
    cache = PerExampleCache(
        method=method,
        x_hat=x_hat,
        inv_std=inv_std,
        gamma=gamma_b,
        stat_axes=stat_axes,
        param_axes=param_axes,
        x_shape=tuple(x.shape),
        param_shape=tuple(gamma.shape),
        x_dtype=x.dtype,
        gamma_dtype=gamma.dtype,
        beta_dtype=beta.dtype,
    )
    return y.astype(x.dtype, copy=False), cache


def _backward(
    dy: object, cache: object, method: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dx, dgamma, dbeta of either normalization, from its cache."""
    forward = f"{method}_forward"
    if not isinstance(cache, PerExampleCache) or cache.method != method:
        raise TypeError(
            f"cache must be the cache returned by {forward}; received "
            f"{describe(cache)}"
        )
    dy_array = as_float_array(dy, "dy")
    if dy_array.shape != cache.x_shape:
        raise ValueError(
            f"dy must have the shape of the forward output {cache.x_shape}; "
            f"received shape {dy_array.shape}"
        )
    x_hat = cache.x_hat
    g = dy_array.astype(x_hat.dtype, copy=False).reshape(x_hat.shape)
    outer = tuple(i for i in range(x_hat.ndim) if i not in cache.param_axes)
    dbeta = channel_sum(g, outer)
    dgamma = channel_sum(g * x_hat, outer)
    dx = standardize_backward(
        g * cache.gamma, x_hat, cache.inv_std, cache.stat_axes
    )
    return (
        dx.reshape(cache.x_shape).astype(cache.x_dtype, copy=False),
        dgamma.reshape(cache.param_shape).astype(
            cache.gamma_dtype, copy=False
        ),
        dbeta.reshape(cache.param_shape).astype(cache.beta_dtype, copy=False),
    )


def layernorm_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-3,
    check_finite: bool = True,
) -> tuple[np.ndarray, PerExampleCache]:
    r"""Layer normalization (Ba et al. 2016), Keras's ``LayerNormalization``.

    For every example :math:`n` (and every position on the axes that are
    not normalized), over the :math:`m` values :math:`x_{n,i}` of the
    normalized ``axis``:

    .. math::

        \mu_n = \frac{1}{m}\sum_i x_{n,i}, \quad
        \sigma_n^2 = \frac{1}{m}\sum_i (x_{n,i} - \mu_n)^2, \quad
        y_{n,i} = \gamma_i \frac{x_{n,i} - \mu_n}{\sqrt{\sigma_n^2 +
        \epsilon}} + \beta_i .

    No statistic crosses examples: the output of an example does not
    depend on the rest of the batch, and a batch of one is fine.  Derived
    in chapter 16, *Alternatives*.

    Parameters
    ----------
    x : array of rank >= 2
        The batch (axis 0).
    gamma, beta : arrays
        Of shape ``tuple(x.shape[a] for a in sorted(axis))``.
    axis : int or sequence of ints
        The axes normalized within each example; not 0.
    epsilon : float > 0
    check_finite : bool
        Refuse NaN and infinities in ``gamma`` and ``beta`` (the layers
        pass False: a diverged run propagates NaN).

    Returns
    -------
    y : ndarray
        Shape and floating dtype of ``x``.
    cache : PerExampleCache
        For :func:`layernorm_backward`.

    Raises
    ------
    TypeError, ValueError
        Non-numeric input, rank < 2, an axis out of range, repeated or 0,
        ``gamma``/``beta`` of the wrong shape or not finite, ``epsilon``
        <= 0, or a single value per example on the normalized axes.

    Examples
    --------
    >>> y, cache = layernorm_forward(
    ...     np.array([[1.0, 3.0], [10.0, 30.0]]), np.ones(2), np.zeros(2)
    ... )
    >>> y.round(4)
    array([[-0.9995,  0.9995],
           [-1.    ,  1.    ]])
    """
    x_array = _check_x(x)
    axes = _layer_axes(axis, x_array.ndim)
    shape = tuple(x_array.shape[a] for a in axes)
    gamma_a = _check_param(gamma, "gamma", shape, check_finite)
    beta_a = _check_param(beta, "beta", shape, check_finite)
    eps = check_epsilon(epsilon)
    _check_count(
        int(np.prod(shape)), f"example on axis={describe(axis)}", x_array.shape
    )
    work = x_array.astype(compute_dtype(x_array.dtype), copy=False)
    return _finish(
        x_array, gamma_a, beta_a, work, "layernorm", axes, axes, eps
    )


def layernorm_backward(
    dy: np.ndarray, cache: PerExampleCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of layer normalization.

    With :math:`g = \partial L/\partial y` and the sums over the :math:`m`
    normalized values of one example:

    .. math::

        \frac{\partial L}{\partial x_i} = \frac{1}{\sqrt{\sigma_n^2 +
        \epsilon}} \Bigl( \gamma_i g_i - \frac{1}{m}\sum_j \gamma_j g_j
        - \hat x_i \frac{1}{m}\sum_j \gamma_j g_j \hat x_j \Bigr),

    batch norm's formula with :math:`\gamma` inside the sums (it varies
    over the normalized values here, it is constant there); the parameter
    gradients sum over the batch: :math:`\partial L/\partial \gamma_i =
    \sum_n g_{n,i} \hat x_{n,i}`, :math:`\partial L/\partial \beta_i =
    \sum_n g_{n,i}`.  Derived in chapter 16.

    Returns
    -------
    dx : ndarray
        Shape and dtype of the forward input.
    dgamma, dbeta : ndarrays
        The shapes and dtypes of ``gamma`` and ``beta``.
    """
    return _backward(dy, cache, "layernorm")


def groupnorm_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    *,
    groups: int,
    axis: int = -1,
    epsilon: float = 1e-3,
    check_finite: bool = True,
) -> tuple[np.ndarray, PerExampleCache]:
    r"""Group normalization (Wu and He 2018), Keras's ``GroupNormalization``.

    The C channels on ``axis`` form ``groups`` contiguous groups of C / G
    (channel c is in group c // (C / G)).  For every example :math:`n` and
    group :math:`g`, over the :math:`m` = (C / G) x H x W values of that
    group at every position:

    .. math::

        \mu_{n,g} = \frac{1}{m}\sum_{i \in g} x_{n,i}, \quad
        \sigma_{n,g}^2 = \frac{1}{m}\sum_{i \in g} (x_{n,i} - \mu_{n,g})^2,
        \quad
        y_{n,i} = \gamma_c \frac{x_{n,i} - \mu_{n,g}}{\sqrt{\sigma_{n,g}^2
        + \epsilon}} + \beta_c ,

    with :math:`c` the channel of value :math:`i`.  ``groups=1`` is layer
    norm over every axis but the batch; ``groups=C`` is instance norm.
    Derived in chapter 16, *Alternatives*.

    Parameters
    ----------
    x : array of rank >= 2
        The batch (axis 0).
    gamma, beta : arrays of shape (C,)
    groups : int >= 1
        Must divide C = ``x.shape[axis]``.
    axis : int
        The channel axis; not 0.
    epsilon : float > 0
    check_finite : bool
        As in :func:`layernorm_forward`.

    Returns
    -------
    y : ndarray
        Shape and floating dtype of ``x``.
    cache : PerExampleCache
        For :func:`groupnorm_backward`.

    Raises
    ------
    TypeError, ValueError
        As :func:`layernorm_forward`, and ``groups`` not an int >= 1 or
        not dividing C, or a single value per group.

    Examples
    --------
    Two groups of two channels, one example:

    >>> x = np.array([[1.0, 3.0, 10.0, 30.0]])
    >>> y, _ = groupnorm_forward(x, np.ones(4), np.zeros(4), groups=2)
    >>> y.round(4)
    array([[-0.9995,  0.9995, -1.    ,  1.    ]])
    """
    x_array = _check_x(x)
    kept = channel_axis(axis, x_array.ndim)
    if kept == 0:
        raise ValueError(
            f"axis={axis} is the batch axis; group norm needs the channel "
            f"axis, one of 1 to {x_array.ndim - 1} (usually -1)"
        )
    channels = x_array.shape[kept]
    count = check_int(groups, "groups", low=1)
    if channels % count:
        raise ValueError(
            f"groups={groups} does not divide the {channels} channels on "
            f"axis {axis} (x of shape {x_array.shape}); expected a divisor "
            f"of {channels}"
        )
    gamma_a = _check_param(gamma, "gamma", (channels,), check_finite)
    beta_a = _check_param(beta, "beta", (channels,), check_finite)
    eps = check_epsilon(epsilon)
    per_group = channels // count
    work_shape = (
        *x_array.shape[:kept],
        count,
        per_group,
        *x_array.shape[kept + 1 :],
    )
    stat_axes = tuple(
        i for i in range(1, len(work_shape)) if i != kept
    )  # all but the batch and the group axis
    _check_count(
        int(np.prod([work_shape[i] for i in stat_axes])),
        f"group (groups={groups})",
        x_array.shape,
    )
    work = x_array.astype(compute_dtype(x_array.dtype), copy=False)
    return _finish(
        x_array,
        gamma_a,
        beta_a,
        work.reshape(work_shape),
        "groupnorm",
        stat_axes,
        (kept, kept + 1),
        eps,
    )


def groupnorm_backward(
    dy: np.ndarray, cache: PerExampleCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of group normalization.

    Layer norm's gradient (:func:`layernorm_backward`) with the sums taken
    over each group of each example, :math:`\gamma_c` the scale of the
    channel of each value; :math:`\partial L/\partial \gamma_c =
    \sum_{n,h,w} g\,\hat x` and :math:`\partial L/\partial \beta_c =
    \sum_{n,h,w} g` over the batch and the positions.  Derived in chapter
    16.

    Returns
    -------
    dx : ndarray
        Shape and dtype of the forward input.
    dgamma, dbeta : ndarrays of shape (C,)
        In the dtypes of ``gamma`` and ``beta``.
    """
    return _backward(dy, cache, "groupnorm")
