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


# --------------------------------------------- chapter 16: LN, GN, renorm
def _tape(tf, layer, x, dy, training):
    x_tf = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_tf)
        y = layer(x_tf, training=training)
        loss = tf.reduce_sum(y * dy)
    variables = [x_tf, *layer.trainable_weights]
    return np.asarray(y), [
        np.asarray(g) for g in tape.gradient(loss, variables)
    ]


def close_grads(ours, theirs, dtype):
    scale = TOLERANCE[dtype]
    for mine, expected in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(
            np.reshape(mine, np.shape(expected)),
            expected,
            rtol=scale,
            atol=scale * np.abs(expected).max(),
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("layer_axes", ["channel", "all"])
def test_layer_norm_matches_keras(keras, tf, shape, axis, dtype, layer_axes):
    x, _, _, dy = data(shape, axis, dtype, seed=7)
    axes = axis if layer_axes == "channel" else list(range(1, len(shape)))
    pshape = (shape[axis],) if layer_axes == "channel" else tuple(shape[1:])
    rng = np.random.default_rng(8)
    gamma = rng.normal(1.0, 0.5, size=pshape).astype(dtype)
    beta = rng.normal(size=pshape).astype(dtype)
    theirs = keras.layers.LayerNormalization(
        axis=axes, epsilon=1e-3, dtype=np.dtype(dtype).name
    )
    theirs.build(shape)
    theirs.set_weights([gamma, beta])
    y_k, grads_k = _tape(tf, theirs, x, dy, training=True)
    ours = companion.LayerNorm(axis=axes, epsilon=1e-3)
    ours.build(shape, dtype)
    ours.set_weights([gamma, beta])
    y = ours(x, training=True)
    dx = ours.backward(dy)
    assert y.dtype == dtype
    close(y, y_k, dtype)
    close_grads([dx, ours.grads["gamma"], ours.grads["beta"]], grads_k, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axis", "groups"),
    [
        (shape, axis, groups)
        for shape, axis in LAYOUTS
        # instance norm of (N, C) would normalize one value per group
        for groups in (
            ["one", "two"] + (["instance"] if len(shape) > 2 else [])
        )
    ],
)
def test_group_norm_matches_keras(keras, tf, shape, axis, dtype, groups):
    channels = shape[axis]
    count = {"one": 1, "two": 2, "instance": channels}[groups]
    x, gamma, beta, dy = data(shape, axis, dtype, seed=9)
    theirs = keras.layers.GroupNormalization(
        groups=count, axis=axis, epsilon=1e-3, dtype=np.dtype(dtype).name
    )
    theirs.build(shape)
    theirs.set_weights([gamma, beta])
    y_k, grads_k = _tape(tf, theirs, x, dy, training=True)
    y, cache = companion.groupnorm_forward(
        x, gamma, beta, groups=count, axis=axis, epsilon=1e-3
    )
    close(y, y_k, dtype)
    close_grads(companion.groupnorm_backward(dy, cache), grads_k, dtype)
    layer = companion.GroupNorm(groups=count, axis=axis)
    layer.build(shape, dtype)
    layer.set_weights([gamma, beta])
    np.testing.assert_array_equal(layer(x), y)


RENORM = {
    "renorm": True,
    "renorm_clipping": {"rmax": 1.5, "rmin": 0.6, "dmax": 0.8},
    "renorm_momentum": 0.75,
    "momentum": 0.5,
}


def _train_side_by_side(tf, theirs, ours, shape, dtype, steps=5, seed=10):
    """Five training calls with gradients, then inference: every output,
    gradient and state array within the dtype's tolerance."""
    rng = np.random.default_rng(seed)
    ours.set_weights([np.reshape(w, -1) for w in theirs.get_weights()])
    for step in range(steps):
        x = rng.normal(2.0 + step, 1.0 + step, size=shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        y_k, grads_k = _tape(tf, theirs, x, dy, training=True)
        close(ours(x, training=True), y_k, dtype)
        dx = ours.backward(dy)
        close_grads(
            [dx, ours.grads["gamma"], ours.grads["beta"]], grads_k, dtype
        )
        for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
            close(a, np.reshape(b, -1), dtype)
    x = rng.normal(size=shape).astype(dtype)
    close(ours(x), theirs(x, training=False), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_batch_renorm_matches_keras_3(keras, tf, shape, axis, dtype):
    theirs = keras.layers.BatchNormalization(
        axis=axis, epsilon=1e-3, dtype=np.dtype(dtype).name, **RENORM
    )
    theirs.build(shape)
    ours = companion.BatchNorm(axis=axis, epsilon=1e-3, **RENORM)
    assert [v.path.split("/")[-1] for v in theirs.weights] == (
        ours.weight_names()
    )
    _train_side_by_side(tf, theirs, ours, shape, dtype)


@pytest.fixture(scope="module")
def tf_keras(tf):
    """TensorFlow's legacy Keras (tf-keras 2.x), next to Keras 3 in one
    process: it is imported by its own name, TF_USE_LEGACY_KERAS is not
    needed (that variable only redirects tf.keras)."""
    return pytest.importorskip("tf_keras")


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_batch_renorm_matches_tf_keras(tf, tf_keras, shape, axis):
    """float32 only: tf-keras's renorm fails on float64 layers
    (tf.maximum of a float64 stddev and a float32 sqrt(epsilon))."""
    theirs = tf_keras.layers.BatchNormalization(
        axis=axis, epsilon=1e-3, dtype="float32", **RENORM
    )
    theirs.build(shape)
    ours = companion.BatchNorm(axis=axis, epsilon=1e-3, **RENORM)
    _train_side_by_side(tf, theirs, ours, shape, np.float32)


@pytest.mark.parametrize(
    ("dtype", "renorm"),
    # tf-keras's renorm does not run in float64 (see above)
    [(np.float32, False), (np.float64, False), (np.float32, True)],
)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_ghost_batch_norm_matches_tf_keras(
    tf, tf_keras, shape, axis, dtype, renorm
):
    """virtual_batch_size=4 (Keras 3 has no ghost batches).  momentum 0.5
    and 0.75: tf-keras rounds 1 - momentum through float32 before the
    update, so only values exact in float32 compare at 1e-10 in float64."""
    options = RENORM if renorm else {"momentum": 0.5}
    theirs = tf_keras.layers.BatchNormalization(
        axis=axis,
        epsilon=1e-3,
        virtual_batch_size=4,
        dtype=np.dtype(dtype).name,
        **options,
    )
    theirs.build(shape)
    ours = companion.BatchNorm(
        axis=axis, epsilon=1e-3, virtual_batch_size=4, **options
    )
    _train_side_by_side(tf, theirs, ours, shape, dtype)
