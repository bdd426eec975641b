"""companion.BatchNorm: Keras semantics, state, save/load (TensorFlow parity is in test_tf_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest

import companion
from companion import BatchNorm


def batches(n, shape=(16, 3), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(2.0, 3.0, size=shape) for _ in range(n)]


def test_defaults_are_keras_defaults():
    layer = BatchNorm()
    assert (
        layer.axis,
        layer.momentum,
        layer.epsilon,
        layer.center,
        layer.scale,
    ) == (-1, 0.99, 1e-3, True, True)
    assert not layer.built and layer.channels is None and layer.gamma is None
    assert "unbuilt" in repr(layer)


def test_first_call_builds_keras_initial_values_in_the_input_dtype():
    layer = BatchNorm()
    layer(np.zeros((4, 3), np.float32))
    assert layer.built and layer.channels == 3 and "channels=3" in repr(layer)
    np.testing.assert_array_equal(layer.gamma, np.ones(3))
    np.testing.assert_array_equal(layer.beta, np.zeros(3))
    np.testing.assert_array_equal(layer.moving_mean, np.zeros(3))
    np.testing.assert_array_equal(layer.moving_variance, np.ones(3))
    for array in (
        layer.gamma,
        layer.beta,
        layer.moving_mean,
        layer.moving_variance,
    ):
        assert array.dtype == np.float32
    assert BatchNorm()(np.zeros((2, 2), np.float16)).dtype == np.float16
    half = BatchNorm()
    half(np.zeros((2, 2), np.float16))
    assert half.moving_mean.dtype == np.float32  # as Keras's mixed precision
    wide = BatchNorm()
    wide(np.zeros((2, 2), np.int64))
    assert wide.moving_mean.dtype == np.float64


def test_training_uses_batch_statistics_and_updates_moving_ones_keras_style():
    layer = BatchNorm(momentum=0.9)
    moving_mean, moving_var = np.zeros(3), np.ones(3)
    for x in batches(5):
        y = layer(x, training=True)
        expected, _ = companion.batchnorm_forward(
            x, layer.gamma, layer.beta, epsilon=1e-3
        )
        np.testing.assert_allclose(y, expected, rtol=1e-12)
        moving_mean = moving_mean * 0.9 + x.mean(axis=0) * 0.1
        moving_var = (
            moving_var * 0.9 + x.var(axis=0) * 0.1
        )  # biased batch variance
    np.testing.assert_allclose(layer.moving_mean, moving_mean, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, moving_var, rtol=1e-12)


def test_inference_uses_moving_statistics_and_changes_nothing():
    layer = BatchNorm(momentum=0.5)
    for x in batches(3):
        layer(x, training=True)
    before = layer.get_weights()
    x = batches(1, seed=9)[0]
    y = layer(x)  # training=False is the default
    expected = companion.batchnorm_inference(
        x,
        layer.gamma,
        layer.beta,
        layer.moving_mean,
        layer.moving_variance,
        epsilon=1e-3,
    )
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_unbuilt_layer_in_inference_mode_is_x_over_sqrt_one_plus_eps():
    x = np.array([[1.0, -2.0]])
    np.testing.assert_allclose(BatchNorm()(x), x / np.sqrt(1.001))


def test_momentum_extremes():
    x = batches(1)[0]
    frozen = BatchNorm(momentum=1.0)
    frozen(x, training=True)
    np.testing.assert_array_equal(frozen.moving_mean, 0.0)
    latest = BatchNorm(momentum=0.0)
    latest(x, training=True)
    np.testing.assert_allclose(latest.moving_mean, x.mean(axis=0))
    np.testing.assert_allclose(latest.moving_variance, x.var(axis=0))


def test_backward_matches_functional_and_fills_grads():
    rng = np.random.default_rng(1)
    layer = BatchNorm()
    x, dy = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
    layer(x, training=True)
    layer.gamma[...] = rng.normal(size=4)  # in-place assignment takes effect
    layer(x, training=True)
    dx = layer.backward(dy)
    _, cache = companion.batchnorm_forward(x, layer.gamma, layer.beta)
    ref_dx, ref_dgamma, ref_dbeta = companion.batchnorm_backward(dy, cache)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12)
    assert set(layer.grads) == {"gamma", "beta"}
    np.testing.assert_allclose(layer.grads["gamma"], ref_dgamma, rtol=1e-12)
    np.testing.assert_allclose(layer.grads["beta"], ref_dbeta, rtol=1e-12)


def test_layer_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    x, dy = rng.normal(size=(6, 2, 2, 3)), rng.normal(size=(6, 2, 2, 3))
    layer = BatchNorm(axis=-1)
    layer(x, training=True)
    layer.gamma[...] = rng.normal(size=3)
    layer.beta[...] = rng.normal(size=3)
    layer(x, training=True)
    dx = layer.backward(dy)

    def f(t):
        probe = BatchNorm()
        probe.set_weights(layer.get_weights())
        return probe(t, training=True)

    assert (
        companion.rel_error(dx, companion.numerical_gradient(f, x, dy)) < 1e-7
    )


@pytest.mark.parametrize(
    ("center", "scale", "names"),
    [
        (False, True, ["gamma", "moving_mean", "moving_variance"]),
        (True, False, ["beta", "moving_mean", "moving_variance"]),
        (False, False, ["moving_mean", "moving_variance"]),
    ],
)
def test_center_and_scale_drop_beta_and_gamma(center, scale, names):
    rng = np.random.default_rng(3)
    layer = BatchNorm(center=center, scale=scale)
    x, dy = rng.normal(size=(10, 2)), rng.normal(size=(10, 2))
    y = layer(x, training=True)
    assert layer.weight_names() == names and len(layer.get_weights()) == len(
        names
    )
    assert (layer.beta is None) == (not center) and (layer.gamma is None) == (
        not scale
    )
    expected, _ = companion.batchnorm_forward(x, np.ones(2), np.zeros(2))
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    layer.backward(dy)
    assert sorted(layer.grads) == sorted(
        n for n in ("gamma", "beta") if n in names
    )


def test_nchw_layer_matches_nhwc_layer():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 5, 5, 3))
    nhwc, nchw = BatchNorm(axis=-1), BatchNorm(axis=1)
    for _ in range(3):
        y1 = nhwc(x, training=True)
        y2 = nchw(x.transpose(0, 3, 1, 2), training=True)
    np.testing.assert_allclose(
        y2.transpose(0, 2, 3, 1), y1, rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        nchw.moving_variance, nhwc.moving_variance, rtol=1e-12
    )


def test_arrays_keep_their_identity_across_updates():
    layer = BatchNorm()
    layer(batches(1)[0], training=True)
    mean = layer.moving_mean
    for x in batches(3, seed=5):
        layer(x, training=True)
    assert layer.moving_mean is mean


def test_save_and_load_round_trip(tmp_path):
    layer = BatchNorm(momentum=0.8)
    for x in batches(4):
        layer(x, training=True)
    layer.gamma[...] = [0.5, 2.0, 3.0]
    path = tmp_path / "bn.npz"
    layer.save(path)
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == [
            "beta",
            "gamma",
            "moving_mean",
            "moving_variance",
        ]
    fresh = BatchNorm(momentum=0.8)
    fresh.load(path)  # builds an unbuilt layer from the file
    for a, b in zip(layer.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = batches(1, seed=7)[0]
    np.testing.assert_array_equal(fresh(x), layer(x))
    built = BatchNorm()
    built(np.zeros((2, 3)))
    gamma = built.gamma
    built.load(path)
    assert built.gamma is gamma  # loaded in place
    np.testing.assert_array_equal(built.gamma, [0.5, 2.0, 3.0])


def test_set_weights_accepts_keras_order():
    layer = BatchNorm()
    layer.set_weights(
        [np.full(2, 2.0), np.full(2, 3.0), np.full(2, 4.0), np.full(2, 5.0)]
    )
    np.testing.assert_array_equal(layer.gamma, 2.0)
    np.testing.assert_array_equal(layer.beta, 3.0)
    np.testing.assert_array_equal(layer.moving_mean, 4.0)
    np.testing.assert_array_equal(layer.moving_variance, 5.0)
