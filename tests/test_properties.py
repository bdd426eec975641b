"""Invariances of batch normalization, as property tests (hypothesis,
float64)."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import companion

finite = st.floats(
    -100.0, 100.0, allow_nan=False, allow_infinity=False, allow_subnormal=False
)


@st.composite
def batches(draw, min_rows: int = 2):
    """A float64 (m, C) batch, its parameters and a random upstream
    gradient."""
    rows = draw(st.integers(min_rows, 12))
    channels = draw(st.integers(1, 4))
    x = draw(arrays(np.float64, (rows, channels), elements=finite))
    gamma = draw(arrays(np.float64, channels, elements=st.floats(0.1, 5.0)))
    beta = draw(arrays(np.float64, channels, elements=st.floats(-5.0, 5.0)))
    dy = draw(
        arrays(np.float64, (rows, channels), elements=st.floats(-1.0, 1.0))
    )
    return x, gamma, beta, dy


@given(batches(), st.sampled_from([1e-5, 1e-3, 1e-1]))
def test_output_has_mean_zero_and_variance_v_over_v_plus_eps(batch, epsilon):
    x, _, _, _ = batch
    channels = x.shape[1]
    y, _cache = companion.batchnorm_forward(
        x, np.ones(channels), np.zeros(channels), epsilon=epsilon
    )
    v = x.var(axis=0)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(
        y.var(axis=0), v / (v + epsilon), rtol=1e-9, atol=1e-12
    )


@given(
    batches(),
    st.floats(1e-2, 1e2),
    st.floats(-1e3, 1e3),
    st.sampled_from([1e-5, 1e-3, 1e-1]),
)
def test_affine_invariance_is_exact_with_rescaled_epsilon(
    batch, a, b, epsilon
):
    """BN_eps(a x + b) = BN_{eps / a^2}(x) for a > 0: exact, whatever the
    data."""
    x, gamma, beta, _ = batch
    y_shifted, _ = companion.batchnorm_forward(
        a * x + b, gamma, beta, epsilon=epsilon
    )
    y, _ = companion.batchnorm_forward(x, gamma, beta, epsilon=epsilon / a**2)
    # a*x + b rounds; the bound scales with the input's magnitude relative
    # to its spread.
    spread = np.maximum(x.std(axis=0), 1e-3)
    tolerance = (
        1e-9 * (np.abs(x).max(axis=0) + abs(b) / a + 1.0) / spread * gamma
    )
    assert np.all(np.abs(y_shifted - y) <= tolerance + 1e-12)


@given(batches(), st.floats(1e-2, 1e2), st.floats(-1e3, 1e3))
def test_affine_invariance_with_small_epsilon(batch, a, b):
    """BN(a x + b) = BN(x) for a > 0, up to a relative error of eps / var."""
    x, gamma, beta, _ = batch
    assume(
        np.all(x.var(axis=0) > 1e-2) and np.all(a**2 * x.var(axis=0) > 1e-2)
    )
    epsilon = 1e-12
    y_shifted, _ = companion.batchnorm_forward(
        a * x + b, gamma, beta, epsilon=epsilon
    )
    y, _ = companion.batchnorm_forward(x, gamma, beta, epsilon=epsilon)
    np.testing.assert_allclose(
        y_shifted, y, rtol=0, atol=1e-7 * (1 + gamma.max())
    )


@given(batches())
def test_input_gradient_sums_to_zero_and_is_orthogonal_to_x_hat_up_to_epsilon(
    batch,
):
    """sum_i dx_i = 0, and <dx, x_hat> =
    eps/(var+eps) * gamma/sqrt(var+eps) * sum(dy * x_hat).

    The second right-hand side vanishes only for eps = 0: dx is orthogonal to
    x_hat exactly when epsilon is zero, and nearly so when eps << var.
    """
    x, gamma, beta, dy = batch
    # With epsilon = 1e-12, a (nearly) constant channel turns rounding
    # residue of the mean into x_hat values of order 1e-8 whose sum is not
    # 0: only spread-out
    # channels are checked there.
    spread_out = bool(np.all(x.var(axis=0) > 1e-2))
    for epsilon in (1e-3, 1e-12) if spread_out else (1e-3,):
        _, cache = companion.batchnorm_forward(x, gamma, beta, epsilon=epsilon)
        dx, _, _ = companion.batchnorm_backward(dy, cache)
        scale = gamma * cache.inv_std.ravel()
        bound = 1e-10 * (1 + scale.max()) * x.shape[0]
        np.testing.assert_allclose(dx.sum(axis=0), 0.0, atol=bound)
        inner = np.sum(dx * cache.x_hat, axis=0)
        expected = (
            epsilon
            / (cache.var + epsilon)
            * scale
            * np.sum(dy * cache.x_hat, axis=0)
        )
        np.testing.assert_allclose(inner, expected, atol=bound)
        if epsilon == 1e-12:
            np.testing.assert_allclose(
                inner, 0.0, atol=1e-9 * (1 + scale.max()) * x.shape[0]
            )


@given(batches())
def test_gamma_sqrt_var_and_beta_mean_give_back_x(batch):
    x, _, _, _ = batch
    epsilon = 1e-3
    v, mu = x.var(axis=0), x.mean(axis=0)
    y, _ = companion.batchnorm_forward(
        x, np.sqrt(v + epsilon), mu, epsilon=epsilon
    )
    np.testing.assert_allclose(
        y, x, rtol=1e-9, atol=1e-9 * (1 + np.abs(x).max())
    )


@given(batches())
def test_a_bias_before_batch_norm_changes_nothing(batch):
    x, gamma, beta, _ = batch
    bias = np.linspace(-50, 50, x.shape[1])
    y, _ = companion.batchnorm_forward(x, gamma, beta)
    y_biased, _ = companion.batchnorm_forward(x + bias, gamma, beta)
    np.testing.assert_allclose(
        y_biased,
        y,
        atol=1e-9 * (1 + gamma.max()) * (1 + np.abs(x).max()) / np.sqrt(1e-3),
    )
