"""companion.functional: forward and inference against an independent
reference."""

from __future__ import annotations

import ast
import inspect

import ml_dtypes
import numpy as np
import pytest

import companion
from companion import functional as F

# (shape, axis) pairs: (N, D), NHWC, NCHW, (N, T, C), 5-D, negative axes.
LAYOUTS = [
    ((16, 5), -1),
    ((16, 5), 1),
    ((4, 6, 5, 3), -1),
    ((4, 3, 6, 5), 1),
    ((6, 7, 4), -1),
    ((3, 4, 2, 3, 5), -1),
    ((3, 4, 2, 3, 5), 1),
    ((3, 4, 2, 3, 5), -3),
    ((8, 3), 0),  # statistics over the "feature" axis: the kept axis is 0
]


def reference(x, gamma, beta, axis, epsilon):
    """Batch norm written independently: move the channel axis last,
    flatten the rest."""
    moved = np.moveaxis(x, axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    mean = flat.mean(axis=0)
    var = flat.var(axis=0)  # numpy's two-pass, biased variance
    y = gamma * (moved - mean) / np.sqrt(var + epsilon) + beta
    return np.moveaxis(y, -1, axis), mean, var


def channel_params(rng, shape, axis):
    channels = shape[axis]
    return rng.normal(size=channels), rng.normal(size=channels)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_forward_matches_reference(shape, axis):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=shape)
    gamma, beta = channel_params(rng, shape, axis)
    y, cache = companion.batchnorm_forward(
        x, gamma, beta, axis=axis, epsilon=1e-3
    )
    expected, mean, var = reference(x, gamma, beta, axis, 1e-3)
    assert y.shape == x.shape and y.dtype == np.float64
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(cache.var, var, rtol=1e-12)
    assert cache.count == x.size // shape[axis]


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_inference_matches_reference(shape, axis):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape)
    gamma, beta = channel_params(rng, shape, axis)
    channels = shape[axis]
    mean, var = rng.normal(size=channels), rng.uniform(0.5, 2.0, size=channels)
    y = companion.batchnorm_inference(
        x, gamma, beta, mean, var, axis=axis, epsilon=1e-3
    )
    bshape = [1] * x.ndim
    bshape[axis] = channels
    expected = gamma.reshape(bshape) * (x - mean.reshape(bshape)) / np.sqrt(
        var.reshape(bshape) + 1e-3
    ) + beta.reshape(bshape)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_inference_with_batch_statistics_equals_training_forward():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 4))
    gamma, beta = channel_params(rng, x.shape, -1)
    y_train, cache = companion.batchnorm_forward(x, gamma, beta)
    y_infer = companion.batchnorm_inference(
        x, gamma, beta, cache.mean, cache.var
    )
    np.testing.assert_allclose(y_infer, y_train, rtol=1e-12, atol=1e-12)


def test_inference_accepts_a_single_example():
    y = companion.batchnorm_inference(
        np.array([[1.0, 2.0]]),
        np.ones(2),
        np.zeros(2),
        np.zeros(2),
        np.ones(2),
        epsilon=1e-3,
    )
    np.testing.assert_allclose(y, [[1.0, 2.0]] / np.sqrt(1.001))


def test_nchw_equals_transposed_nhwc():
    rng = np.random.default_rng(3)
    nhwc = rng.normal(size=(4, 5, 6, 3))
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    y_nhwc, _ = companion.batchnorm_forward(nhwc, gamma, beta, axis=-1)
    y_nchw, _ = companion.batchnorm_forward(
        nhwc.transpose(0, 3, 1, 2), gamma, beta, axis=1
    )
    np.testing.assert_allclose(
        y_nchw.transpose(0, 2, 3, 1), y_nhwc, rtol=1e-13, atol=1e-13
    )


def test_cache_has_named_fields_and_is_not_a_bare_tuple():
    x = np.arange(12.0).reshape(4, 3)
    _, cache = companion.batchnorm_forward(x, np.ones(3), np.zeros(3))
    assert isinstance(cache, companion.BatchNormCache)
    assert {
        "x_hat",
        "x_centered",
        "mean",
        "var",
        "inv_std",
        "gamma",
        "epsilon",
        "axis",
    } <= set(cache._fields)
    np.testing.assert_allclose(cache.mean, [4.5, 5.5, 6.5])
    assert cache.reduce_axes == (0,)


def test_two_pass_variance_survives_an_offset_that_defeats_the_naive_one():
    rng = np.random.default_rng(4)
    x64 = 1e4 + rng.normal(size=(256, 4))
    x32 = x64.astype(np.float32)
    true_var = x64.var(axis=0)  # about 1

    naive = (
        np.mean(x32 * x32, axis=0) - np.mean(x32, axis=0) ** 2
    )  # E[x^2] - E[x]^2 in float32
    assert np.max(np.abs(naive - true_var)) > 0.5, (
        "the naive formula should lose every digit here"
    )

    _, cache = companion.batchnorm_forward(
        x32, np.ones(4, np.float32), np.zeros(4, np.float32)
    )
    assert cache.var.dtype == np.float32
    np.testing.assert_allclose(cache.var, true_var, atol=1e-2)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_low_precision_is_computed_in_float32_and_returned_in_the_input_dtype(
    dtype,
):
    rng = np.random.default_rng(5)
    x64 = rng.normal(50.0, 3.0, size=(64, 3))
    x = x64.astype(dtype)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, cache = companion.batchnorm_forward(x, gamma, beta)
    assert y.dtype == np.dtype(dtype)
    assert cache.x_hat.dtype == np.float32
    # The float32 result rounded once to the input dtype: within one unit
    # of its last place.
    expected, _, _ = reference(x.astype(np.float32), 1.0, 0.0, -1, 1e-3)
    np.testing.assert_allclose(cache.x_hat, expected, rtol=1e-5, atol=1e-6)
    ulp = float(ml_dtypes.finfo(dtype).eps)
    np.testing.assert_allclose(
        y.astype(np.float32), expected, rtol=ulp, atol=ulp
    )
    y_inf = companion.batchnorm_inference(
        x, gamma, beta, cache.mean, cache.var
    )
    assert y_inf.dtype == np.dtype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    dx, dgamma, dbeta = companion.batchnorm_backward(dy, cache)
    assert (
        dx.dtype == np.dtype(dtype)
        and dgamma.dtype == np.float32
        and dbeta.dtype == np.float32
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_dtype_is_the_input_dtype(dtype):
    x = np.random.default_rng(6).normal(size=(8, 2)).astype(dtype)
    y, _cache = companion.batchnorm_forward(x, np.ones(2), np.zeros(2))
    assert y.dtype == dtype
    assert (
        companion.batchnorm_inference(
            x, np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)
        ).dtype
        == dtype
    )


def test_integer_input_is_cast_to_float64():
    x = np.arange(12).reshape(6, 2)
    y, _ = companion.batchnorm_forward(x, np.ones(2), np.zeros(2))
    expected, _, _ = reference(x.astype(np.float64), 1.0, 0.0, -1, 1e-3)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    y_list, _ = companion.batchnorm_forward(
        [[1, 2], [3, 5]], [1, 1], [0, 0]
    )  # nested lists too
    assert y_list.dtype == np.float64


def test_constant_channel_gives_finite_outputs_and_gradients():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(10, 3))
    x[:, 1] = 4.2  # zero variance
    beta = np.array([0.1, -0.7, 0.3])
    y, cache = companion.batchnorm_forward(x, np.ones(3), beta)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[:, 1], beta[1])
    grads = companion.batchnorm_backward(rng.normal(size=y.shape), cache)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_non_finite_input_poisons_only_its_own_channel():
    x = np.random.default_rng(8).normal(size=(6, 3))
    x[2, 0] = np.nan
    x[4, 2] = np.inf
    with pytest.warns(
        RuntimeWarning, match="invalid value"
    ):  # numpy's inf - inf
        y, cache = companion.batchnorm_forward(x, np.ones(3), np.zeros(3))
    assert np.all(np.isnan(y[:, 0])) and np.all(np.isnan(y[:, 2]))
    assert np.all(np.isfinite(y[:, 1]))
    assert (
        np.isnan(cache.mean[0])
        and np.isinf(cache.mean[2])
        and np.isfinite(cache.var[1])
    )
    y_inf = companion.batchnorm_inference(
        x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)
    )
    assert np.isnan(y_inf[2, 0]) and np.isinf(
        y_inf[4, 2]
    )  # inference maps element-wise
    assert np.isfinite(y_inf).sum() == x.size - 2


def test_inputs_are_not_modified():
    rng = np.random.default_rng(9)
    x, gamma, beta, dy = (
        rng.normal(size=(5, 2)),
        rng.normal(size=2),
        rng.normal(size=2),
        rng.normal(size=(5, 2)),
    )
    copies = [a.copy() for a in (x, gamma, beta, dy)]
    _, cache = companion.batchnorm_forward(x, gamma, beta)
    companion.batchnorm_backward(dy, cache)
    companion.batchnorm_backward_staged(dy, cache)
    for original, copy in zip((x, gamma, beta, dy), copies, strict=True):
        np.testing.assert_array_equal(original, copy)


def _loops(function) -> list[str]:
    tree = ast.parse(inspect.getsource(function).lstrip())
    return [
        type(node).__name__
        for node in ast.walk(tree)
        if isinstance(node, (ast.For, ast.While))
    ]


@pytest.mark.parametrize(
    "function",
    [
        F.batchnorm_forward,
        F.batchnorm_backward,
        F.batchnorm_backward_staged,
        F.batchnorm_inference,
        F.batchnorm_inference_backward,
        F.layernorm_forward,
        F.layernorm_backward,
        F.groupnorm_forward,
        F.groupnorm_backward,
        F.batch_renorm_forward,
        F.batch_renorm_backward,
        F.ghost_batchnorm_forward,
        F.ghost_batchnorm_backward,
        F.renorm_correction,
        F.merge_power_sums,
    ],
)
def test_math_has_no_python_loops(function):
    """Vectorized numpy: no for/while over elements, channels or the batch
    (comprehensions over the handful of named parameters are allowed)."""
    assert _loops(function) == []


def test_float32_statistics_of_a_large_channel_are_accurate_to_a_few_ulp():
    """Per-channel sums over N*H*W = 25,000 values are accumulated in
    float64: plain float32 accumulation along non-contiguous axes would be
    off by ~1e-4 relative."""
    x64 = np.random.default_rng(10).normal(0.5, 2.0, size=(100, 25, 10, 4))
    x32 = x64.astype(np.float32)
    _, cache = companion.batchnorm_forward(
        x32, np.ones(4, np.float32), np.zeros(4, np.float32)
    )
    exact = x32.astype(np.float64)
    np.testing.assert_allclose(
        cache.mean, exact.mean(axis=(0, 1, 2)), rtol=1e-6
    )
    np.testing.assert_allclose(cache.var, exact.var(axis=(0, 1, 2)), rtol=1e-6)


def test_chapter_16_functions_leave_their_inputs_alone():
    rng = np.random.default_rng(20)
    x, dy = rng.normal(size=(8, 2, 6)), rng.normal(size=(8, 2, 6))
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    stats = rng.normal(size=6), rng.uniform(0.5, 2.0, size=6)
    copies = [a.copy() for a in (x, dy, gamma, beta, *stats)]
    for forward, backward, kwargs, args in (
        (F.layernorm_forward, F.layernorm_backward, {}, ()),
        (F.groupnorm_forward, F.groupnorm_backward, {"groups": 3}, ()),
        (
            F.ghost_batchnorm_forward,
            F.ghost_batchnorm_backward,
            {"virtual_batch_size": 4},
            (),
        ),
        (F.batch_renorm_forward, F.batch_renorm_backward, {}, stats),
    ):
        _, cache = forward(x, gamma, beta, *args, **kwargs)
        backward(dy, cache)
    for original, copy in zip(
        (x, dy, gamma, beta, *stats), copies, strict=True
    ):
        np.testing.assert_array_equal(original, copy)
