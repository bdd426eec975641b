r"""Folding batch norm into the layer before it, for inference.

In inference mode batch norm is a fixed per-channel affine map
(chapter 4): with :math:`s = \gamma / \sqrt{V + \epsilon}` for the moving
variance :math:`V` and the moving mean :math:`M`,

.. math::

    \mathrm{BN}(z) = s\,(z - M) + \beta .

When :math:`z = x K + b` comes from a Dense layer, or from a convolution
(every output channel is a sum of kernel entries times inputs, plus the
channel's bias), the two maps compose into one layer of the same kind:

.. math::

    \mathrm{BN}(x K + b) = x\,(K s) + \big((b - M)\,s + \beta\big),

where :math:`K s` scales the kernel's last axis, the output channels.  The
network then computes the same outputs with one layer less.  Chapter 18
derives it, checks the equality on the source text's CNN and measures what
it saves.

* :func:`fold_batchnorm` folds the arrays (Keras layouts: Dense ``(in,
  out)``, Conv2D ``(kh, kw, in, out)``);
* :func:`fold` folds every Conv2D/Dense -> BatchNorm pair of a companion
  ``Sequential`` and returns a new model (``companion.nn.fold``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

from companion._validation import as_float_array, check_epsilon, describe

if TYPE_CHECKING:
    from companion.base import Layer
    from companion.layers import BatchNorm
    from companion.nn.conv import Conv2D
    from companion.nn.dense import Dense
    from companion.nn.sequential import Sequential

__all__ = ["fold", "fold_batchnorm"]


def _vector(value: Any, name: str, channels: int) -> np.ndarray:
    """A finite float vector of shape (channels,)."""
    array = as_float_array(value, name)
    if array.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one entry per output "
            f"channel of the kernel; received shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite; received {array}")
    return array


def fold_batchnorm(
    kernel: Any,
    bias: Any,
    gamma: Any,
    beta: Any,
    moving_mean: Any,
    moving_variance: Any,
    *,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    r"""The kernel and bias of a layer followed by inference-mode batch norm.

    .. math::

        K' = K\,s, \qquad b' = (b - M)\,s + \beta, \qquad
        s = \frac{\gamma}{\sqrt{V + \epsilon}},

    with :math:`s` multiplying the kernel's last axis (chapter 18).  Then
    ``x @ K' + b'`` is ``batchnorm_inference(x @ K + b, ...)`` for a Dense
    layer, and the same holds for a convolution with the kernel ``K'``.

    Parameters
    ----------
    kernel : array, shape (in, C) or (kh, kw, in, C)
        Keras's layout of a Dense or Conv2D kernel (any kernel whose last
        axis holds the C output channels: Conv1D and Conv3D too; not a
        depthwise one).
    bias : array of shape (C,) or None
        The layer's bias; None for a layer without one (``use_bias=False``,
        the usual choice before batch norm).
    gamma, beta : array of shape (C,) or None
        The batch norm's scale and shift; None for a layer built with
        ``scale=False`` (gamma = 1) or ``center=False`` (beta = 0).
    moving_mean, moving_variance : array of shape (C,)
        The statistics the batch norm uses in inference mode
        (``moving_variance`` >= 0).
    epsilon : float > 0
        The batch norm's epsilon (Keras 1e-3, PyTorch 1e-5:
        :mod:`companion.conventions`).

    Returns
    -------
    (kernel, bias)
        New arrays (the inputs are not modified), in the floating dtype
        the inputs promote to (computed in float64 and rounded once).

    Raises
    ------
    TypeError, ValueError
        A kernel of rank < 2, a vector whose shape is not (C,), non-finite
        values, a negative variance, or an epsilon that is not a number >
        0.

    Examples
    --------
    >>> kernel, bias = fold_batchnorm(
    ...     np.array([[1.0, 2.0]]), None, np.array([2.0, 1.0]),
    ...     np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([3.0, 0.0]),
    ...     epsilon=1.0,
    ... )
    >>> kernel, bias
    (array([[1., 2.]]), array([-1.,  1.]))
    """
    epsilon = check_epsilon(epsilon)
    k = as_float_array(kernel, "kernel")
    if k.ndim < 2:
        raise ValueError(
            "kernel must have the output channels on its last axis: shape "
            "(in, C) for a Dense layer or (kh, kw, in, C) for a Conv2D; "
            f"received shape {k.shape}"
        )
    if not np.all(np.isfinite(k)):
        raise ValueError("kernel must be finite")
    channels = k.shape[-1]
    mean = _vector(moving_mean, "moving_mean", channels)
    variance = _vector(moving_variance, "moving_variance", channels)
    if np.any(variance < 0):
        raise ValueError(
            f"moving_variance must be >= 0; received {variance.min()!r} at "
            f"index {int(variance.argmin())}"
        )
    optional = {"bias": bias, "gamma": gamma, "beta": beta}
    vectors = {
        name: None if value is None else _vector(value, name, channels)
        for name, value in optional.items()
    }
    dtype = np.result_type(
        k, mean, variance, *[v for v in vectors.values() if v is not None]
    )
    wide = np.promote_types(dtype, np.float64)  # float64, or longdouble
    zeros, ones = np.zeros(channels, wide), np.ones(channels, wide)
    b = zeros if vectors["bias"] is None else vectors["bias"].astype(wide)
    g = ones if vectors["gamma"] is None else vectors["gamma"].astype(wide)
    beta_ = zeros if vectors["beta"] is None else vectors["beta"].astype(wide)
    scale = g / np.sqrt(variance.astype(wide) + epsilon)
    folded_kernel = k.astype(wide) * scale
    folded_bias = (b - mean.astype(wide)) * scale + beta_
    return folded_kernel.astype(dtype), folded_bias.astype(dtype)


# ---------------------------------------------------------------- models
def _folded_layer(layer: Dense | Conv2D, bn: BatchNorm) -> Layer:
    """A new Dense/Conv2D with bias that computes ``bn(layer(x))``."""
    from companion.nn.conv import Conv2D
    from companion.nn.dense import Dense

    kernel = layer.kernel
    if kernel is None or bn.moving_mean is None:
        raise ValueError(
            f"fold() needs built layers; {layer!r} or {bn!r} is not built "
            "(call the model on an input first)"
        )
    # BatchNorm._state would do this; its public attributes say the same.
    folded_kernel, folded_bias = fold_batchnorm(
        kernel,
        layer.bias,
        bn.gamma,
        bn.beta,
        bn.moving_mean,
        bn.moving_variance,
        epsilon=bn.epsilon,
    )
    new: Dense | Conv2D
    if isinstance(layer, Dense):
        new = Dense(layer.units, use_bias=True)
        new.build((None, kernel.shape[0]), dtype=folded_kernel.dtype)
    else:
        new = Conv2D(
            layer.filters,
            layer.kernel_size,
            padding=layer.padding,
            use_bias=True,
        )
        kh, kw = layer.kernel_size
        new.build((None, kh, kw, kernel.shape[2]), dtype=folded_kernel.dtype)
    new.set_weights([folded_kernel, folded_bias])
    return new


def _folds_on_channels(bn: BatchNorm, layer: Dense | Conv2D) -> bool:
    """Whether ``bn`` normalizes the output channels of ``layer``."""
    from companion.nn.dense import Dense

    rank = 2 if isinstance(layer, Dense) else 4
    return bn.axis in (-1, rank - 1)


def _fold_layers(layers: list[Layer], where: str) -> tuple[list[Layer], int]:
    """The folded copy of a list of layers, and how many pairs were folded."""
    from companion.layers import BatchNorm
    from companion.nn.conv import Conv2D
    from companion.nn.dense import Dense
    from companion.nn.sequential import Sequential

    out: list[Layer] = []
    count, i = 0, 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, Sequential):
            inner, folded = _fold_layers(list(layer.layers), f"{where}{i}.")
            out.append(Sequential(inner))
            count += folded
            i += 1
        elif isinstance(layer, (Dense, Conv2D)) and isinstance(
            following, BatchNorm
        ):
            if not _folds_on_channels(following, layer):
                raise ValueError(
                    f"layers[{where}{i + 1}] ({following!r}) normalizes axis "
                    f"{following.axis}, not the output channels of "
                    f"layers[{where}{i}] ({layer!r}): it cannot be folded "
                    "into the kernel"
                )
            out.append(_folded_layer(layer, following))
            count += 1
            i += 2
        else:
            out.append(copy.deepcopy(layer))
            i += 1
    return out, count


def fold(model: Sequential) -> Sequential:
    """A new model with every Conv2D/Dense -> BatchNorm pair folded into one.

    Each Conv2D or Dense layer that is directly followed by a
    :class:`~companion.layers.BatchNorm` on its output channels becomes one
    layer of the same kind, with a bias, that computes what the pair
    computes in inference mode (:func:`fold_batchnorm`); the BatchNorm is
    gone.  Every other layer is copied; nested ``Sequential`` models are
    folded inside.  ``model`` itself is not changed.  Chapter 18 uses it on
    the source text's CNN.

    The folded model computes the inference-mode outputs of ``model``
    (equal up to rounding); it has no training mode of its own (batch
    statistics need the batch norm).

    Raises
    ------
    TypeError
        ``model`` is not a companion ``Sequential``.
    ValueError
        Nothing to fold, a pair with an unbuilt layer, or a BatchNorm that
        normalizes another axis than the output channels.
    """
    # Imported here: companion.nn imports this module (companion.nn.fold).
    from companion.nn.sequential import Sequential

    if not isinstance(model, Sequential):
        raise TypeError(
            "model must be a companion.nn.Sequential; received "
            f"{describe(model)}"
        )
    layers, count = _fold_layers(list(model.layers), "")
    if count == 0:
        raise ValueError(
            "model has no Conv2D or Dense layer directly followed by a "
            "BatchNorm: there is nothing to fold"
        )
    return Sequential(layers)
