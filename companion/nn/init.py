"""Weight initialization shared by the companion layers."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["glorot_uniform"]


def glorot_uniform(
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    seed: int | None,
    dtype: Any,
) -> np.ndarray:
    r"""Keras's default kernel initializer, :math:`U(-l, l)`.

    The limit is :math:`l = \sqrt{6 / (n_{in} + n_{out})}`: Glorot & Bengio
    (2010) choose it so that activations and gradients keep their variance
    from layer to layer in a linear network.

    >>> kernel = glorot_uniform((300, 100), 300, 100, seed=0, dtype="float32")
    >>> bool(np.abs(kernel).max() <= np.sqrt(6 / 400)), kernel.dtype
    (True, dtype('float32'))
    """
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    rng = np.random.default_rng(seed)
    return rng.uniform(-limit, limit, size=shape).astype(dtype)
