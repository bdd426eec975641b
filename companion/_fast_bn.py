r"""Training-mode batch norm for large channels, arranged for memory speed.

The same arithmetic as :func:`companion.functional.batchnorm_forward` and
:func:`~companion.functional.batchnorm_backward` (chapters 2 and 3), with
the same contract as their private cores ``_training_forward`` and
``_training_backward``, reorganized for the memory hierarchy (chapter 19,
*How fast is it?*):

* the tensor is walked in **blocks** of about 64 K values that fit in the
  CPU's L2 cache, and every step of a pass is done on a block while it is
  there, so each pass costs one trip to main memory instead of one per
  numpy operation;
* the tensor is viewed as a 2-D array whose rows are **wide** (thousands
  of values: ``k`` consecutive rows of an (M, C) view side by side, the
  per-channel vectors tiled ``k`` times), because numpy broadcasts a
  vector of C = 64 values over a long array one short row at a time;
* the mean and the variance come from **one read** of ``x``: every block
  is centered on its own mean and its centered sums are merged in
  float64 (Chan, Golub and LeVeque's update for partitioned data):

  .. math::

      \mu = \frac{1}{m}\sum_b \left(n_b c_b + S_{1,b}\right), \qquad
      m\,\sigma^2 = \sum_b \left(S_{2,b} + 2 d_b S_{1,b}
                                  + n_b d_b^2\right),

  with :math:`c_b` the center of block :math:`b`, :math:`S_{1,b},
  S_{2,b}` the sums of :math:`x - c_b` and :math:`(x - c_b)^2` over its
  :math:`n_b` values and :math:`d_b = c_b - \mu`; the two-pass formula's
  protection against a mean that is large compared with the spread is
  kept, and every float32 partial sum has at most a few dozen terms
  (float64-quality statistics, as the reference's float64 accumulation);
* the blocks of a pass are shared between two threads (numpy releases
  the GIL inside its loops); each block's partial sums have their own
  slot and are combined in a fixed order, so the result does not depend
  on the number of threads.

Given the statistics, every element is computed by the reference's own
sequence of operations, so ``y``, ``x_hat`` and ``dx`` differ from the
reference only through the last bits of the per-channel sums.  Inputs
with fewer than :data:`THRESHOLD` values per channel (every MLP of the
book: at most 240) take the reference path unchanged, so their numbers
are bit-identical.  ``tests/test_fast_bn.py`` checks both.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from companion._validation import check_int
from companion.functional import (
    BatchNormCache,
    _cast_grads,
    _training_backward,
    _training_forward,
)

__all__ = ["THRESHOLD", "threads", "training_backward", "training_forward"]

THRESHOLD = 4096
"""Values per channel from which the blocked path is taken."""
BLOCK = 1 << 16
"""Values per block (256 KB in float32)."""
MIN_ROW, MAX_ROW = 1024, 4096
"""Rows narrower than MIN_ROW values are widened up to MAX_ROW."""
MIN_WIDTH = 256
"""Narrower views (no divisor widens them) take the reference path."""
MAX_TERMS = 64
"""The most values a float32 partial sum adds before float64 takes over."""

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class _Layout(NamedTuple):
    """How a tensor is walked: an (R, L) view cut into row blocks."""

    rows: int
    """R, the rows of the view."""
    width: int
    """L = lanes * channels * inner, the values in a row."""
    lanes: int
    """k, the rows of the natural (A, C * B) view put side by side."""
    channels: int
    inner: int
    """B, the product of the axes after the channel axis (1 for NHWC)."""
    blocks: tuple[tuple[int, int], ...]
    """Row ranges [start, stop) of the blocks."""


@functools.lru_cache(maxsize=64)
def _layout(shape: tuple[int, ...], kept: int) -> _Layout:
    """The (R, L) view and its blocks for a C-contiguous ``shape``."""
    channels = shape[kept]
    outer = math.prod(shape[:kept])
    inner = math.prod(shape[kept + 1 :])
    row = channels * inner
    lanes = 1
    if row < MIN_ROW:  # widen: the largest k dividing outer, k*row <= MAX
        for k in range(min(outer, MAX_ROW // row), 0, -1):
            if outer % k == 0:
                lanes = k
                break
    rows, width = outer // lanes, lanes * row
    step = max(1, min(MAX_TERMS, BLOCK // width))
    blocks = tuple(
        (start, min(start + step, rows)) for start in range(0, rows, step)
    )
    return _Layout(rows, width, lanes, channels, inner, blocks)


def _spread(vector: np.ndarray, lay: _Layout) -> np.ndarray:
    """A per-channel vector (C,) laid out along a row of the view (L,)."""
    row = np.empty(lay.width, vector.dtype)
    _spread_into(row, vector, lay)
    return row


def _spread_into(row: np.ndarray, vector: np.ndarray, lay: _Layout) -> None:
    """Write the per-channel ``vector`` (C,) into ``row`` (L,) in place."""
    row.reshape(lay.lanes, lay.channels, lay.inner)[...] = vector[
        None, :, None
    ]


def _channel_sums(block: np.ndarray, lay: _Layout) -> np.ndarray:
    """Per-channel sums of a block of rows, float64 (C,).

    Float32 partial sums of at most a few dozen terms (along the rows of
    the block, or pairwise along the contiguous inner axis), added in
    float64.
    """
    if lay.inner == 1:
        partial = np.add.reduce(block, axis=0).reshape(lay.lanes, -1)
    else:
        cube = block.reshape(-1, lay.channels, lay.inner)
        partial = np.add.reduce(cube, axis=2)
    result: np.ndarray = np.add.reduce(partial, axis=0, dtype=np.float64)
    return result


def _channel_dots(a: np.ndarray, b: np.ndarray, lay: _Layout) -> np.ndarray:
    """Per-channel sums of ``a * b`` over a block, float64 (C,)."""
    if lay.inner == 1:
        partial = np.einsum("ij,ij->j", a, b).reshape(lay.lanes, -1)
    else:
        shape = (-1, lay.channels, lay.inner)
        partial = np.einsum("rcb,rcb->rc", a.reshape(shape), b.reshape(shape))
    result: np.ndarray = np.add.reduce(partial, axis=0, dtype=np.float64)
    return result


# ------------------------------------------------------------------ threads
def _available_cpus() -> int:
    """The CPUs this process may run on (all of them where unknown)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return len(affinity(0))
    return os.cpu_count() or 1  # pragma: no cover - not Linux


_THREADS = min(2, _available_cpus())
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def threads(count: int | None = None) -> int:
    """The number of threads a pass uses; ``count`` (>= 1) sets it.

    Two by default (one on a single-CPU machine), as TensorFlow uses every
    core.  Results do not depend on it: each block's partial sums have
    their own slot and are combined in a fixed order.
    """
    global _THREADS
    if count is not None:
        _THREADS = check_int(count, "count", low=1)
    return _THREADS


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(thread_name_prefix="companion-bn")
        return _POOL


def _forget_pool() -> None:
    """A forked child has none of its parent's threads: start afresh."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_pool)


def _each_block(work: Callable[[range], None], blocks: int) -> None:
    """Run ``work(indices)`` over the block indices, split between threads.

    The caller's numpy error state (``np.errstate``) applies in every
    thread: each worker runs in a copy of the caller's context.
    """
    parts = min(_THREADS, blocks)
    if parts <= 1:
        work(range(blocks))
        return
    bounds = [blocks * i // parts for i in range(parts + 1)]
    futures = [
        _pool().submit(
            contextvars.copy_context().run,
            work,
            range(bounds[i], bounds[i + 1]),
        )
        for i in range(1, parts)
    ]
    work(range(bounds[0], bounds[1]))
    for future in futures:
        future.result()


# ------------------------------------------------------------------ forward
def _blocked(array: np.ndarray, kept: int) -> _Layout | None:
    """The layout of the blocked path for ``array``, or None when the
    reference path is taken: fewer than :data:`THRESHOLD` values per
    channel, a dtype other than float32 and float64, a non-contiguous
    array, or rows that cannot be made :data:`MIN_WIDTH` wide."""
    if (
        array.size // array.shape[kept] < THRESHOLD
        or array.dtype not in _FLOATS
        or not array.flags.c_contiguous
    ):
        return None
    lay = _layout(tuple(array.shape), kept)
    return lay if lay.width >= MIN_WIDTH else None


def _moments(xv: np.ndarray, lay: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of the view, in float64.

    Each block is centered on its own (float32) mean c; the sums of the
    deviations t = x - c (exact in floating point for x near c) and of
    their squares are merged in float64.  The raw sums of x would lose
    the low digits of a large mean (a float32 partial sum of values
    near 1e4 has an ulp of 1/64).
    """
    blocks = lay.blocks
    size = len(blocks)
    centers = np.empty((size, lay.channels))
    counts = np.empty((size, 1))
    s1 = np.empty((size, lay.channels))
    s2 = np.empty((size, lay.channels))
    per_row = lay.lanes * lay.inner

    def work(indices: range) -> None:
        buffer = np.empty((blocks[0][1] - blocks[0][0], lay.width), xv.dtype)
        center_row = np.empty(lay.width, xv.dtype)
        for i in indices:
            start, stop = blocks[i]
            block, t = xv[start:stop], buffer[: stop - start]
            n = (stop - start) * per_row
            center = (_channel_sums(block, lay) / n).astype(xv.dtype)
            _spread_into(center_row, center, lay)
            np.subtract(block, center_row, out=t)
            s1[i] = _channel_sums(t, lay)
            s2[i] = _channel_dots(t, t, lay)
            centers[i], counts[i] = center, n

    _each_block(work, size)
    m = lay.rows * per_row
    mean = (counts * centers + s1).sum(axis=0) / m
    d = centers - mean
    m2 = (s2 + 2.0 * d * s1 + counts * d * d).sum(axis=0)
    return mean, np.maximum(m2, 0.0) / m


def training_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    kept: int,
    reduce_axes: tuple[int, ...],
    shape: tuple[int, ...],
    eps: float,
) -> tuple[np.ndarray, BatchNormCache]:
    """``companion.functional._training_forward``, blocked for large m.

    Same arguments (checked) and results.  Below :data:`THRESHOLD` values
    per channel (and for the other cases of :func:`_blocked`) it *is*
    that function.
    """
    lay = _blocked(x, kept)
    if lay is None:
        return _training_forward(x, gamma, beta, kept, reduce_axes, shape, eps)
    dtype = x.dtype
    xv = x.reshape(lay.rows, lay.width)
    mean64, var64 = _moments(xv, lay)
    mean, var = mean64.astype(dtype), var64.astype(dtype)
    inv_std = 1.0 / np.sqrt(var + dtype.type(eps))
    gamma_c, beta_c = gamma.astype(dtype), beta.astype(dtype)
    mean_r, inv_r, gamma_r, beta_r = (
        _spread(v, lay) for v in (mean, inv_std, gamma_c, beta_c)
    )
    x_centered, x_hat, y = (np.empty_like(xv) for _ in range(3))

    def work(indices: range) -> None:
        for i in indices:
            rows = slice(*lay.blocks[i])
            np.subtract(xv[rows], mean_r, out=x_centered[rows])
            np.multiply(x_centered[rows], inv_r, out=x_hat[rows])
            np.multiply(gamma_r, x_hat[rows], out=y[rows])
            np.add(y[rows], beta_r, out=y[rows])

    _each_block(work, len(lay.blocks))
    cache = BatchNormCache(
        x_centered=x_centered.reshape(x.shape),
        x_hat=x_hat.reshape(x.shape),
        mean=mean,
        var=var,
        inv_std=inv_std.reshape(shape),
        gamma=gamma_c.reshape(shape),
        epsilon=eps,
        axis=kept,
        reduce_axes=reduce_axes,
        x_dtype=x.dtype,
        gamma_dtype=gamma.dtype,
        beta_dtype=beta.dtype,
    )
    return y.reshape(x.shape), cache


# ----------------------------------------------------------------- backward
def training_backward(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``companion.functional._training_backward``, blocked for large m.

    ``dy`` checked and in the cache's dtype, as there.  Below
    :data:`THRESHOLD` values per channel (and for the other cases of
    :func:`_blocked`) it *is* that function.
    """
    x_hat = cache.x_hat
    lay = _blocked(x_hat, cache.axis)
    if lay is None:
        return _training_backward(dy, cache)
    dtype = x_hat.dtype
    hv = x_hat.reshape(lay.rows, lay.width)
    gv = np.ascontiguousarray(dy).reshape(lay.rows, lay.width)
    blocks = lay.blocks
    sum_dy = np.empty((len(blocks), lay.channels))
    sum_dy_xhat = np.empty((len(blocks), lay.channels))

    def sums(indices: range) -> None:
        for i in indices:
            rows = slice(*blocks[i])
            sum_dy[i] = _channel_sums(gv[rows], lay)
            sum_dy_xhat[i] = _channel_dots(gv[rows], hv[rows], lay)

    _each_block(sums, len(blocks))
    dbeta = sum_dy.sum(axis=0).astype(dtype)
    dgamma = sum_dy_xhat.sum(axis=0).astype(dtype)
    m = cache.count
    scale_r = _spread((cache.gamma * cache.inv_std).reshape(-1), lay)
    dbeta_r, dgamma_r = _spread(dbeta / m, lay), _spread(dgamma / m, lay)
    dx = np.empty_like(hv)

    def input_gradient(indices: range) -> None:
        buffer = np.empty((blocks[0][1] - blocks[0][0], lay.width), dtype)
        for i in indices:
            start, stop = blocks[i]
            rows, t = slice(start, stop), buffer[: stop - start]
            np.subtract(gv[rows], dbeta_r, out=t)
            np.multiply(hv[rows], dgamma_r, out=dx[rows])
            np.subtract(t, dx[rows], out=dx[rows])
            np.multiply(scale_r, dx[rows], out=dx[rows])

    _each_block(input_gradient, len(blocks))
    return _cast_grads(dx.reshape(x_hat.shape), dgamma, dbeta, cache)
