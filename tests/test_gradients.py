"""Backward passes against finite differences, and staged against closed
form (float64)."""

from __future__ import annotations

import numpy as np
import pytest

import companion

BACKWARDS = [companion.batchnorm_backward, companion.batchnorm_backward_staged]
LAYOUTS = [
    ((7, 4), -1),
    ((4, 3, 3, 2), -1),
    ((3, 2, 4, 3), 1),
    ((3, 5, 2), -1),
    ((2, 3, 2, 2, 2), -2),
]


def problem(shape, axis, seed=0, epsilon=1e-3):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    return {
        "x": rng.normal(1.0, 2.0, size=shape),
        "gamma": rng.normal(size=channels),
        "beta": rng.normal(size=channels),
        "dy": rng.normal(
            size=shape
        ),  # random upstream gradient: dy = ones would give dx = 0
        "axis": axis,
        "epsilon": epsilon,
    }


@pytest.mark.parametrize("backward", BACKWARDS, ids=["closed_form", "staged"])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_gradients_match_finite_differences(backward, shape, axis):
    p = problem(shape, axis)
    x, gamma, beta, dy = p["x"], p["gamma"], p["beta"], p["dy"]
    kw = {"axis": axis, "epsilon": p["epsilon"]}
    _, cache = companion.batchnorm_forward(x, gamma, beta, **kw)
    dx, dgamma, dbeta = backward(dy, cache)

    num_dx = companion.numerical_gradient(
        lambda t: companion.batchnorm_forward(t, gamma, beta, **kw)[0], x, dy
    )
    num_dgamma = companion.numerical_gradient(
        lambda g: companion.batchnorm_forward(x, g, beta, **kw)[0], gamma, dy
    )
    num_dbeta = companion.numerical_gradient(
        lambda b: companion.batchnorm_forward(x, gamma, b, **kw)[0], beta, dy
    )

    assert np.linalg.norm(dx) > 1e-3  # a non-trivial gradient is being checked
    assert companion.rel_error(dx, num_dx) <= 1e-7
    assert companion.rel_error(dgamma, num_dgamma) <= 1e-7
    assert companion.rel_error(dbeta, num_dbeta) <= 1e-7


@pytest.mark.parametrize(("shape", "axis"), [*LAYOUTS, ((64, 8, 8, 16), -1)])
@pytest.mark.parametrize("epsilon", [1e-3, 1e-5, 1.0])
def test_staged_equals_closed_form(shape, axis, epsilon):
    p = problem(shape, axis, seed=1, epsilon=epsilon)
    _, cache = companion.batchnorm_forward(
        p["x"], p["gamma"], p["beta"], axis=axis, epsilon=epsilon
    )
    closed = companion.batchnorm_backward(p["dy"], cache)
    staged = companion.batchnorm_backward_staged(p["dy"], cache)
    for a, b in zip(closed, staged, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(
            a, b, rtol=1e-10, atol=1e-10 * np.abs(a).max()
        )


def test_gradient_of_a_constant_upstream_gradient_is_zero():
    """Why gradient checks need a random dy: with dy = ones, dx is 0."""
    p = problem((16, 3), -1)
    _, cache = companion.batchnorm_forward(p["x"], p["gamma"], p["beta"])
    dx, _, dbeta = companion.batchnorm_backward(np.ones((16, 3)), cache)
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)
    np.testing.assert_allclose(dbeta, 16.0)


def test_float32_gradients_agree_with_float64():
    p = problem((32, 5), -1, seed=2)
    _, c64 = companion.batchnorm_forward(p["x"], p["gamma"], p["beta"])
    _, c32 = companion.batchnorm_forward(
        p["x"].astype(np.float32),
        p["gamma"].astype(np.float32),
        p["beta"].astype(np.float32),
    )
    for g64, g32 in zip(
        companion.batchnorm_backward(p["dy"], c64),
        companion.batchnorm_backward(p["dy"].astype(np.float32), c32),
        strict=True,
    ):
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_inference_gradients_match_finite_differences(shape, axis):
    """The affine map of inference mode: dx, dgamma and dbeta."""
    p = problem(shape, axis, seed=3)
    x, gamma, beta, dy = p["x"], p["gamma"], p["beta"], p["dy"]
    rng = np.random.default_rng(4)
    mean = rng.normal(size=gamma.shape)
    var = rng.uniform(0.5, 3.0, size=gamma.shape)
    kw = {"axis": axis, "epsilon": p["epsilon"]}

    def infer(t=x, g=gamma, b=beta):
        return companion.batchnorm_inference(t, g, b, mean, var, **kw)

    dx, dgamma, dbeta = companion.batchnorm_inference_backward(
        dy, x, gamma, mean, var, **kw
    )
    numeric = [
        companion.numerical_gradient(lambda t: infer(t=t), x, dy),
        companion.numerical_gradient(lambda g: infer(g=g), gamma, dy),
        companion.numerical_gradient(lambda b: infer(b=b), beta, dy),
    ]
    for analytic, num in zip((dx, dgamma, dbeta), numeric, strict=True):
        assert np.linalg.norm(analytic) > 1e-3
        assert companion.rel_error(analytic, num) <= 1e-8


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_inference_gradients_keep_the_dtypes(dtype):
    p = problem((16, 3), -1, seed=5)
    x, dy = p["x"].astype(dtype), p["dy"].astype(dtype)
    gamma = p["gamma"].astype(np.float32)
    stats = (np.zeros(3, np.float32), np.ones(3, np.float32))
    dx, dgamma, dbeta = companion.batchnorm_inference_backward(
        dy, x, gamma, *stats
    )
    assert dx.dtype == dtype
    assert dgamma.dtype == dbeta.dtype == np.float32
    reference = companion.batchnorm_inference_backward(
        dy.astype(np.float64), x.astype(np.float64), gamma, *stats
    )
    for ours, exact in zip((dx, dgamma, dbeta), reference, strict=True):
        tolerance = 1e-3 if dtype == np.float16 else 1e-6
        np.testing.assert_allclose(ours, exact, rtol=tolerance, atol=tolerance)
