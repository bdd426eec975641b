"""Argument checks: the one home of every check in the package.

Every check raises a ``TypeError`` or ``ValueError`` whose message names the
argument, the value received and the value expected, and returns the
normalized value so that callers never repeat the conversion.  Callers check
everything before they change any state, so a failed call leaves a layer (or
an optimizer) as it was.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = [
    "as_float_array",
    "channel_axis",
    "check_bool",
    "check_channel_vector",
    "check_epsilon",
    "check_finite",
    "check_int",
    "check_momentum",
    "check_normalizable",
    "check_positive_real",
    "check_rank",
    "check_training_count",
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
    does.  Booleans, complex numbers, strings and objects are a
    ``TypeError``.

    >>> as_float_array([1, 2], "x").dtype
    dtype('float64')
    >>> as_float_array(["a"], "x")
    Traceback (most recent call last):
    ...
    TypeError: x must be a real floating or integer array; received an \
array of dtype <U1 (['a']); expected e.g. float32 or float64
    """
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:  # ragged nested lists
        raise TypeError(
            f"{name} must be a numeric array; received {describe(value)} "
            f"({error})"
        ) from None
    if is_low_precision_float(array.dtype) or array.dtype.kind == "f":
        return array
    if array.dtype.kind in "iu":
        return array.astype(np.float64)
    raise TypeError(
        f"{name} must be a real floating or integer array; received an "
        f"array of dtype {array.dtype} ({describe(value)}); expected e.g. "
        "float32 or float64"
    )


def is_low_precision_float(dtype: np.dtype) -> bool:
    """True for floats of 16 bits or fewer (float16, bfloat16, float8)."""
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
    """The dtype arithmetic is done in: float32 for 16-bit floats.

    Keras does the same: a float16 input is normalized in float32 and the
    result cast back, because a float16 variance of activations overflows
    (max 65504) and loses most digits in the sum over the batch.

    >>> compute_dtype(np.dtype("float16")), compute_dtype(np.dtype("float64"))
    (dtype('float32'), dtype('float64'))
    """
    if is_low_precision_float(dtype):
        return np.dtype(np.float32)
    return np.dtype(dtype)


def check_int(
    value: Any, name: str, low: int | None = None, high: int | None = None
) -> int:
    """``value`` must be an int (not a bool) in [low, high]; returns it.

    >>> check_int(3, "units", low=1)
    3
    >>> check_int(0, "units", low=1)
    Traceback (most recent call last):
    ...
    ValueError: units=0 is out of range; expected an int >= 1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; received {describe(value)}")
    number = int(value)
    too_low = low is not None and number < low
    if too_low or (high is not None and number > high):
        if high is None:
            expected = f"an int >= {low}"
        elif low is None:
            expected = f"an int <= {high}"
        else:
            expected = f"an int in [{low}, {high}]"
        raise ValueError(
            f"{name}={value} is out of range; expected {expected}"
        )
    return number


def check_bool(value: Any, name: str) -> bool:
    """``value`` must be a bool (Python's or numpy's); returns a ``bool``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; received {describe(value)}")
    return bool(value)


def check_positive_real(value: Any, name: str, why: str = "") -> float:
    """``value`` must be a finite real number > 0; returns it as a float.

    ``why`` is added to the message of the ``ValueError`` (a reason in
    parentheses).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float; received {describe(value)}")
    number = float(value)
    if not (np.isfinite(number) and number > 0):
        reason = f" ({why})" if why else ""
        raise ValueError(
            f"{name} must be finite and > 0{reason}; received {value!r}"
        )
    return number


def check_epsilon(epsilon: Any) -> float:
    """epsilon must be a finite real number > 0."""
    return check_positive_real(
        epsilon,
        "epsilon",
        why="it keeps 1/sqrt(var + epsilon) finite for a constant channel",
    )


def check_momentum(momentum: Any) -> float:
    """momentum must be a real number in [0, 1] (the weight of the old value).

    Keras's meaning: ``moving = moving * momentum + batch * (1 - momentum)``.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"momentum must be a float; received {describe(momentum)}"
        )
    number = float(momentum)
    if not 0.0 <= number <= 1.0:
        raise ValueError(
            "momentum must be in [0, 1] (moving = moving * momentum + batch "
            f"* (1 - momentum)); received {momentum!r}"
        )
    return number


def channel_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """Normalize a (possibly negative) channel axis for rank ``ndim``.

    >>> channel_axis(-1, 4)
    3
    """
    check_int(axis, name)
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
            f"{name} must have rank >= 2 (a batch axis and a feature axis); "
            f"received shape {x.shape} (rank {x.ndim}); reshape a single "
            "vector to (1, D) or (N, 1)"
        )


def check_normalizable(x: np.ndarray, axis: Any) -> int:
    """Check that batch norm can normalize ``x`` along the kept ``axis``.

    ``x`` needs rank >= 2, an ``axis`` in range, at least one channel and
    at least one value per channel (no axis of size 0).  Returns the
    non-negative channel axis.
    """
    check_rank(x)
    kept = channel_axis(axis, x.ndim)
    if x.shape[kept] == 0:
        raise ValueError(
            f"x has 0 channels on axis {axis} (shape {x.shape}); expected "
            "at least 1 channel to normalize"
        )
    if x.size == 0:
        empty = [i for i, size in enumerate(x.shape) if size == 0]
        raise ValueError(
            f"x of shape {x.shape} is empty (size 0 on axis {empty[0]}); "
            "expected at least one value per channel (a batch of at least "
            "one example)"
        )
    return kept


def check_training_count(x: np.ndarray, kept: int, axis: Any) -> int:
    """Training needs m >= 2 values per channel; returns m.

    With m = 1 the batch variance is 0 for every input and the output is
    just ``beta``.
    """
    count = int(x.size // x.shape[kept])
    if count < 2:
        raise ValueError(
            "Expected more than 1 value per channel when training; received "
            f"x of shape {x.shape} with axis={axis}, which leaves {count} "
            "value per channel"
        )
    return count


def check_finite(array: np.ndarray, name: str) -> np.ndarray:
    """Every value of ``array`` must be finite (no NaN, no infinity).

    >>> check_finite(np.array([1.0, np.nan]), "gamma")
    Traceback (most recent call last):
    ...
    ValueError: gamma must be finite; received nan at index 1 (of shape (2,))
    """
    finite = np.isfinite(array)
    if not np.all(finite):
        flat = np.unravel_index(int(np.argmin(finite)), array.shape)
        index = tuple(int(i) for i in flat)
        where = index[0] if len(index) == 1 else index
        raise ValueError(
            f"{name} must be finite; received {float(array[index])!r} at "
            f"index {where} (of shape {array.shape})"
        )
    return array


def check_channel_vector(
    value: Any, name: str, channels: int, *, finite: bool = True
) -> np.ndarray:
    """A per-channel parameter or statistic: a floating array of shape (C,).

    With ``finite=True`` NaN and infinities are refused.
    """
    array = as_float_array(value, name)
    if array.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one value per channel; "
            f"received shape {array.shape}"
        )
    if finite:
        check_finite(array, name)
    return array
