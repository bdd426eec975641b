"""Batch normalization as stateless functions (the paper's Algorithms 1, 2).

The contract is CS231n's: ``batchnorm_forward`` returns the output and a
cache, ``batchnorm_backward(dy, cache)`` returns the gradients.  ``axis`` is
the feature (channel) axis that is *kept*, as in Keras: statistics are taken
over every other axis.  ``axis=-1`` normalizes (N, D) and NHWC inputs,
``axis=1`` NCHW ones; any rank >= 2 works.  In inference mode batch norm is
a fixed affine map: ``batchnorm_inference`` computes it and
``batchnorm_inference_backward`` differentiates it (a network whose batch
norm layers are frozen trains through it).

Dtypes: floating inputs keep their dtype; integer inputs are cast to
float64.  16-bit floats (float16, ``ml_dtypes.bfloat16``) are computed in
float32 and the result is cast back, as Keras does.

Non-finite input: a NaN or an infinity in a channel of ``x`` makes that
channel's mean or variance non-finite, so every output of *that channel* is
NaN; the other channels are unaffected (an infinity makes numpy warn
"invalid value" when it is centered).  Nothing is raised for ``x``: checking
would cost a pass over the data, and frameworks do not check either.  In
inference mode the statistics are fixed, so a non-finite input only affects
its own output.  The per-channel arguments (``gamma``, ``beta``, the moving
statistics) are checked: a NaN or an infinity there is a ``ValueError``
unless ``check_finite=False`` (the layer passes that: a diverged training
run then propagates NaN, as frameworks do).  The tests pin this behavior.

The functional forms of chapters 16 and 17 are re-exported here, so that
every normalization is ``companion.functional.<name>``: layer and group
norm (:mod:`companion.per_example`), batch renormalization and ghost
batches (:mod:`companion.batch_renorm`), and the merge of per-device
statistics (:mod:`companion.moments`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from companion._reduce import channel_mean as _channel_mean
from companion._reduce import channel_sum as _channel_sum
from companion._validation import (
    as_float_array,
    check_channel_vector,
    check_epsilon,
    check_normalizable,
    check_training_count,
    compute_dtype,
    describe,
)
from companion.batch_renorm import (
    RenormCache,
    batch_renorm_backward,
    batch_renorm_forward,
    ghost_batchnorm_backward,
    ghost_batchnorm_forward,
    renorm_correction,
)
from companion.moments import merge_moments, merge_power_sums
from companion.per_example import (
    PerExampleCache,
    groupnorm_backward,
    groupnorm_forward,
    layernorm_backward,
    layernorm_forward,
)

__all__ = [
    "BatchNormCache",
    "PerExampleCache",
    "RenormCache",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_staged",
    "batchnorm_forward",
    "batchnorm_inference",
    "batchnorm_inference_backward",
    "ghost_batchnorm_backward",
    "ghost_batchnorm_forward",
    "groupnorm_backward",
    "groupnorm_forward",
    "layernorm_backward",
    "layernorm_forward",
    "merge_moments",
    "merge_power_sums",
    "renorm_correction",
]


class BatchNormCache(NamedTuple):
    """What the training-mode forward pass keeps for the backward pass.

    Per-channel arrays are stored with the input's rank and size 1 on the
    reduced axes (``keepdims``), so they broadcast against ``x`` directly.
    Everything is in the compute dtype (float32 for 16-bit inputs).
    """

    x_centered: np.ndarray
    """x - mu_B."""
    x_hat: np.ndarray
    """(x - mu_B) / sqrt(var_B + epsilon)."""
    mean: np.ndarray
    """The batch mean of every channel, shape (C,)."""
    var: np.ndarray
    """The biased batch variance of every channel, shape (C,)."""
    inv_std: np.ndarray
    """1 / sqrt(var_B + epsilon), broadcastable against x."""
    gamma: np.ndarray
    """The scale, broadcastable against x."""
    epsilon: float
    axis: int
    """The kept channel axis, non-negative."""
    reduce_axes: tuple[int, ...]
    """The axes the statistics are taken over."""
    x_dtype: np.dtype
    gamma_dtype: np.dtype
    beta_dtype: np.dtype

    # A property named like tuple.count: m is what the book calls it.
    @property
    def count(self) -> int:  # type: ignore[override]
        """The number m of values each channel's statistics are taken over."""
        return int(self.x_hat.size // self.x_hat.shape[self.axis])


class _Prepared(NamedTuple):
    """The checked common arguments of the functions below."""

    x: np.ndarray
    params: dict[str, np.ndarray]
    """The per-channel arrays by name, each of shape (C,)."""
    kept: int
    """The channel axis, non-negative."""
    reduce_axes: tuple[int, ...]
    shape: tuple[int, ...]
    """The broadcast shape of a per-channel array."""
    epsilon: float


def _prepare(
    x: object,
    params: dict[str, object],
    axis: object,
    epsilon: object,
    check_finite: bool,
) -> _Prepared:
    """Check the common arguments (before any computation)."""
    x_array = as_float_array(x, "x")
    kept = check_normalizable(x_array, axis)
    channels = x_array.shape[kept]
    checked = {
        name: check_channel_vector(value, name, channels, finite=check_finite)
        for name, value in params.items()
    }
    variance = checked.get("moving_variance")
    if variance is not None and np.any(variance < 0):
        raise ValueError(
            "moving_variance must be >= 0 in every channel; received "
            f"minimum {float(variance.min())!r}"
        )
    eps = check_epsilon(epsilon)
    reduce_axes = tuple(i for i in range(x_array.ndim) if i != kept)
    shape = tuple(channels if i == kept else 1 for i in range(x_array.ndim))
    return _Prepared(x_array, checked, kept, reduce_axes, shape, eps)


def batchnorm_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    *,
    axis: int = -1,
    epsilon: float = 1e-3,
    check_finite: bool = True,
) -> tuple[np.ndarray, BatchNormCache]:
    r"""Training-mode batch normalization (Algorithm 1 of Ioffe & Szegedy).

    For every channel, over the m values of the batch (and of the spatial
    positions, for convolutions):

    .. math::

        \mu_B = \frac{1}{m}\sum_i x_i, \qquad
        \sigma_B^2 = \frac{1}{m}\sum_i (x_i - \mu_B)^2, \qquad
        \hat x_i = \frac{x_i - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}, \qquad
        y_i = \gamma \hat x_i + \beta .

    The variance is computed by the two-pass formula (center first, then
    square); :math:`E[x^2] - E[x]^2` loses every digit when the mean is
    large compared with the spread.  Derived in chapter 2, *The forward
    pass*.

    Parameters
    ----------
    x : array of rank >= 2
        The batch; integer input is cast to float64.
    gamma, beta : arrays of shape (C,)
        Scale and shift, C = ``x.shape[axis]``.
    axis : int
        The kept channel axis; negative values count from the end.
    epsilon : float
        Added to the variance, > 0.
    check_finite : bool
        Refuse NaN and infinities in ``gamma`` and ``beta``.

    Returns
    -------
    y : ndarray
        Same shape and floating dtype as ``x``.
    cache : BatchNormCache
        Named intermediate values for :func:`batchnorm_backward`.

    Raises
    ------
    TypeError
        Non-numeric ``x``, ``gamma`` or ``beta``; a non-int ``axis``.
    ValueError
        Rank < 2, ``axis`` out of range, no channel or an empty batch,
        ``gamma``/``beta`` not of shape (C,) or not finite, ``epsilon``
        <= 0, or a single value per channel (m = 1: the batch variance is
        0 for every input and the output is just ``beta``).

    Examples
    --------
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, cache = batchnorm_forward(x, np.ones(2), np.zeros(2))
    >>> cache.mean, cache.var
    (array([ 2., 20.]), array([  1., 100.]))
    >>> y.round(4)
    array([[-0.9995, -1.    ],
           [ 0.9995,  1.    ]])
    """
    x, params, kept, reduce_axes, shape, eps = _prepare(
        x, {"gamma": gamma, "beta": beta}, axis, epsilon, check_finite
    )
    check_training_count(x, kept, axis)
    return _training_forward(
        x, params["gamma"], params["beta"], kept, reduce_axes, shape, eps
    )


def _training_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    kept: int,
    reduce_axes: tuple[int, ...],
    shape: tuple[int, ...],
    eps: float,
) -> tuple[np.ndarray, BatchNormCache]:
    """The arithmetic of :func:`batchnorm_forward`, on checked arguments.

    ``BatchNorm`` calls it directly: a layer has checked its input and
    owns its parameters, so it skips the checks, not the math.
    """
    dtype = compute_dtype(x.dtype)
    xc_in = x.astype(dtype, copy=False)
    gamma_b = gamma.astype(dtype).reshape(shape)
    beta_b = beta.astype(dtype).reshape(shape)

    mean = _channel_mean(xc_in, reduce_axes)
    x_centered = xc_in - mean
    var = _channel_mean(np.square(x_centered), reduce_axes)
    inv_std = 1.0 / np.sqrt(var + dtype.type(eps))
    x_hat = x_centered * inv_std
    y = gamma_b * x_hat + beta_b

    cache = BatchNormCache(
        x_centered=x_centered,
        x_hat=x_hat,
        mean=mean.reshape(-1),
        var=var.reshape(-1),
        inv_std=inv_std,
        gamma=gamma_b,
        epsilon=eps,
        axis=kept,
        reduce_axes=reduce_axes,
        x_dtype=x.dtype,
        gamma_dtype=gamma.dtype,
        beta_dtype=beta.dtype,
    )
    return y.astype(x.dtype, copy=False), cache


def _check_backward_args(dy: object, cache: object) -> np.ndarray:
    """dy must match the cached forward input; cache must be a cache."""
    if not isinstance(cache, BatchNormCache):
        raise TypeError(
            "cache must be the BatchNormCache returned by batchnorm_forward "
            f"(training mode); received {describe(cache)}. In inference mode "
            "batch norm is a fixed affine map and keeps no cache: "
            "differentiate it with batchnorm_inference_backward"
        )
    dy_array = as_float_array(dy, "dy")
    if dy_array.shape != cache.x_hat.shape:
        raise ValueError(
            "dy must have the shape of the forward output "
            f"{cache.x_hat.shape}; received shape {dy_array.shape}"
        )
    return dy_array.astype(cache.x_hat.dtype, copy=False)


def _cast_grads(
    dx: np.ndarray,
    dgamma: np.ndarray,
    dbeta: np.ndarray,
    cache: BatchNormCache,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients in the dtypes of their variables; dgamma, dbeta (C,)."""
    return (
        dx.astype(cache.x_dtype, copy=False),
        dgamma.reshape(-1).astype(cache.gamma_dtype, copy=False),
        dbeta.reshape(-1).astype(cache.beta_dtype, copy=False),
    )


def batchnorm_backward(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of batch normalization in closed form.

    With :math:`g = \partial L / \partial y` (``dy``), per channel over m
    values:

    .. math::

        \frac{\partial L}{\partial \beta} = \sum_i g_i, \qquad
        \frac{\partial L}{\partial \gamma} = \sum_i g_i \hat x_i, \qquad
        \frac{\partial L}{\partial x_i}
            = \frac{\gamma}{\sqrt{\sigma_B^2+\epsilon}}
            \left( g_i - \frac{1}{m}\frac{\partial L}{\partial \beta}
                   - \hat x_i \frac{1}{m}\frac{\partial L}{\partial \gamma}
            \right).

    The input gradient reuses the two parameter gradients and the cached
    :math:`\hat x` and :math:`1/\sqrt{\sigma_B^2+\epsilon}`; nothing of the
    forward pass is recomputed.  Derived by hand in chapter 3, *The
    backward pass*.

    Parameters
    ----------
    dy : array
        Upstream gradient, the shape of the forward output.
    cache : BatchNormCache
        From :func:`batchnorm_forward`.

    Returns
    -------
    dx : ndarray
        Shape and dtype of the forward input.
    dgamma, dbeta : ndarrays of shape (C,)
        In the dtypes of ``gamma`` and ``beta``.

    Examples
    --------
    A constant upstream gradient moves every output of a channel alike,
    which the normalization undoes: ``dx`` is 0.

    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    >>> _, cache = batchnorm_forward(x, np.ones(2), np.zeros(2))
    >>> dx, dgamma, dbeta = batchnorm_backward(np.ones((3, 2)), cache)
    >>> bool(np.abs(dx).max() < 1e-12), dbeta
    (True, array([3., 3.]))
    """
    return _training_backward(_check_backward_args(dy, cache), cache)


def _training_backward(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arithmetic of :func:`batchnorm_backward` (``dy`` checked and in
    the cache's dtype); ``BatchNorm`` calls it directly."""
    dbeta = _channel_sum(dy, cache.reduce_axes)
    dgamma = _channel_sum(dy * cache.x_hat, cache.reduce_axes)
    m = cache.count
    dx = (cache.gamma * cache.inv_std) * (
        dy - dbeta / m - cache.x_hat * (dgamma / m)
    )
    return _cast_grads(dx, dgamma, dbeta, cache)


def batchnorm_backward_staged(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of batch normalization, node by node through the graph.

    The forward pass as a graph of elementary operations, per channel::

        mu      = mean(x)                  (1) mean
        xc      = x - mu                   (2) center
        sq      = xc ** 2                  (3) square
        var     = mean(sq)                 (4) variance
        var_eps = var + epsilon            (5) +epsilon
        std     = sqrt(var_eps)            (6) sqrt
        inv_std = 1 / std                  (7) reciprocal
        x_hat   = xc * inv_std             (8) multiply
        scaled  = gamma * x_hat            (9) scale
        y       = scaled + beta            (10) shift

    Backpropagation visits the nodes in reverse, applying the chain rule
    locally; where a value fans out (``xc`` feeds nodes 3 and 8, ``x``
    feeds nodes 1 and 2) the incoming gradients add.  Slower than
    :func:`batchnorm_backward` and equal to it to rounding; it exists to be
    read.  Derived in chapter 3, *The backward pass*.

    Parameters and returns are those of :func:`batchnorm_backward`.
    """
    dy = _check_backward_args(dy, cache)
    axes, m = cache.reduce_axes, cache.count
    xc, x_hat = cache.x_centered, cache.x_hat
    inv_std, gamma = cache.inv_std, cache.gamma
    eps = inv_std.dtype.type(cache.epsilon)
    std = np.sqrt(cache.var.reshape(inv_std.shape) + eps)

    # (10) y = scaled + beta
    dbeta = _channel_sum(dy, axes)
    dscaled = dy
    # (9) scaled = gamma * x_hat
    dgamma = _channel_sum(dscaled * x_hat, axes)
    dx_hat = dscaled * gamma
    # (8) x_hat = xc * inv_std          -- first path into xc
    dxc = dx_hat * inv_std
    dinv_std = _channel_sum(dx_hat * xc, axes)
    # (7) inv_std = 1 / std
    dstd = -dinv_std / std**2
    # (6) std = sqrt(var_eps)
    dvar_eps = dstd / (2.0 * std)
    # (5) var_eps = var + epsilon
    dvar = dvar_eps
    # (4) var = mean(sq)
    dsq = np.broadcast_to(dvar / m, xc.shape)
    # (3) sq = xc ** 2                  -- second path into xc
    dxc = dxc + 2.0 * xc * dsq
    # (2) xc = x - mu                   -- first path into x
    dx = dxc
    dmu = -_channel_sum(dxc, axes)
    # (1) mu = mean(x)                  -- second path into x
    dx = dx + np.broadcast_to(dmu / m, xc.shape)
    return _cast_grads(dx, dgamma, dbeta, cache)


def batchnorm_inference(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    moving_mean: np.ndarray,
    moving_variance: np.ndarray,
    *,
    axis: int = -1,
    epsilon: float = 1e-3,
    check_finite: bool = True,
) -> np.ndarray:
    r"""Inference-mode batch normalization (Algorithm 2, step 11).

    .. math::

        y = \gamma \, \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x]
            + \epsilon}} + \beta

    where E[x] and Var[x] are ``moving_mean`` and ``moving_variance`` (the
    paper uses the population statistics; Keras and this package use
    exponential moving averages, chapter 4).  Every example is transformed
    independently of the rest of the batch, so a single example (m = 1) is
    fine.  Derived in chapter 4, *Training versus inference*.

    Parameters
    ----------
    x : array of rank >= 2
    gamma, beta, moving_mean, moving_variance : arrays of shape (C,)
        ``moving_variance`` must be >= 0.
    axis, epsilon, check_finite
        As in :func:`batchnorm_forward`.

    Returns
    -------
    y : ndarray
        Same shape and floating dtype as ``x``.  No cache: this is a fixed
        affine map; :func:`batchnorm_inference_backward` differentiates it.

    Examples
    --------
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> batchnorm_inference(
    ...     x, np.ones(2), np.zeros(2), np.array([2.0, 20.0]),
    ...     np.array([1.0, 100.0]), epsilon=1e-3,
    ... ).round(4)
    array([[-0.9995, -1.    ],
           [ 0.9995,  1.    ]])
    """
    x, params, _, _, shape, eps = _prepare(
        x,
        {
            "gamma": gamma,
            "beta": beta,
            "moving_mean": moving_mean,
            "moving_variance": moving_variance,
        },
        axis,
        epsilon,
        check_finite,
    )
    dtype = compute_dtype(x.dtype)
    mean, var, gamma_b, beta_b = (
        params[name].astype(dtype).reshape(shape)
        for name in ("moving_mean", "moving_variance", "gamma", "beta")
    )
    x_in = x.astype(dtype, copy=False)
    y = gamma_b * ((x_in - mean) / np.sqrt(var + dtype.type(eps))) + beta_b
    result: np.ndarray = y.astype(x.dtype, copy=False)
    return result


def batchnorm_inference_backward(
    dy: np.ndarray,
    x: np.ndarray,
    gamma: np.ndarray,
    moving_mean: np.ndarray,
    moving_variance: np.ndarray,
    *,
    axis: int = -1,
    epsilon: float = 1e-3,
    check_finite: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of inference-mode batch normalization (a fixed affine map).

    With the statistics fixed, :math:`y = \gamma \hat x + \beta` with
    :math:`\hat x = (x - \mathrm{E}[x]) / \sqrt{\mathrm{Var}[x] +
    \epsilon}` is affine in ``x`` and nothing couples the examples, so with
    :math:`g = \partial L / \partial y` (``dy``):

    .. math::

        \frac{\partial L}{\partial x_i}
            = \frac{\gamma}{\sqrt{\mathrm{Var}[x] + \epsilon}} \, g_i,
        \qquad
        \frac{\partial L}{\partial \gamma} = \sum_i g_i \hat x_i, \qquad
        \frac{\partial L}{\partial \beta} = \sum_i g_i .

    This is how a network whose batch norm is frozen (fine-tuning;
    ``trainable=False`` in Keras) trains.  Unlike
    :func:`batchnorm_backward`, ``dx`` has no terms through the batch
    statistics.  Chapter 4, *Training versus inference*.

    Parameters
    ----------
    dy : array
        The upstream gradient, the shape of ``x``.
    x, gamma, moving_mean, moving_variance, axis, epsilon, check_finite
        The arguments of the :func:`batchnorm_inference` call (``beta``
        does not enter the gradients).

    Returns
    -------
    dx : ndarray
        Shape and dtype of ``x``.
    dgamma, dbeta : ndarrays of shape (C,)
        In the dtype of ``gamma``.

    Examples
    --------
    >>> x, dy = np.array([[1.0, 10.0], [3.0, 30.0]]), np.ones((2, 2))
    >>> dx, dgamma, dbeta = batchnorm_inference_backward(
    ...     dy, x, np.array([2.0, 1.0]), np.zeros(2), np.full(2, 4.0),
    ...     epsilon=1e-12,
    ... )
    >>> dx, dgamma, dbeta
    (array([[1. , 0.5],
           [1. , 0.5]]), array([ 2., 20.]), array([2., 2.]))
    """
    x, params, _, reduce_axes, shape, eps = _prepare(
        x,
        {
            "gamma": gamma,
            "moving_mean": moving_mean,
            "moving_variance": moving_variance,
        },
        axis,
        epsilon,
        check_finite,
    )
    dy_array = as_float_array(dy, "dy")
    if dy_array.shape != x.shape:
        raise ValueError(
            f"dy must have the shape of x, {x.shape}; received shape "
            f"{dy_array.shape}"
        )
    dtype = compute_dtype(x.dtype)
    mean, var, gamma_b = (
        params[name].astype(dtype).reshape(shape)
        for name in ("moving_mean", "moving_variance", "gamma")
    )
    g = dy_array.astype(dtype, copy=False)
    std = np.sqrt(var + dtype.type(eps))
    x_hat = (x.astype(dtype, copy=False) - mean) / std
    dbeta = _channel_sum(g, reduce_axes)
    dgamma = _channel_sum(g * x_hat, reduce_axes)
    dx = (gamma_b / std) * g
    param_dtype = params["gamma"].dtype
    return (
        dx.astype(x.dtype, copy=False),
        dgamma.reshape(-1).astype(param_dtype, copy=False),
        dbeta.reshape(-1).astype(param_dtype, copy=False),
    )
