r"""Batch norm for small batches: batch renormalization and ghost batches.

Two changes to the training-mode forward pass of batch norm that Keras
offers as options of ``BatchNormalization`` (chapter 16, *Alternatives*,
derives both and compares them with layer and group norm):

* **Batch renormalization** (Ioffe 2017, ``renorm=True``).  Training
  normalizes with the batch statistics, inference with moving averages;
  with small batches the two differ.  Renorm corrects the training output
  toward what the moving averages would give:

  .. math::

      r = \mathrm{clip}_{[r_{min}, r_{max}]}\Bigl(
          \frac{\sqrt{\sigma_B^2 + \epsilon}}{\sigma}\Bigr), \quad
      d = \mathrm{clip}_{[-d_{max}, d_{max}]}\Bigl(
          \frac{\mu_B - \mu}{\sigma}\Bigr), \quad
      y = \gamma\,(r\,\hat x + d) + \beta ,

  where :math:`\mu, \sigma` are the *renorm* moving mean and standard
  deviation (``renorm_mean``, ``renorm_stddev``; Keras takes
  :math:`\max(\sigma, \sqrt\epsilon)`).  :math:`r` and :math:`d` are
  treated as constants by the gradient (``stop_gradient``): without
  clipping, :math:`r \hat x + d = (x - \mu)/\sigma` for the current
  batch, the inference transform.
* **Ghost batch norm** (Hoffer, Hubara and Soudry 2017,
  ``virtual_batch_size=V``).  The batch of N is split into N / V *ghost
  batches* of V examples, each normalized with its own statistics;
  ``gamma``, ``beta`` and the moving statistics are shared.  As tf-keras
  does it, the batch is viewed as (V, N / V, ...): ghost batch j holds the
  examples j, j + N/V, j + 2N/V, ... .  The moving statistics are updated
  once per call with the mean over the ghost batches of their means and
  variances.

Both at once is allowed (tf-keras computes :math:`r, d` from the ghost
batches' mean statistics).  With :math:`r = 1, d = 0` and no ghost
batches this is :func:`companion.functional.batchnorm_forward`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from companion._reduce import channel_sum
from companion._standardize import standardize, standardize_backward
from companion._validation import (
    as_float_array,
    check_channel_vector,
    check_epsilon,
    check_int,
    check_normalizable,
    compute_dtype,
    describe,
)

__all__ = [
    "CLIPPING_KEYS",
    "RenormCache",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "check_renorm_clipping",
    "check_virtual_batch_size",
    "ghost_batchnorm_backward",
    "ghost_batchnorm_forward",
    "renorm_correction",
]

CLIPPING_KEYS = ("rmax", "rmin", "dmax")
"""The keys of ``renorm_clipping`` (Keras's names)."""


class RenormCache(NamedTuple):
    """What :func:`batch_renorm_forward` keeps for the backward pass.

    Arrays live in the *work shape*: the input's, or (V, N / V, ...) with
    ghost batches.
    """

    x_hat: np.ndarray
    """Each value standardized with its (ghost) batch's statistics."""
    inv_std: np.ndarray
    """1 / sqrt(var_B + epsilon) per (ghost batch and) channel."""
    gamma: np.ndarray
    """The scale, broadcastable against ``x_hat``."""
    r: np.ndarray
    """The renorm scale correction (1 without renorm), broadcastable."""
    d: np.ndarray
    """The renorm shift correction (0 without renorm), broadcastable."""
    mean: np.ndarray
    """The batch mean per channel, shape (C,) (with ghost batches: the
    mean of their means)."""
    var: np.ndarray
    """The biased batch variance per channel, shape (C,) (with ghost
    batches: the mean of their variances)."""
    stat_axes: tuple[int, ...]
    """The axes of the work shape the statistics are taken over."""
    channel_axis: int
    """The channel axis in the work shape."""
    x_shape: tuple[int, ...]
    x_dtype: np.dtype
    gamma_dtype: np.dtype
    beta_dtype: np.dtype

    @property
    def count(self) -> int:  # type: ignore[override]
        """The number m of values each (ghost) batch statistic is over."""
        return int(np.prod([self.x_hat.shape[i] for i in self.stat_axes]))


def check_renorm_clipping(
    clipping: Mapping[str, float] | None,
) -> dict[str, float]:
    """``renorm_clipping`` as a dict of floats; a clear error otherwise.

    Keys are among ``rmax``, ``rmin``, ``dmax``; ``rmin`` >= 0, ``rmax``
    >= ``rmin`` (``inf`` allowed), ``dmax`` >= 0 (``inf`` allowed).  None
    is the empty dict (no clipping).
    """
    if clipping is None:
        return {}
    if not isinstance(clipping, Mapping):
        raise TypeError(
            "renorm_clipping must be a dict with keys among "
            f"{list(CLIPPING_KEYS)}, or None; received {describe(clipping)}"
        )
    unknown = sorted(set(clipping) - set(CLIPPING_KEYS))
    if unknown:
        raise ValueError(
            f"renorm_clipping has unknown keys {unknown}; expected keys "
            f"among {list(CLIPPING_KEYS)}"
        )
    out: dict[str, float] = {}
    for key in CLIPPING_KEYS:
        if key not in clipping or clipping[key] is None:
            continue
        value = clipping[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"renorm_clipping[{key!r}] must be a float; received "
                f"{describe(value)}"
            )
        number = float(value)
        if math.isnan(number) or number < 0:
            raise ValueError(
                f"renorm_clipping[{key!r}] must be >= 0; received {value!r}"
            )
        out[key] = number
    if out.get("rmax", math.inf) < out.get("rmin", 0.0):
        raise ValueError(
            f"renorm_clipping has rmax={out['rmax']!r} < rmin="
            f"{out['rmin']!r}; expected rmin <= rmax"
        )
    return out


def check_virtual_batch_size(
    virtual_batch_size: int | None, batch: int, axis: int
) -> None:
    """A ghost batch size must divide the batch; axis 0 must be the batch."""
    if virtual_batch_size is None:
        return
    if axis == 0:
        raise ValueError(
            "virtual_batch_size needs axis 0 to be the batch axis; received "
            "axis 0 as the channel axis"
        )
    if batch % virtual_batch_size:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} does not divide the "
            f"batch of {batch} examples; expected a batch size that is a "
            f"multiple of {virtual_batch_size}"
        )


def renorm_correction(
    mean: np.ndarray,
    var: np.ndarray,
    renorm_mean: np.ndarray,
    renorm_stddev: np.ndarray,
    *,
    epsilon: float,
    clipping: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Batch renorm's :math:`(r, d)` from batch and renorm statistics.

    .. math::

        r = \frac{\sqrt{\sigma_B^2 + \epsilon}}{\max(\sigma,
            \sqrt\epsilon)}, \qquad
        d = \frac{\mu_B - \mu}{\max(\sigma, \sqrt\epsilon)},

    then :math:`r` clipped to [``rmin``, ``rmax``] and :math:`d` to
    [-``dmax``, ``dmax``] (Ioffe 2017, Algorithm 1, with Keras's floor on
    :math:`\sigma`).  All arrays of shape (C,), in one dtype.
    """
    clip = check_renorm_clipping(clipping)
    dtype = mean.dtype
    eps = dtype.type(epsilon)
    stddev = np.sqrt(var + eps)
    floor = np.maximum(renorm_stddev.astype(dtype), np.sqrt(eps))
    r = stddev / floor
    d = (mean - renorm_mean.astype(dtype)) / floor
    if "rmin" in clip:
        r = np.maximum(r, dtype.type(clip["rmin"]))
    if "rmax" in clip:
        r = np.minimum(r, dtype.type(clip["rmax"]))
    if "dmax" in clip:
        d = np.clip(d, -dtype.type(clip["dmax"]), dtype.type(clip["dmax"]))
    return r, d


def _check(
    x: object,
    gamma: object,
    beta: object,
    axis: object,
    epsilon: object,
    virtual_batch_size: object,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float, int | None]:
    x_array = as_float_array(x, "x")
    kept = check_normalizable(x_array, axis)
    channels = x_array.shape[kept]
    gamma_a = check_channel_vector(gamma, "gamma", channels)
    beta_a = check_channel_vector(beta, "beta", channels)
    eps = check_epsilon(epsilon)
    size = None
    if virtual_batch_size is not None:
        size = check_int(virtual_batch_size, "virtual_batch_size", low=1)
        check_virtual_batch_size(size, x_array.shape[0], kept)
    count = x_array.size // channels  # values per channel
    if size is not None:  # ... per ghost batch and channel
        count //= x_array.shape[0] // size
    if count < 2:
        where = "ghost batch" if size is not None else "channel"
        raise ValueError(
            f"Expected more than 1 value per {where} when training; "
            f"received x of shape {x_array.shape} with axis={axis}"
            + (f" and virtual_batch_size={size}" if size else "")
            + f", which leaves {count} value per channel"
        )
    return x_array, gamma_a, beta_a, kept, eps, size


def _forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    kept: int,
    eps: float,
    virtual_batch_size: int | None,
    correct: Any,
) -> tuple[np.ndarray, RenormCache]:
    """The arithmetic on checked arguments; the layer calls it directly.

    ``correct(mean, var) -> (r, d)`` gives the corrections from the
    per-channel batch statistics (shape (C,)), or is None (r = 1, d = 0).
    """
    dtype = compute_dtype(x.dtype)
    work = x.astype(dtype, copy=False)
    channel = kept
    if virtual_batch_size is not None:
        work = work.reshape(virtual_batch_size, -1, *x.shape[1:])
        channel = kept + 1
    stat_axes = tuple(
        i
        for i in range(work.ndim)
        if i != channel and (virtual_batch_size is None or i != 1)
    )
    x_hat, inv_std, mean_b, var_b = standardize(work, stat_axes, eps)
    rows = np.moveaxis(mean_b, channel, -1).reshape(-1, x.shape[kept])
    var_rows = np.moveaxis(var_b, channel, -1).reshape(-1, x.shape[kept])
    # One row per ghost batch (one row without them): their mean.
    mean: np.ndarray = rows.mean(axis=0)
    var: np.ndarray = var_rows.mean(axis=0)
    bshape = tuple(
        work.shape[i] if i == channel else 1 for i in range(work.ndim)
    )
    gamma_b = gamma.astype(dtype).reshape(bshape)
    beta_b = beta.astype(dtype).reshape(bshape)
    if correct is None:
        r = np.ones(bshape, dtype)
        d = np.zeros(bshape, dtype)
        y = gamma_b * x_hat + beta_b
    else:
        r_c, d_c = correct(mean, var)
        r, d = (
            r_c.astype(dtype).reshape(bshape),
            d_c.astype(dtype).reshape(bshape),
        )
        y = (r * gamma_b) * x_hat + (d * gamma_b + beta_b)
    cache = RenormCache(
        x_hat=x_hat,
        inv_std=inv_std,
        gamma=gamma_b,
        r=r,
        d=d,
        mean=mean,
        var=var,
        stat_axes=stat_axes,
        channel_axis=channel,
        x_shape=tuple(x.shape),
        x_dtype=x.dtype,
        gamma_dtype=gamma.dtype,
        beta_dtype=beta.dtype,
    )
    return y.reshape(x.shape).astype(x.dtype, copy=False), cache


def _backward(
    dy: np.ndarray, cache: RenormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arithmetic of :func:`batch_renorm_backward` (``dy`` checked)."""
    x_hat = cache.x_hat
    g = dy.astype(x_hat.dtype, copy=False).reshape(x_hat.shape)
    outer = tuple(i for i in range(x_hat.ndim) if i != cache.channel_axis)
    dbeta = channel_sum(g, outer)
    dgamma = cache.r * channel_sum(g * x_hat, outer) + cache.d * dbeta
    dx = standardize_backward(
        g * (cache.r * cache.gamma), x_hat, cache.inv_std, cache.stat_axes
    )
    return (
        dx.reshape(cache.x_shape).astype(cache.x_dtype, copy=False),
        dgamma.reshape(-1).astype(cache.gamma_dtype, copy=False),
        dbeta.reshape(-1).astype(cache.beta_dtype, copy=False),
    )


def _check_backward(dy: object, cache: object, forward: str) -> np.ndarray:
    if not isinstance(cache, RenormCache):
        raise TypeError(
            f"cache must be the RenormCache returned by {forward}; "
            f"received {describe(cache)}"
        )
    dy_array = as_float_array(dy, "dy")
    if dy_array.shape != cache.x_shape:
        raise ValueError(
            f"dy must have the shape of the forward output {cache.x_shape}; "
            f"received shape {dy_array.shape}"
        )
    return dy_array


def batch_renorm_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    renorm_mean: np.ndarray,
    renorm_stddev: np.ndarray,
    *,
    renorm_clipping: Mapping[str, float] | None = None,
    virtual_batch_size: int | None = None,
    axis: int = -1,
    epsilon: float = 1e-3,
) -> tuple[np.ndarray, RenormCache]:
    r"""Training-mode batch renormalization (Ioffe 2017), Keras's semantics.

    :math:`y = \gamma (r \hat x + d) + \beta` with :math:`\hat x` the
    batch-normalized input and :math:`(r, d)` from
    :func:`renorm_correction` (``renorm_mean``, ``renorm_stddev``: the
    renorm moving statistics, shape (C,)).  The statistics it needs to
    update the moving averages are in the cache (``cache.mean``,
    ``cache.var``).  Derived in chapter 16, *Alternatives*.

    Parameters
    ----------
    x, gamma, beta, axis, epsilon
        As in :func:`companion.functional.batchnorm_forward`.
    renorm_mean, renorm_stddev : arrays of shape (C,)
    renorm_clipping : dict or None
        ``rmax``, ``rmin``, ``dmax`` (missing: no clipping on that side).
    virtual_batch_size : int or None
        Normalize ghost batches of this size (it must divide the batch).

    Returns
    -------
    y : ndarray
        Shape and floating dtype of ``x``.
    cache : RenormCache
        For :func:`batch_renorm_backward`.

    Examples
    --------
    With the renorm statistics equal to the batch's, :math:`r = 1` and
    :math:`d = 0` (up to epsilon):

    >>> x = np.array([[1.0], [3.0]])
    >>> y, cache = batch_renorm_forward(
    ...     x, np.ones(1), np.zeros(1), np.array([2.0]), np.array([1.0]),
    ...     epsilon=1e-12,
    ... )
    >>> y.round(6), cache.r.round(6).item(), cache.d.round(6).item()
    (array([[-1.],
           [ 1.]]), 1.0, 0.0)
    """
    x_a, gamma_a, beta_a, kept, eps, size = _check(
        x, gamma, beta, axis, epsilon, virtual_batch_size
    )
    channels = x_a.shape[kept]
    mean_r = check_channel_vector(renorm_mean, "renorm_mean", channels)
    std_r = check_channel_vector(renorm_stddev, "renorm_stddev", channels)
    clip = check_renorm_clipping(renorm_clipping)

    def correct(mean: np.ndarray, var: np.ndarray) -> tuple[Any, Any]:
        return renorm_correction(
            mean, var, mean_r, std_r, epsilon=eps, clipping=clip
        )

    return _forward(x_a, gamma_a, beta_a, kept, eps, size, correct)


def batch_renorm_backward(
    dy: np.ndarray, cache: RenormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of batch renormalization, :math:`r, d` held constant.

    With :math:`g = \partial L / \partial y` and the sums over the m
    values of a (ghost) batch, batch norm's gradient with :math:`r\gamma`
    for :math:`\gamma`:

    .. math::

        \frac{\partial L}{\partial x_i}
            = \frac{r\gamma}{\sqrt{\sigma_B^2+\epsilon}}
            \Bigl( g_i - \frac{1}{m}\sum_j g_j
                   - \hat x_i \frac{1}{m}\sum_j g_j \hat x_j \Bigr),
        \qquad
        \frac{\partial L}{\partial \gamma} = \sum_i g_i (r \hat x_i + d),
        \qquad
        \frac{\partial L}{\partial \beta} = \sum_i g_i .

    :math:`r` and :math:`d` depend on the batch, but Ioffe (2017) and
    Keras treat them as constants (``stop_gradient``): the gradient is
    that of the fixed affine map they define on top of batch norm.
    Derived in chapter 16.
    """
    dy_array = _check_backward(dy, cache, "batch_renorm_forward")
    return _backward(dy_array, cache)


def ghost_batchnorm_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    *,
    virtual_batch_size: int,
    axis: int = -1,
    epsilon: float = 1e-3,
) -> tuple[np.ndarray, RenormCache]:
    r"""Ghost batch normalization (Hoffer et al. 2017), tf-keras's layout.

    The batch of N examples is viewed as (V, N / V, ...) with V =
    ``virtual_batch_size``; each of the N / V ghost batches (examples j, j
    + N/V, ...) is normalized with its own mean and variance over its V
    examples (and positions), then :math:`y = \gamma \hat x + \beta`.
    ``cache.mean`` and ``cache.var`` hold the means over the ghost batches
    of their statistics (what tf-keras feeds to the moving averages).
    Derived in chapter 16.

    Examples
    --------
    Ghost batches {x0, x2} and {x1, x3}:

    >>> x = np.array([[0.0], [10.0], [2.0], [30.0]])
    >>> y, _ = ghost_batchnorm_forward(
    ...     x, np.ones(1), np.zeros(1), virtual_batch_size=2, epsilon=1e-12
    ... )
    >>> y.ravel()
    array([-1., -1.,  1.,  1.])
    """
    if virtual_batch_size is None:
        raise TypeError(
            "virtual_batch_size must be an int >= 1; received None (use "
            "companion.functional.batchnorm_forward for the whole batch)"
        )
    x_a, gamma_a, beta_a, kept, eps, size = _check(
        x, gamma, beta, axis, epsilon, virtual_batch_size
    )
    return _forward(x_a, gamma_a, beta_a, kept, eps, size, None)


def ghost_batchnorm_backward(
    dy: np.ndarray, cache: RenormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of ghost batch norm: batch norm's, per ghost batch.

    :func:`companion.functional.batchnorm_backward`'s formula with the
    sums over each ghost batch; ``dgamma`` and ``dbeta`` add up over all
    of them.  Derived in chapter 16.
    """
    dy_array = _check_backward(dy, cache, "ghost_batchnorm_forward")
    return _backward(dy_array, cache)
