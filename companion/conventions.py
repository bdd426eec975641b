r"""Keras and PyTorch batch norm conventions, and exact conversions.

The frameworks store the same layer differently (chapter 4 checks each
entry against the real code; chapter 15 converts trained layers):

* **momentum.**  Keras keeps the old value with weight :math:`\rho`,
  ``moving = rho * moving + (1 - rho) * batch`` (default 0.99); PyTorch
  takes the new one with weight :math:`p`, ``running = (1 - p) * running +
  p * batch`` (default 0.1).  The same averaging needs :math:`p = 1 -
  \rho`.
* **stored variance.**  Both normalize a training batch with its biased
  variance :math:`\sigma_B^2`.  Keras 3 averages :math:`\sigma_B^2` into
  its moving variance; PyTorch averages the unbiased
  :math:`\frac{m}{m-1}\sigma_B^2` (:math:`m` values per channel in each
  batch: N for a Dense layer's output, N H W for a convolution's).
* **epsilon.**  Keras 1e-3, PyTorch 1e-5.

Both averages start at mean 0 and variance 1.  After :math:`T` steps with
:math:`p = 1 - \rho`, Keras's moving variance is

.. math::

    V_T = \rho^T + (1 - \rho) \sum_{t=1}^{T} \rho^{T-t}\,\sigma_{B_t}^2,

and PyTorch's running variance is the same with every
:math:`\sigma_{B_t}^2` multiplied by :math:`m/(m-1)`, so

.. math::

    R_T - \rho^T = \frac{m}{m-1}\,\big(V_T - \rho^T\big)

exactly, for any batches, when :math:`m` is the same in every batch.
:func:`unbiased_moving_variance` and :func:`biased_moving_variance` apply
it.  :func:`to_pytorch` and :func:`from_pytorch` convert a whole layer,
keeping either its inference outputs (the default) or its statistics
(:data:`PRESERVE`): the same training run leaves the two frameworks with
layers whose inference outputs differ by up to :math:`\sqrt{m/(m-1)}`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from companion._validation import (
    as_float_array,
    check_epsilon,
    check_int,
    check_momentum,
    describe,
)
from companion.layers import BatchNorm

__all__ = [
    "CONVENTIONS",
    "KERAS",
    "PRESERVE",
    "PYTORCH",
    "TF1",
    "TF1_FUSED",
    "Convention",
    "biased_moving_variance",
    "from_pytorch",
    "keras_momentum",
    "match_epsilon",
    "pytorch_momentum",
    "steps_to_forget",
    "to_pytorch",
    "unbiased_moving_variance",
]


@dataclasses.dataclass(frozen=True)
class Convention:
    """How one framework's batch norm layer keeps its statistics.

    Attributes
    ----------
    name
        The layer, as the framework names it.
    momentum
        Its default momentum, in its own meaning.
    momentum_weights
        ``"old"``: momentum is the weight of the stored value (Keras,
        TF1); ``"new"``: the weight of the batch (PyTorch).
    epsilon
        Its default epsilon.
    stored_variance
        ``"biased"`` (:math:`\\sigma_B^2` averaged) or ``"unbiased"``
        (:math:`\\frac{m}{m-1}\\sigma_B^2` averaged).
    """

    name: str
    momentum: float
    momentum_weights: str
    epsilon: float
    stored_variance: str

    @property
    def keras_momentum(self) -> float:
        """The default momentum as the weight of the old value."""
        if self.momentum_weights == "old":
            return self.momentum
        return keras_momentum(self.momentum)


KERAS = Convention(
    "keras.layers.BatchNormalization (Keras 3)", 0.99, "old", 1e-3, "biased"
)
"""Keras 3, and the companion's :class:`~companion.layers.BatchNorm`."""
TF1 = Convention(
    "tf.compat.v1.layers.batch_normalization, 2-D input",
    0.99,
    "old",
    1e-3,
    "biased",
)
"""TensorFlow 1's layer on (N, C) input (or ``fused=False``)."""
TF1_FUSED = Convention(
    "tf.compat.v1.layers.batch_normalization, 4-D input (fused)",
    0.99,
    "old",
    1e-3,
    "unbiased",
)
"""TensorFlow 1's layer on NHWC input: the fused kernel, its default."""
PYTORCH = Convention(
    "torch.nn.BatchNorm1d / BatchNorm2d", 0.1, "new", 1e-5, "unbiased"
)
"""PyTorch, from its documentation (torch is not a dependency)."""
CONVENTIONS = {
    "keras": KERAS,
    "tf1": TF1,
    "tf1_fused": TF1_FUSED,
    "pytorch": PYTORCH,
}
"""The conventions above by short name."""


# --------------------------------------------------------------- momentum
def pytorch_momentum(keras_momentum: float) -> float:
    r"""PyTorch's momentum :math:`p = 1 - \rho` for Keras's :math:`\rho`.

    >>> pytorch_momentum(0.9)
    0.09999999999999998
    """
    return 1.0 - check_momentum(keras_momentum)


def keras_momentum(pytorch_momentum: float) -> float:
    r"""Keras's momentum :math:`\rho = 1 - p` for PyTorch's :math:`p`.

    Exact round trip for :math:`\rho \ge 1/2` (every momentum in use):
    ``keras_momentum(pytorch_momentum(rho)) == rho``.

    >>> keras_momentum(0.1)
    0.9
    """
    if pytorch_momentum is None:
        raise ValueError(
            "pytorch_momentum=None is PyTorch's cumulative average (the "
            "paper's Algorithm 2); it has no fixed Keras momentum: use "
            "companion.recalibrate"
        )
    return 1.0 - check_momentum(pytorch_momentum)


# --------------------------------------------------------------- variance
def _bessel(count: Any) -> float:
    m = check_int(count, "count", low=2)
    return m / (m - 1)


def _initial_weight(momentum: Any, steps: Any) -> float:
    """rho**T: the weight left on the initial variance 1 after T steps."""
    rho = check_momentum(momentum)
    return float(rho ** check_int(steps, "steps", low=0))


def _variance_array(value: Any, name: str) -> np.ndarray:
    array = as_float_array(value, name)
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(
            f"{name} must be finite and >= 0; received {describe(value)}"
        )
    return array


def unbiased_moving_variance(
    moving_variance: Any, count: int, *, momentum: float, steps: int
) -> np.ndarray:
    r"""PyTorch's running variance for Keras's moving variance.

    .. math::

        R_T = \rho^T + \frac{m}{m-1}\,\big(V_T - \rho^T\big)

    (module docstring), exact for :math:`T` steps on batches of :math:`m`
    values per channel.

    Parameters
    ----------
    moving_variance : array
        :math:`V_T`, averaged from biased batch variances.
    count : int >= 2
        :math:`m`, the values per channel of every training batch (N for a
        Dense output, N H W for a convolution's).
    momentum : float
        Keras's :math:`\rho` (weight of the old value).
    steps : int >= 0
        :math:`T`, the number of training-mode calls (a Keras optimizer's
        ``iterations``).  The initial value's weight :math:`\rho^T` is
        below 1e-4 after 1,000 steps with :math:`\rho = 0.99`.
    """
    v = _variance_array(moving_variance, "moving_variance")
    initial = _initial_weight(momentum, steps)
    result: np.ndarray = initial + _bessel(count) * (v - initial)
    return result


def biased_moving_variance(
    running_variance: Any, count: int, *, momentum: float, steps: int
) -> np.ndarray:
    r"""Keras's moving variance for PyTorch's running variance.

    The inverse of :func:`unbiased_moving_variance`:
    :math:`V_T = \rho^T + \frac{m-1}{m}(R_T - \rho^T)`, with Keras's
    :math:`\rho` (``keras_momentum(p)`` for PyTorch's :math:`p`).
    """
    r = _variance_array(running_variance, "running_variance")
    initial = _initial_weight(momentum, steps)
    result: np.ndarray = initial + (r - initial) / _bessel(count)
    return result


def match_epsilon(
    moving_variance: Any, epsilon: float, new_epsilon: float
) -> np.ndarray:
    r"""A moving variance for ``new_epsilon`` with the same inference outputs.

    Inference mode divides by :math:`\sqrt{V + \epsilon}`; the variance
    :math:`V' = V + \epsilon - \epsilon'` keeps that number, so a layer
    loaded into a framework whose epsilon is fixed at another value
    computes the same inference outputs.  (Training mode divides by
    :math:`\sqrt{\sigma_B^2 + \epsilon'}`: it changes anyway.)

    Raises
    ------
    ValueError
        A channel would get a negative variance (:math:`V + \epsilon <
        \epsilon'`).
    """
    v = _variance_array(moving_variance, "moving_variance")
    epsilon, new_epsilon = check_epsilon(epsilon), check_epsilon(new_epsilon)
    shifted: np.ndarray = v + epsilon - new_epsilon
    if np.any(shifted < 0):
        raise ValueError(
            f"moving_variance + epsilon ({(v + epsilon).min()!r} in channel "
            f"{int(v.argmin())}) is below new_epsilon={new_epsilon!r}: no "
            "variance gives the same inference outputs"
        )
    return shifted


# ------------------------------------------------------------ whole layers
PRESERVE = ("inference", "statistics")
r"""What a layer conversion keeps (:func:`to_pytorch`, :func:`from_pytorch`).

``"inference"``: the variance that inference mode divides by is copied
as it is, so the converted layer computes the same inference outputs.
``"statistics"``: the variance is converted between the biased and the
unbiased average (:func:`unbiased_moving_variance`), so the converted
layer holds what the other framework's own update would have stored
after the same batches -- and, since the frameworks divide by different
averages, its inference outputs differ by up to
:math:`\sqrt{m/(m-1)}` (chapter 15).
"""


def _converted_variance(
    variance: np.ndarray,
    preserve: str,
    count: int | None,
    steps: int | None,
    momentum: float,
    to_unbiased: bool,
) -> np.ndarray:
    if preserve not in PRESERVE:
        raise ValueError(
            f"preserve must be one of {PRESERVE}; "
            f"received {describe(preserve)}"
        )
    if preserve == "inference":
        same: np.ndarray = variance.copy()
        return same
    if count is None or steps is None:
        raise ValueError(
            'preserve="statistics" needs count (values per channel in each '
            "training batch) and steps (training-mode calls); received "
            f"count={count!r}, steps={steps!r}"
        )
    convert = (
        unbiased_moving_variance if to_unbiased else (biased_moving_variance)
    )
    result: np.ndarray = convert(
        variance, count, momentum=momentum, steps=steps
    ).astype(variance.dtype)
    return result


def to_pytorch(
    layer: BatchNorm,
    *,
    preserve: str = "inference",
    count: int | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """A trained companion (Keras-convention) layer as PyTorch stores it.

    Parameters
    ----------
    layer : companion.BatchNorm
        Built; a Keras layer's weights load into one with
        ``layer.set_weights(keras_layer.get_weights())``.
    preserve : {"inference", "statistics"}
        :data:`PRESERVE`: ``"inference"`` (the default) gives a PyTorch
        layer whose ``eval()`` outputs equal this layer's inference
        outputs; ``"statistics"`` the state PyTorch would hold after the
        same training batches.
    count : int >= 2
        With ``"statistics"``: values per channel in each training batch
        (see :func:`unbiased_moving_variance`).
    steps : int >= 0
        With ``"statistics"``: training-mode calls the layer has seen;
        stored as ``num_batches_tracked`` (0 when not given).

    Returns
    -------
    dict
        ``weight``, ``bias``, ``running_mean``, ``running_var`` (copies, in
        the layer's dtype) and ``num_batches_tracked``: the keys of a
        ``torch.nn.BatchNorm2d`` ``state_dict``; and ``momentum`` and
        ``eps``, the constructor arguments that continue the same
        averaging (the layer's epsilon, not PyTorch's default).
    """
    if not isinstance(layer, BatchNorm):
        raise TypeError(
            f"layer must be a companion BatchNorm; received {describe(layer)}"
        )
    if layer.moving_mean is None or layer.moving_variance is None:
        raise ValueError("to_pytorch() needs a built BatchNorm")
    mean, variance = layer.moving_mean, layer.moving_variance
    running = _converted_variance(
        variance, preserve, count, steps, layer.momentum, to_unbiased=True
    )
    ones, zeros = np.ones_like(mean), np.zeros_like(mean)
    return {
        "weight": ones if layer.gamma is None else layer.gamma.copy(),
        "bias": zeros if layer.beta is None else layer.beta.copy(),
        "running_mean": mean.copy(),
        "running_var": running,
        "num_batches_tracked": 0 if steps is None else int(steps),
        "momentum": pytorch_momentum(layer.momentum),
        "eps": layer.epsilon,
    }


_STATE_KEYS = ("weight", "bias", "running_mean", "running_var")


def from_pytorch(
    state: Mapping[str, Any],
    *,
    preserve: str = "inference",
    count: int | None = None,
    momentum: float = PYTORCH.momentum,
    eps: float = PYTORCH.epsilon,
) -> BatchNorm:
    """A companion (Keras-convention) layer from a PyTorch batch norm state.

    Parameters
    ----------
    state : mapping
        ``weight``, ``bias``, ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` (a ``state_dict()`` with tensors converted
        by ``.numpy()``, or :func:`to_pytorch`'s output), with ``momentum``
        and ``eps`` taken from it when present.
    preserve : {"inference", "statistics"}
        :data:`PRESERVE`: ``"inference"`` (the default) gives a layer whose
        inference outputs equal PyTorch's ``eval()`` outputs;
        ``"statistics"`` the moving variance Keras's update would have
        reached after the same batches (:func:`biased_moving_variance`,
        with ``steps = num_batches_tracked``).
    count : int >= 2
        With ``"statistics"``: values per channel in each training batch.
    momentum, eps : float
        PyTorch's constructor arguments (defaults 0.1 and 1e-5), used when
        ``state`` does not hold them.

    Returns
    -------
    BatchNorm
        Momentum ``1 - p`` and the same epsilon.
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            "state must be a mapping with keys "
            f"{', '.join(_STATE_KEYS)}, num_batches_tracked; received "
            f"{describe(state)}"
        )
    missing = [
        key
        for key in (*_STATE_KEYS, "num_batches_tracked")
        if key not in state
    ]
    if missing:
        raise ValueError(
            f"state is missing {missing}; expected the keys of a "
            "torch.nn.BatchNorm state_dict"
        )
    rho = keras_momentum(state.get("momentum", momentum))
    epsilon = check_epsilon(state.get("eps", eps))
    steps = state["num_batches_tracked"]
    steps = int(np.asarray(steps)) if np.ndim(steps) == 0 else steps
    arrays = {key: as_float_array(state[key], key) for key in _STATE_KEYS}
    shapes = {key: a.shape for key, a in arrays.items()}
    if len(set(shapes.values())) != 1 or arrays["weight"].ndim != 1:
        raise ValueError(
            f"weight, bias, running_mean and running_var must all have "
            f"shape (C,); received {shapes}"
        )
    variance = _converted_variance(
        _variance_array(arrays["running_var"], "running_var"),
        preserve,
        count,
        steps,
        rho,
        to_unbiased=False,
    )
    layer = BatchNorm(momentum=rho, epsilon=epsilon)
    dtype = arrays["running_mean"].dtype
    layer.build((None, arrays["weight"].shape[0]), dtype=dtype)
    layer.set_weights(
        [
            arrays["weight"],
            arrays["bias"],
            arrays["running_mean"],
            variance.astype(dtype),
        ]
    )
    return layer


def steps_to_forget(momentum: float, fraction: float = 0.01) -> int:
    r"""Steps until the initial value's weight :math:`\rho^T` < ``fraction``.

    :math:`T = \lceil \ln(\text{fraction}) / \ln \rho \rceil`; 459 for
    :math:`\rho = 0.99` and 1 %.

    >>> steps_to_forget(0.99)
    459
    """
    rho = check_momentum(momentum)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1); received {fraction!r}")
    if rho == 0.0:
        return 1
    if rho == 1.0:
        raise ValueError("momentum 1 never forgets the initial value")
    return math.ceil(math.log(fraction) / math.log(rho))
