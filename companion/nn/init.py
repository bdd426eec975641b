"""Weight initialization and argument checks shared by the companion layers."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from companion._validation import describe

__all__ = ["glorot_uniform", "positive_int"]


def glorot_uniform(
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    seed: int | None,
    dtype: Any,
) -> np.ndarray:
    r"""Keras's default kernel initializer: :math:`U(-l, l)`, :math:`l = \sqrt{6 / (n_{in} + n_{out})}`.

    Glorot & Bengio (2010) choose the limit so that activations and gradients
    keep their variance from layer to layer in a linear network.
    """
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return (
        np.random.default_rng(seed)
        .uniform(-limit, limit, size=shape)
        .astype(dtype)
    )


def positive_int(value: Any, name: str) -> int:
    """Check that ``value`` is an int >= 1 and return it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; received {describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; received {value}")
    return int(value)
