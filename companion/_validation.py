"""Input checks shared by the functional API and the layers.

Every check raises a ``TypeError`` or ``ValueError`` whose message names the
argument, the value received and the value expected, and returns the
normalized value so that callers never repeat the conversion.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = [
    "as_float_array",
    "channel_axis",
    "check_channel_vector",
    "check_epsilon",
    "check_int",
    "check_momentum",
    "check_rank",
    "compute_dtype",
    "describe",
    "is_low_precision_float",
]


def describe(value: Any) -> str:
    """Short description of a received value for error messages."""
    if isinstance(value, np.ndarray):
        return f"array of dtype {value.dtype} and shape {value.shape}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def as_float_array(value: Any, name: str) -> np.ndarray:
    """Return ``value`` as a floating-point array.

    Floating arrays (float16, float32, float64, and ``ml_dtypes.bfloat16``)
    keep their dtype.  Integer arrays are cast to float64, as ``np.mean``
    does.  Booleans, complex numbers, strings and objects are a ``TypeError``.
    """
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:  # ragged nested lists
        raise TypeError(
            f"{name} must be a numeric array; received {describe(value)} ({error})"
        ) from None
    if is_low_precision_float(array.dtype) or array.dtype.kind == "f":
        return array
    if array.dtype.kind in "iu":
        return array.astype(np.float64)
    raise TypeError(
        f"{name} must be a real floating or integer array; received an array of "
        f"dtype {array.dtype} ({describe(value)}); expected e.g. float32 or float64"
    )


def is_low_precision_float(dtype: np.dtype) -> bool:
    """True for 16-bit (and smaller) floats: float16 and ml_dtypes' bfloat16/float8."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return dtype.itemsize < 4
    # ml_dtypes registers bfloat16 and the float8 types with kind "V".
    return (
        dtype.kind == "V"
        and dtype.names is None
        and (
            dtype.name.startswith("bfloat") or dtype.name.startswith("float8")
        )
    )


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype arithmetic is done in: float32 for 16-bit floats, else ``dtype``.

    Keras does the same: a float16 input is normalized in float32 and the
    result cast back, because a float16 variance of activations overflows
    (max 65504) and loses most digits in the sum over the batch.
    """
    return (
        np.dtype(np.float32)
        if is_low_precision_float(dtype)
        else np.dtype(dtype)
    )


def channel_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """Normalize a (possibly negative) channel axis for an array of rank ``ndim``."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int; received {describe(axis)}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{name}={axis} is out of range for an input of rank {ndim}; "
            f"expected an integer in [{-ndim}, {ndim - 1}]"
        )
    return int(axis) % ndim


def check_rank(x: np.ndarray, name: str = "x") -> None:
    """Batch norm needs a batch axis and at least one other axis."""
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have rank >= 2 (a batch axis and a feature axis); received "
            f"shape {x.shape} (rank {x.ndim}); reshape a single vector to (1, D) or (N, 1)"
        )


def check_channel_vector(value: Any, name: str, channels: int) -> np.ndarray:
    """A per-channel parameter or statistic: a floating array of shape (C,)."""
    array = as_float_array(value, name)
    if array.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one value per channel; "
            f"received shape {array.shape}"
        )
    return array


def check_epsilon(epsilon: Any) -> float:
    """epsilon must be a finite real number > 0."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(
            f"epsilon must be a float; received {describe(epsilon)}"
        )
    if not (np.isfinite(epsilon) and epsilon > 0):
        raise ValueError(
            f"epsilon must be finite and > 0 (it keeps 1/sqrt(var + epsilon) finite "
            f"for a constant channel); received {epsilon!r}"
        )
    return float(epsilon)


def check_momentum(momentum: Any) -> float:
    """momentum must be a real number in [0, 1] (Keras meaning: weight of the old value)."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"momentum must be a float; received {describe(momentum)}"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (moving = moving * momentum + batch * (1 - momentum)); "
            f"received {momentum!r}"
        )
    return float(momentum)


def check_int(
    value: Any, name: str, low: int | None = None, high: int | None = None
) -> int:
    """``value`` must be an int (not a bool) in [low, high]; returns it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; received {describe(value)}")
    if (low is not None and value < low) or (
        high is not None and value > high
    ):
        if high is None:
            expected = f"an int >= {low}"
        elif low is None:
            expected = f"an int <= {high}"
        else:
            expected = f"an int in [{low}, {high}]"
        raise ValueError(
            f"{name}={value} is out of range; expected {expected}"
        )
    return int(value)
