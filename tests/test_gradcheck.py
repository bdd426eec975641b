"""companion.gradcheck: the checker itself must catch wrong gradients."""

from __future__ import annotations

import numpy as np
import pytest

import companion


def test_numerical_gradient_of_known_functions():
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    np.testing.assert_allclose(
        companion.numerical_gradient(np.sin, x, dy), np.cos(x) * dy, rtol=1e-8
    )
    w = rng.normal(size=(4, 2))
    dz = rng.normal(size=(3, 2))
    np.testing.assert_allclose(
        companion.numerical_gradient(lambda t: t @ w, x, dz),
        dz @ w.T,
        rtol=1e-8,
    )


def test_numerical_gradient_leaves_x_unchanged():
    x = np.linspace(-1, 1, 6).reshape(2, 3)
    copy = x.copy()
    companion.numerical_gradient(np.tanh, x, np.ones_like(x))
    np.testing.assert_array_equal(x, copy)


def test_a_deliberately_wrong_batchnorm_gradient_is_caught():
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    _, cache = companion.batchnorm_forward(x, gamma, beta)
    numeric = companion.numerical_gradient(
        lambda t: companion.batchnorm_forward(t, gamma, beta)[0], x, dy
    )
    right = companion.batchnorm_backward(dy, cache)[0]
    # The classic mistake: treat mu and sigma as constants, i.e. drop the
    # two batch-coupling terms.
    wrong = cache.gamma * cache.inv_std * dy
    # Off by one term: forget that mu depends on x (keep only the variance
    # term).
    half_wrong = (
        cache.gamma
        * cache.inv_std
        * (dy - cache.x_hat * np.mean(dy * cache.x_hat, axis=0))
    )
    assert companion.rel_error(right, numeric) < 1e-7
    assert companion.rel_error(wrong, numeric) > 1e-2
    assert companion.rel_error(half_wrong, numeric) > 1e-2


def test_rel_error():
    a = np.array([1.0, 2.0, 3.0])
    assert companion.rel_error(a, a) == 0.0
    assert companion.rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert companion.rel_error(a, np.zeros(3)) == 1.0
    assert companion.rel_error(a, -a) == 1.0
    np.testing.assert_allclose(
        companion.rel_error(a, a * (1 + 1e-6)), 5e-7, rtol=1e-3
    )
    with pytest.raises(ValueError, match=r"same shape.*\(3,\).*\(2,\)"):
        companion.rel_error(a, a[:2])


def test_numerical_gradient_rejects_bad_arguments():
    x = np.ones((2, 2))
    with pytest.raises(TypeError, match=r"float64.*float32"):
        companion.numerical_gradient(np.sin, x.astype(np.float32), x)
    with pytest.raises(ValueError, match=r"h must be .*> 0; received 0"):
        companion.numerical_gradient(np.sin, x, x, h=0)
    with pytest.raises(
        ValueError,
        match=r"dy must have the shape of f\(x\), \(2, 2\); received "
        r"shape \(3,\)",
    ):
        companion.numerical_gradient(np.sin, x, np.ones(3))
