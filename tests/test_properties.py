"""Invariances of batch normalization, as property tests (hypothesis,
float64)."""

from __future__ import annotations

import itertools

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


# ----------------------------------------- chapters 16-17: per-example, merge
@st.composite
def splits(draw, dtype=np.float64):
    """A (m, C) batch and a split of its rows into K parts (some may be
    empty), as K replicas would hold it."""
    rows = draw(st.integers(1, 40))
    channels = draw(st.integers(1, 3))
    x = draw(arrays(dtype, (rows, channels), elements=finite))
    cuts = sorted(draw(st.lists(st.integers(0, rows), max_size=6)))
    bounds = [0, *cuts, rows]
    parts = [x[a:b] for a, b in itertools.pairwise(bounds)]
    return x, parts


def _replica_moments(parts, channels):
    counts, means, m2s = [], [], []
    for part in parts:
        counts.append(len(part))
        if len(part):
            _, mean, m2 = companion.moments.moments(part)
        else:  # an empty replica: its mean and M2 are never read
            mean, m2 = np.full(channels, np.nan), np.full(channels, np.nan)
        means.append(mean)
        m2s.append(np.nan_to_num(m2))
    return counts, np.stack(means), np.stack(m2s)


@given(splits())
def test_merge_moments_of_any_split_is_the_whole_batch(data):
    """Chan et al.'s merge gives the whole batch's mean and biased
    variance, whatever the split (empty replicas included)."""
    x, parts = data
    counts, means, m2s = _replica_moments(parts, x.shape[1])
    count, mean, var = companion.merge_moments(counts, means, m2s)
    assert count == len(x)
    scale = 1.0 + np.abs(x).max()
    np.testing.assert_allclose(
        mean, x.mean(axis=0), rtol=0, atol=1e-12 * scale
    )
    np.testing.assert_allclose(
        var, x.var(axis=0), rtol=1e-9, atol=1e-12 * scale**2
    )
    # the order of the replicas does not matter
    order = np.random.default_rng(len(parts)).permutation(len(parts))
    _, mean2, var2 = companion.merge_moments(
        [counts[i] for i in order], means[order], m2s[order]
    )
    np.testing.assert_allclose(mean2, mean, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(var2, var, rtol=1e-9, atol=1e-12 * scale**2)


@given(splits())
def test_merge_power_sums_of_any_split_is_the_whole_batch_in_float64(data):
    """E[x^2] - E[x]^2 is exact in exact arithmetic: in float64 with values
    of order 100 it agrees with the two-pass variance to ~1e-10 of E[x^2]."""
    x, parts = data
    sums = np.stack([p.sum(axis=0) for p in parts])
    squares = np.stack([(p**2).sum(axis=0) for p in parts])
    count, mean, var = companion.moments.merge_power_sums(
        [len(p) for p in parts], sums, squares
    )
    assert count == len(x)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    tolerance = 1e-10 * (1.0 + (x**2).mean(axis=0))
    assert np.all(np.abs(var - x.var(axis=0)) <= tolerance)


def test_power_sums_cancel_in_float32_with_a_large_offset_and_chan_does_not():
    """A channel with mean 10,000 and standard deviation 1, 4 replicas of
    256 values, everything in float32: E[x^2] and E[x]^2 are about 1e8,
    where a float32 ulp is 8, so their difference (the variance, about 1)
    keeps no correct digit; Chan et al.'s merge never forms those squares
    and keeps four digits (the replicas' means are rounded to float32,
    ulp 0.001 at 10,000, which moves the between-replica term)."""
    rng = np.random.default_rng(0)
    x = rng.normal(10_000.0, 1.0, size=(1024, 4)).astype(np.float32)
    exact = x.astype(np.float64).var(axis=0)
    parts = np.split(x, 4)
    moments = [companion.moments.moments(p) for p in parts]
    _, _, var_chan = companion.merge_moments(
        [m[0] for m in moments],
        np.stack([m[1] for m in moments]),
        np.stack([m[2] for m in moments]),
    )
    sums = [companion.moments.power_sums(p) for p in parts]
    _, _, var_sums = companion.moments.merge_power_sums(
        [s[0] for s in sums],
        np.stack([s[1] for s in sums]),
        np.stack([s[2] for s in sums]),
    )
    assert var_chan.dtype == var_sums.dtype == np.float32
    assert np.all(np.abs(var_chan / exact - 1) < 1e-3)
    assert np.all(np.abs(var_sums / exact - 1) > 0.5)


@given(batches(), st.sampled_from([1e-5, 1e-3]))
def test_layer_norm_output_per_example_has_mean_zero_and_fixed_variance(
    batch, epsilon
):
    """The transpose of batch norm's property: per example (row)."""
    x, _, _, _ = batch
    assume(x.shape[1] >= 2)
    y, _ = companion.layernorm_forward(
        x, np.ones(x.shape[1]), np.zeros(x.shape[1]), epsilon=epsilon
    )
    v = x.var(axis=1)
    np.testing.assert_allclose(y.mean(axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(
        y.var(axis=1), v / (v + epsilon), rtol=1e-9, atol=1e-12
    )


@given(batches(min_rows=1), st.floats(1e-2, 1e2), st.floats(-1e3, 1e3))
def test_group_norm_is_invariant_to_scaling_and_shifting_an_example(
    batch, a, b
):
    """GN_eps(a x_n + b) = GN_{eps/a^2}(x_n), example by example."""
    x, gamma, beta, dy = batch
    channels = x.shape[1]
    assume(channels >= 2)
    groups = 2 if channels == 4 else 1  # >= 2 values per group
    y, _ = companion.groupnorm_forward(
        a * x + b, gamma, beta, groups=groups, epsilon=1e-3
    )
    expected, cache = companion.groupnorm_forward(
        x, gamma, beta, groups=groups, epsilon=1e-3 / a**2
    )
    np.testing.assert_allclose(y, expected, rtol=1e-7, atol=1e-7)
    dx, _, _ = companion.groupnorm_backward(dy, cache)
    # dx of each group of each example sums to zero (the mean is removed)
    per_group = dx.reshape(len(x), groups, -1).sum(axis=2)
    np.testing.assert_allclose(
        per_group, 0.0, atol=1e-8 * (1 + np.abs(dx).max())
    )
