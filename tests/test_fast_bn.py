"""The blocked batch norm path (companion._fast_bn) against the reference.

Below THRESHOLD values per channel it must give the reference's numbers
bit for bit (the book's MLPs are trained through it); above, the same
numbers to float precision, with statistics a few ulp from the exact ones,
for any number of threads.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from companion import _fast_bn
from companion.functional import (
    BatchNormCache,
    batchnorm_backward,
    batchnorm_forward,
)


def _args(shape: tuple[int, ...], axis: int) -> tuple:
    kept = axis % len(shape)
    reduce_axes = tuple(i for i in range(len(shape)) if i != kept)
    broadcast = tuple(
        shape[kept] if i == kept else 1 for i in range(len(shape))
    )
    return kept, reduce_axes, broadcast


def _data(shape, axis, dtype, seed, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    channels = shape[axis % len(shape)]
    x = rng.normal(loc, scale, size=shape).astype(dtype)
    gamma = rng.normal(1.0, 0.5, size=channels).astype(dtype)
    beta = rng.normal(0.0, 0.5, size=channels).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    return x, gamma, beta, dy


def _fast(x, gamma, beta, dy, axis, epsilon=1e-3):
    kept, reduce_axes, broadcast = _args(x.shape, axis)
    y, cache = _fast_bn.training_forward(
        x, gamma, beta, kept, reduce_axes, broadcast, epsilon
    )
    return y, cache, _fast_bn.training_backward(dy, cache)


def _reference(x, gamma, beta, dy, axis, epsilon=1e-3):
    y, cache = batchnorm_forward(x, gamma, beta, axis=axis, epsilon=epsilon)
    return y, cache, batchnorm_backward(dy, cache)


@pytest.fixture
def threads():
    """Restore the module's thread count after a test changes it."""
    saved = _fast_bn.threads()
    yield _fast_bn.threads
    _fast_bn.threads(saved)


# ------------------------------------------------- below the threshold
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((60, 100), -1),  # the experiments' MLP layer: m = 60
        ((240, 100), -1),  # the largest batch of the full-scale files
        ((64, 7, 7, 32), -1),  # the CNN's conv3: m = 3,136
        ((4095, 3), -1),  # one value short of the threshold
        ((5, 16, 9, 91), 1),  # NCHW, m = 4,095
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_below_the_threshold_the_numbers_are_the_references(
    shape, axis, dtype
):
    x, gamma, beta, dy = _data(shape, axis, dtype, seed=1)
    assert x.size // x.shape[axis] < _fast_bn.THRESHOLD
    y, cache, grads = _fast(x, gamma, beta, dy, axis)
    y_ref, cache_ref, grads_ref = _reference(x, gamma, beta, dy, axis)
    assert np.array_equal(y, y_ref) and y.dtype == y_ref.dtype
    for name in ("x_centered", "x_hat", "mean", "var", "inv_std"):
        assert np.array_equal(getattr(cache, name), getattr(cache_ref, name))
    for got, expected in zip(grads, grads_ref, strict=True):
        assert np.array_equal(got, expected) and got.dtype == expected.dtype


def test_other_layouts_take_the_reference_path():
    """A transposed array and rows that no divisor widens to MIN_WIDTH
    give the reference's numbers exactly, above the threshold too."""
    transposed = tuple(
        np.asfortranarray(a) for a in _data((4096, 3), -1, np.float32, 3)
    )
    prime = _data((4099, 3), -1, np.float32, 4)  # 4099 is prime
    assert not transposed[0].flags.c_contiguous
    for x, gamma, beta, dy in (transposed, prime):
        assert _fast_bn._blocked(x, 1) is None
        y, _cache, grads = _fast(x, gamma, beta, dy, -1)
        y_ref, _, grads_ref = _reference(x, gamma, beta, dy, -1)
        assert np.array_equal(y, y_ref)
        for got, expected in zip(grads, grads_ref, strict=True):
            assert np.array_equal(got, expected)


def test_float16_forward_is_the_references():
    """16-bit input is normalized in float32 by the reference path; its
    float32 cache then takes the blocked backward (dy in the cache's
    dtype, as batchnorm_backward passes it)."""
    x, gamma, beta, dy = _data((80, 8, 8, 4), -1, np.float16, 2)
    y, cache, _ = _fast(x, gamma, beta, dy.astype(np.float32), -1)
    y_ref, _, grads_ref = _reference(x, gamma, beta, dy, -1)
    assert np.array_equal(y, y_ref) and y.dtype == np.float16
    grads = _fast_bn.training_backward(dy.astype(np.float32), cache)
    for got, expected in zip(grads, grads_ref, strict=True):
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(
            got.astype(np.float32), expected.astype(np.float32), rtol=1e-3
        )


# ------------------------------------------------- above the threshold
LARGE = [
    ((64, 16, 16, 8), -1),  # NHWC, widened rows
    ((16, 8, 24, 24), 1),  # NCHW
    ((8192, 40), -1),  # (N, D)
    ((5000, 7), -1),  # widened by the divisor 500
    ((4100, 3, 5), 1),  # a middle axis, short inner rows
]


@pytest.mark.parametrize(("shape", "axis"), LARGE)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_above_the_threshold_equal_to_the_reference_to_float_precision(
    shape, axis, dtype
):
    x, gamma, beta, dy = _data(shape, axis, dtype, seed=5)
    assert x.size // x.shape[axis] >= _fast_bn.THRESHOLD
    assert _fast_bn._blocked(x, axis % x.ndim) is not None
    y, cache, (dx, dgamma, dbeta) = _fast(x, gamma, beta, dy, axis)
    y_ref, cache_ref, (dx_r, dgamma_r, dbeta_r) = _reference(
        x, gamma, beta, dy, axis
    )
    assert isinstance(cache, BatchNormCache)
    assert cache.count == cache_ref.count
    assert cache.reduce_axes == cache_ref.reduce_axes
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for got, expected in [
        (y, y_ref),
        (cache.x_centered, cache_ref.x_centered),
        (cache.x_hat, cache_ref.x_hat),
        (cache.inv_std, cache_ref.inv_std),
        (dx, dx_r),
    ]:
        assert got.dtype == expected.dtype and got.shape == expected.shape
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale)
    # dgamma, dbeta: sums of m terms of either sign; compare with the
    # size of the terms (their condition), per channel.
    _kept, reduce_axes, _ = _args(shape, axis)
    terms = np.abs(dy.astype(np.float64))
    for got, expected, weight in [
        (dbeta, dbeta_r, terms),
        (dgamma, dgamma_r, terms * np.abs(cache_ref.x_hat)),
    ]:
        assert got.dtype == expected.dtype and got.shape == expected.shape
        size = weight.sum(axis=reduce_axes)
        assert np.all(np.abs(got - expected) <= rtol * size)


@pytest.mark.parametrize(("shape", "axis"), LARGE)
def test_float32_statistics_are_a_few_ulp_from_the_exact_ones(shape, axis):
    """The blocked sums (float32 parts of <= 64 terms, merged in float64)
    are as accurate as the reference's float64 accumulation, also when
    the mean is 10^4 or 10^6 standard deviations from 0 (where
    E[x^2] - E[x]^2 would lose every digit; the blocks' raw float32 sums
    would lose the mean's low digits)."""
    for loc, scale in [(0.5, 2.0), (1e4, 1.0), (1e6, 1.0)]:
        x, gamma, beta, dy = _data(shape, axis, np.float32, 6, loc, scale)
        _, cache, _ = _fast(x, gamma, beta, dy, axis)
        _kept, reduce_axes, _ = _args(shape, axis)
        exact = x.astype(np.float64)
        np.testing.assert_allclose(
            cache.mean, exact.mean(axis=reduce_axes), rtol=1e-6
        )
        np.testing.assert_allclose(
            cache.var, exact.var(axis=reduce_axes), rtol=1e-6
        )


def test_the_gradient_is_the_derivative_of_the_loss():
    """float64, random upstream gradient: central differences of
    L(x) = sum(dy * y(x)) along random directions match <dx, v>, and the
    same for gamma and beta."""
    x, gamma, beta, dy = _data((32, 12, 12, 3), -1, np.float64, 7)
    kept, reduce_axes, broadcast = _args(x.shape, -1)

    def loss(x_, gamma_, beta_):
        y, _ = _fast_bn.training_forward(
            x_, gamma_, beta_, kept, reduce_axes, broadcast, 1e-3
        )
        return float(np.sum(dy * y))

    _, _, (dx, dgamma, dbeta) = _fast(x, gamma, beta, dy, -1)
    rng = np.random.default_rng(8)
    h = 1e-5
    for _ in range(3):
        v = rng.normal(size=x.shape)
        numeric = loss(x + h * v, gamma, beta) - loss(x - h * v, gamma, beta)
        assert math.isclose(numeric / (2 * h), np.sum(dx * v), rel_tol=1e-6)
    for which, grad in [(1, dgamma), (2, dbeta)]:
        v = rng.normal(size=gamma.shape)
        plus, minus = [x, gamma, beta], [x, gamma, beta]
        plus[which] = plus[which] + h * v
        minus[which] = minus[which] - h * v
        numeric = (loss(*plus) - loss(*minus)) / (2 * h)
        assert math.isclose(numeric, np.sum(grad * v), rel_tol=1e-6)


def test_results_do_not_depend_on_the_number_of_threads(threads):
    x, gamma, beta, dy = _data((64, 16, 16, 32), -1, np.float32, 9)
    results = []
    for count in (1, 2, 3):
        threads(count)
        y, cache, grads = _fast(x, gamma, beta, dy, -1)
        results.append([y, cache.mean, cache.var, *grads])
    for other in results[1:]:
        for got, expected in zip(other, results[0], strict=True):
            assert np.array_equal(got, expected)


def test_a_constant_channel_and_a_nan_channel(threads):
    """A constant channel is normalized to beta with finite gradients; a
    NaN makes its own channel NaN and no other, as in the reference; an
    infinity under np.errstate(invalid="ignore") warns in no thread."""
    x, gamma, beta, dy = _data((64, 16, 16, 3), -1, np.float32, 10)
    x[..., 0] = 3.25
    x[5, 3, 2, 1] = np.nan
    for count in (1, 2):
        threads(count)
        y, cache, (dx, dgamma, _dbeta) = _fast(x, gamma, beta, dy, -1)
        assert cache.var[0] == 0.0 and np.allclose(y[..., 0], beta[0])
        assert np.isfinite(dx[..., 0]).all() and np.isfinite(dgamma[0])
        assert np.isnan(y[..., 1]).all() and np.isnan(cache.mean[1])
        assert np.isfinite(y[..., 2]).all() and np.isfinite(dx[..., 2]).all()
        x_inf = x.copy()
        x_inf[0, 0, 0, 2] = np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with np.errstate(invalid="ignore"):
                y_inf, _, _ = _fast(x_inf, gamma, beta, dy, -1)
        assert np.isnan(y_inf[..., 2]).all()


def test_the_layout_covers_every_row_once():
    for shape, axis in [*LARGE, ((64, 32, 32, 64), -1), ((7, 3, 50, 50), 1)]:
        kept = axis % len(shape)
        lay = _fast_bn._layout(shape, kept)
        assert lay.rows * lay.width == math.prod(shape)
        assert lay.width == lay.lanes * lay.channels * lay.inner
        assert lay.channels == shape[kept]
        covered = [i for start, stop in lay.blocks for i in range(start, stop)]
        assert covered == list(range(lay.rows))
        assert max(stop - start for start, stop in lay.blocks) <= 64
    # NHWC 64x32x32x64: 64 rows of (M, C) side by side, 4,096 wide.
    assert _fast_bn._layout((64, 32, 32, 64), 3).width == 4096


def test_threads_checks_its_argument(threads):
    with pytest.raises(TypeError, match="count"):
        threads(1.5)
    with pytest.raises(ValueError, match="count"):
        threads(0)
    assert threads(3) == 3 and threads() == 3


def test_a_forked_child_starts_its_own_threads(threads):
    """After os.fork the child has none of the parent's pool threads: the
    fork hook drops the pool, and the next call starts a new one."""
    x, gamma, beta, dy = _data((64, 16, 16, 8), -1, np.float32, 11)
    threads(2)
    expected, _, _ = _fast(x, gamma, beta, dy, -1)
    old = _fast_bn._pool()
    _fast_bn._forget_pool()  # what os.register_at_fork runs in a child
    y, _, _ = _fast(x, gamma, beta, dy, -1)
    assert _fast_bn._pool() is not old
    assert np.array_equal(y, expected)
