"""Parity with TensorFlow: Keras 3's BatchNormalization,
tf.nn.batch_normalization, GradientTape.

float32 within 1e-5, float64 within 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest

import companion
from companion.tf_env import import_tensorflow

pytestmark = pytest.mark.tf

LAYOUTS = [((32, 6), -1), ((8, 5, 5, 4), -1), ((8, 4, 5, 5), 1)]
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-10}


@pytest.fixture(scope="module")
def tf():
    return import_tensorflow()


@pytest.fixture(scope="module")
def keras(tf):
    import keras

    return keras


def data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    return (
        rng.normal(1.5, 2.0, size=shape).astype(dtype),
        rng.normal(1.0, 0.5, size=channels).astype(dtype),
        rng.normal(size=channels).astype(dtype),
        rng.normal(size=shape).astype(dtype),
    )


def keras_bn(
    keras,
    channels_shape,
    dtype,
    axis,
    momentum=0.99,
    epsilon=1e-3,
    weights=None,
):
    layer = keras.layers.BatchNormalization(
        axis=axis,
        momentum=momentum,
        epsilon=epsilon,
        dtype=np.dtype(dtype).name,
    )
    layer.build(channels_shape)
    if weights is not None:
        layer.set_weights(weights)
    return layer


def close(actual, desired, dtype):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(desired), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_training_forward_matches_keras(keras, shape, axis, dtype):
    x, gamma, beta, _ = data(shape, axis, dtype)
    channels = shape[axis]
    layer = keras_bn(
        keras,
        shape,
        dtype,
        axis,
        weights=[
            gamma,
            beta,
            np.zeros(channels, dtype),
            np.ones(channels, dtype),
        ],
    )
    expected = layer(x, training=True)
    y, _ = companion.batchnorm_forward(x, gamma, beta, axis=axis, epsilon=1e-3)
    assert y.dtype == dtype
    close(y, expected, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_inference_matches_keras_and_tf_nn(tf, keras, shape, axis, dtype):
    x, gamma, beta, _ = data(shape, axis, dtype)
    rng = np.random.default_rng(1)
    channels = shape[axis]
    mean = rng.normal(size=channels).astype(dtype)
    var = rng.uniform(0.5, 3.0, size=channels).astype(dtype)
    y = companion.batchnorm_inference(
        x, gamma, beta, mean, var, axis=axis, epsilon=1e-3
    )

    layer = keras_bn(
        keras, shape, dtype, axis, weights=[gamma, beta, mean, var]
    )
    close(y, layer(x, training=False), dtype)

    bshape = [1] * len(shape)
    bshape[axis] = channels
    expected = tf.nn.batch_normalization(
        x,
        mean.reshape(bshape),
        var.reshape(bshape),
        beta.reshape(bshape),
        gamma.reshape(bshape),
        1e-3,
    )
    close(y, expected, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_training_forward_matches_tf_nn_moments(tf, shape, axis, dtype):
    x, gamma, beta, _ = data(shape, axis, dtype, seed=2)
    reduce_axes = [i for i in range(len(shape)) if i != axis % len(shape)]
    mean, var = tf.nn.moments(tf.constant(x), axes=reduce_axes, keepdims=True)
    bshape = mean.shape
    expected = tf.nn.batch_normalization(
        x, mean, var, beta.reshape(bshape), gamma.reshape(bshape), 1e-3
    )
    y, cache = companion.batchnorm_forward(x, gamma, beta, axis=axis)
    close(y, expected, dtype)
    close(cache.var, tf.reshape(var, [-1]), dtype)


@pytest.mark.parametrize(
    "backward",
    [companion.batchnorm_backward, companion.batchnorm_backward_staged],
    ids=["closed_form", "staged"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_gradients_match_gradient_tape(
    tf, keras, shape, axis, dtype, backward
):
    x, gamma, beta, dy = data(shape, axis, dtype, seed=3)
    channels = shape[axis]
    layer = keras_bn(
        keras,
        shape,
        dtype,
        axis,
        weights=[
            gamma,
            beta,
            np.zeros(channels, dtype),
            np.ones(channels, dtype),
        ],
    )
    x_tf = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_tf)
        loss = tf.reduce_sum(layer(x_tf, training=True) * dy)
    tf_dx, tf_dgamma, tf_dbeta = tape.gradient(
        loss, [x_tf, layer.gamma, layer.beta]
    )

    _, cache = companion.batchnorm_forward(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = backward(dy, cache)
    # Gradients are sums over up to 200 terms: compare relative to their scale.
    scale = {np.float32: 1e-5, np.float64: 1e-10}[dtype]
    for ours, theirs in ((dx, tf_dx), (dgamma, tf_dgamma), (dbeta, tf_dbeta)):
        theirs = np.asarray(theirs)
        np.testing.assert_allclose(
            ours, theirs, rtol=scale, atol=scale * np.abs(theirs).max()
        )


@pytest.mark.parametrize("momentum", [0.99, 0.9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_layer_matches_keras_after_five_training_calls(
    keras, shape, axis, dtype, momentum
):
    channels = shape[axis]
    rng = np.random.default_rng(4)
    gamma, beta = (
        rng.normal(1.0, 0.3, size=channels).astype(dtype),
        rng.normal(size=channels).astype(dtype),
    )
    ours = companion.BatchNorm(axis=axis, momentum=momentum, epsilon=1e-3)
    ours.set_weights(
        [gamma, beta, np.zeros(channels, dtype), np.ones(channels, dtype)]
    )
    theirs = keras_bn(
        keras,
        shape,
        dtype,
        axis,
        momentum=momentum,
        weights=ours.get_weights(),
    )
    for step in range(5):
        x = rng.normal(2.0 + step, 1.0 + step, size=shape).astype(dtype)
        close(ours(x, training=True), theirs(x, training=True), dtype)
    for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        close(a, b, dtype)
    assert ours.moving_mean.dtype == dtype
    x = rng.normal(size=shape).astype(dtype)
    close(ours(x), theirs(x, training=False), dtype)


def test_keras_moving_variance_is_the_biased_batch_variance(keras):
    """Keras's moving variance uses the biased (1/m) variance, unlike
    PyTorch's running_var."""
    x = np.array([[0.0], [2.0]])  # biased variance 1, unbiased 2
    layer = keras_bn(keras, x.shape, np.float64, -1, momentum=0.0)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_variance.numpy(), [1.0])
    ours = companion.BatchNorm(momentum=0.0)
    ours(x, training=True)
    np.testing.assert_allclose(ours.moving_variance, [1.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_inference_gradients_match_gradient_tape(
    tf, keras, shape, axis, dtype
):
    """A frozen layer (training=False): Keras differentiates the affine map
    of the moving statistics, as batchnorm_inference_backward does."""
    x, gamma, beta, dy = data(shape, axis, dtype, seed=5)
    channels = shape[axis]
    rng = np.random.default_rng(6)
    mean = rng.normal(size=channels).astype(dtype)
    var = rng.uniform(0.5, 3.0, size=channels).astype(dtype)
    layer = keras_bn(
        keras, shape, dtype, axis, weights=[gamma, beta, mean, var]
    )
    x_tf = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_tf)
        loss = tf.reduce_sum(layer(x_tf, training=False) * dy)
    expected = tape.gradient(loss, [x_tf, layer.gamma, layer.beta])

    ours = companion.BatchNorm(axis=axis)
    ours.set_weights([gamma, beta, mean, var])
    ours(x)
    dx = ours.backward(dy)
    functional = companion.batchnorm_inference_backward(
        dy, x, gamma, mean, var, axis=axis
    )
    scale = {np.float32: 1e-5, np.float64: 1e-10}[dtype]
    grads = (dx, ours.grads["gamma"], ours.grads["beta"])
    for mine, same, theirs in zip(grads, functional, expected, strict=True):
        theirs = np.asarray(theirs)
        assert mine.dtype == dtype
        np.testing.assert_array_equal(mine, same)
        np.testing.assert_allclose(
            mine, theirs, rtol=scale, atol=scale * np.abs(theirs).max()
        )
