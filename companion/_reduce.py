"""Sums and means over axes, accumulated in float64 (one home for all
normalizations).

Batch norm (:mod:`companion.functional`), batch renormalization and ghost
batches (:mod:`companion.batch_renorm`) and the per-example normalizations
(:mod:`companion.per_example`) reduce over many values at once; every one
of them reduces through these two functions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["channel_mean", "channel_sum"]


def channel_sum(
    a: np.ndarray, axes: tuple[int, ...], divide_by: int = 1
) -> np.ndarray:
    """Sum over ``axes`` (keepdims), divided by ``divide_by``.

    Accumulated in float64: numpy adds along non-contiguous axes one value
    after another, so a float32 sum over the N*H*W values of a channel
    would lose about log10(N*H*W) digits; accumulating in (at least)
    float64 and rounding once keeps float32 statistics within an ulp or two
    of the exact ones.
    """
    total = a.sum(
        axis=axes, keepdims=True, dtype=np.promote_types(a.dtype, np.float64)
    )
    result: np.ndarray = (total / divide_by).astype(a.dtype, copy=False)
    return result


def channel_mean(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Mean over ``axes`` (keepdims), accumulated in float64."""
    return channel_sum(
        a, axes, divide_by=int(np.prod([a.shape[i] for i in axes]))
    )
