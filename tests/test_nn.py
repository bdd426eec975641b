"""companion.nn: every layer gradient-checked (float64, random dy), bad input, Keras parity."""

from __future__ import annotations

import numpy as np
import pytest

import companion
from companion import nn
from companion.tf_env import import_tensorflow


def rng(seed=0):
    return np.random.default_rng(seed)


def check_layer_gradients(layer, x, seed=1):
    """dx and every parameter gradient against central differences of sum(layer(x) * dy)."""
    y = layer(x, training=True)
    dy = rng(seed).normal(size=y.shape)
    dx = layer.backward(dy)
    assert (
        companion.rel_error(
            dx,
            companion.numerical_gradient(
                lambda t: layer(t, training=True), x, dy
            ),
        )
        < 1e-7
    )
    for name, param in layer.params.items():
        analytic = layer.grads[name].copy()
        saved = param.copy()

        def f(value, param=param):
            param[...] = value
            return layer(x, training=True)

        numeric = companion.numerical_gradient(f, saved, dy)
        param[...] = saved
        assert companion.rel_error(analytic, numeric) < 1e-7, name
    return dx


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel_size", [3, (2, 3), 5])
def test_conv2d_gradients(padding, kernel_size):
    conv = nn.Conv2D(3, kernel_size, padding=padding, seed=0)
    x = rng().normal(size=(2, 6, 5, 2))
    conv(x)
    conv.bias[...] = rng(2).normal(size=3)
    check_layer_gradients(conv, x)
    assert conv(x).shape[1:3] == (
        (6, 5)
        if padding == "same"
        else (6 - conv.kernel_size[0] + 1, 5 - conv.kernel_size[1] + 1)
    )


def test_conv2d_without_bias():
    conv = nn.Conv2D(2, 3, use_bias=False, seed=0)
    check_layer_gradients(conv, rng().normal(size=(2, 4, 4, 1)))
    assert conv.weight_names() == ["kernel"] and conv.bias is None


@pytest.mark.parametrize(
    ("pool_size", "strides", "shape"),
    [(2, None, (2, 7, 7, 3)), (2, 2, (2, 4, 6, 2)), (3, 1, (2, 5, 5, 2))],
)
def test_maxpool_gradients(pool_size, strides, shape):
    pool = nn.MaxPool2D(pool_size, strides)
    x = rng().normal(size=shape)
    check_layer_gradients(pool, x)
    s = pool.strides
    assert pool(x).shape == (
        shape[0],
        (shape[1] - pool_size) // s + 1,
        (shape[2] - pool_size) // s + 1,
        shape[3],
    )


def test_maxpool_ties_send_the_gradient_to_one_position():
    pool = nn.MaxPool2D(2)
    x = np.zeros((1, 2, 2, 1))
    pool(x, training=True)
    dx = pool.backward(np.ones((1, 1, 1, 1)))
    assert dx.sum() == 1.0 and dx[0, 0, 0, 0] == 1.0


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_gradients(use_bias):
    check_layer_gradients(
        nn.Dense(4, use_bias=use_bias, seed=0), rng().normal(size=(5, 3))
    )


@pytest.mark.parametrize(
    "layer", [nn.ReLU(), nn.Sigmoid(), nn.Flatten()], ids=repr
)
def test_parameter_free_layer_gradients(layer):
    x = rng().normal(size=(3, 4, 2))
    check_layer_gradients(layer, x)
    assert (
        layer.params == {} and layer.get_weights() == []
        if layer.built
        else True
    )


def test_sigmoid_does_not_overflow():
    y = nn.Sigmoid()(np.array([[-1000.0, 0.0, 1000.0]]))
    np.testing.assert_array_equal(y, [[0.0, 0.5, 1.0]])


def test_sequential_gradient_through_the_source_block():
    """conv -> BN -> ReLU -> pool -> flatten -> dense, end to end."""
    model = nn.Sequential(
        [
            nn.Conv2D(3, 3, padding="same", seed=0),
            nn.BatchNorm(momentum=0.9),
            nn.ReLU(),
            nn.MaxPool2D(2),
            nn.Flatten(),
            nn.Dense(4, seed=1),
        ]
    )
    x = rng().normal(size=(3, 4, 4, 2))
    y = model(x, training=True)
    dy = rng(1).normal(size=y.shape)
    dx = model.backward(dy)
    numeric = companion.numerical_gradient(
        lambda t: model(t, training=True), x, dy
    )
    assert companion.rel_error(dx, numeric) < 1e-6
    assert list(model.params) == [
        "0.kernel",
        "0.bias",
        "1.gamma",
        "1.beta",
        "5.kernel",
        "5.bias",
    ]
    assert len(model) == 6 and "Conv2D(filters=3" in repr(model)


def test_softmax_cross_entropy_value_and_gradient():
    logits = rng().normal(size=(4, 3))
    labels = np.array([0, 2, 1, 2])
    loss, dlogits = nn.softmax_cross_entropy(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(
        loss, -np.mean(np.log(p[np.arange(4), labels])), rtol=1e-12
    )
    numeric = companion.numerical_gradient(
        lambda z: np.array(nn.softmax_cross_entropy(z, labels)[0]),
        logits,
        np.array(1.0),
    )
    assert companion.rel_error(dlogits, numeric) < 1e-8
    huge, _ = nn.softmax_cross_entropy(
        np.array([[1000.0, -1000.0]]), np.array([1])
    )
    assert huge == pytest.approx(2000.0)


def test_sgd_with_momentum_follows_keras_rule():
    dense = nn.Dense(2, seed=0)
    dense(np.ones((1, 3)))
    w0 = dense.kernel.copy()
    opt = nn.SGD(learning_rate=0.1, momentum=0.9)
    g = np.full((3, 2), 0.5)
    dense.grads = {"kernel": g, "bias": np.zeros(2)}
    opt.step([dense])
    opt.step([dense])
    # v1 = -0.1 g; v2 = 0.9 v1 - 0.1 g; w = w0 + v1 + v2
    np.testing.assert_allclose(
        dense.kernel, w0 - 0.1 * g + (0.9 * -0.1 * g - 0.1 * g), rtol=1e-6
    )


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("make", "x", "error", "pattern"),
    [
        (
            lambda: nn.Conv2D(2, 3),
            np.ones((2, 5, 5)),
            ValueError,
            r"x must be an NHWC batch of rank 4; received shape \(2, 5, 5\)",
        ),
        (
            lambda: nn.Conv2D(2, 5),
            np.ones((1, 4, 6, 1)),
            ValueError,
            r"x of height x width 4 x 6 is smaller than the 5 x 5 kernel with padding='valid'",
        ),
        (
            lambda: nn.MaxPool2D(3),
            np.ones((1, 2, 5, 1)),
            ValueError,
            r"smaller than the 3 x 3 pooling window",
        ),
        (lambda: nn.MaxPool2D(2), np.ones((4, 4)), ValueError, r"rank 4"),
        (
            lambda: nn.Dense(3),
            np.ones((2, 3, 4)),
            ValueError,
            r"x must have shape \(N, features\); received shape \(2, 3, 4\) \(use Flatten first\)",
        ),
        (lambda: nn.Flatten(), np.ones(3), ValueError, r"batch axis"),
        (
            lambda: nn.ReLU(),
            np.array([["a"]]),
            TypeError,
            r"x must be a real floating or integer array",
        ),
    ],
)
def test_layers_reject_bad_input(make, x, error, pattern):
    layer = make()
    with pytest.raises(error, match=pattern):
        layer(x)
    assert not layer.built


@pytest.mark.parametrize(
    ("make", "good", "bad", "pattern"),
    [
        (
            lambda: nn.Conv2D(2, 3),
            np.ones((1, 5, 5, 3)),
            np.ones((1, 5, 5, 4)),
            r"x has 4 channels \(shape \(1, 5, 5, 4\)\); this Conv2D was built for 3 input channels",
        ),
        (
            lambda: nn.Dense(2),
            np.ones((1, 3)),
            np.ones((1, 4)),
            r"x has 4 features; this Dense was built for 3",
        ),
    ],
)
def test_a_built_layer_rejects_another_input_size_and_stays_unchanged(
    make, good, bad, pattern
):
    layer = make()
    layer(good, training=True)
    before = layer.get_weights()
    with pytest.raises(ValueError, match=pattern):
        layer(bad)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (
            lambda: nn.Conv2D(0, 3),
            ValueError,
            r"filters must be >= 1; received 0",
        ),
        (
            lambda: nn.Conv2D(2, 2.5),
            TypeError,
            r"kernel_size must be an int; received 2.5",
        ),
        (
            lambda: nn.Conv2D(2, (3, 3, 3)),
            ValueError,
            r"kernel_size must be an int or a pair of ints; received \(3, 3, 3\)",
        ),
        (
            lambda: nn.Conv2D(2, 3, padding="full"),
            ValueError,
            r"padding must be \"same\" or \"valid\"; received 'full'",
        ),
        (lambda: nn.MaxPool2D(0), ValueError, r"pool_size must be >= 1"),
        (
            lambda: nn.Dense(True),
            TypeError,
            r"units must be an int; received True",
        ),
        (
            lambda: nn.SGD(learning_rate=0),
            ValueError,
            r"learning_rate must be finite and > 0; received 0",
        ),
        (
            lambda: nn.SGD(learning_rate="0.1"),
            TypeError,
            r"learning_rate must be a float; received '0.1'",
        ),
        (
            lambda: nn.SGD(momentum=2.0),
            ValueError,
            r"momentum must be in \[0, 1\]",
        ),
        (
            lambda: nn.Sequential([nn.ReLU(), "relu"]),
            TypeError,
            r"layers\[1\] must be a companion layer; received 'relu'",
        ),
    ],
)
def test_bad_constructor_arguments(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_backward_before_forward_and_wrong_dy():
    dense = nn.Dense(2)
    with pytest.raises(
        ValueError,
        match=r"backward\(dy\) needs a preceding forward call; this Dense has not been called",
    ):
        dense.backward(np.ones((1, 2)))
    dense(np.ones((3, 4)))
    with pytest.raises(
        ValueError,
        match=r"dy must have the shape of the last output \(3, 2\); received shape \(3, 3\)",
    ):
        dense.backward(np.ones((3, 3)))
    with pytest.raises(
        TypeError, match=r"training must be a bool; received 1"
    ):
        dense(np.ones((3, 4)), training=1)


def test_weights_io_errors_leave_models_unchanged():
    model = nn.Sequential(
        [nn.Dense(3, seed=0), nn.ReLU(), nn.Dense(2, seed=1)]
    )
    with pytest.raises(
        ValueError, match=r"get_weights\(\) needs a built Dense"
    ):
        model.get_weights()
    with pytest.raises(
        ValueError, match=r"set_weights\(\) needs a built Dense"
    ):
        nn.Dense(2).set_weights([np.ones((1, 2)), np.ones(2)])
    model.build((None, 4))
    before = model.get_weights()
    with pytest.raises(
        ValueError, match=r"weights must be a list of 4 arrays .*received 3"
    ):
        model.set_weights(before[:3])
    bad = [w.copy() for w in before]
    bad[3] = np.ones(5)
    with pytest.raises(
        ValueError,
        match=r"weights for Dense\(units=2\) 'bias' have shape \(5,\); expected \(2,\)",
    ):
        model.set_weights(bad)
    with pytest.raises(
        ValueError,
        match=r"weights\['kernel'\] has shape \(4, 4\); expected \(4, 3\)",
    ):
        model.layers[0].set_weights([np.ones((4, 4)), np.ones(3)])
    with pytest.raises(
        ValueError,
        match=r"weights must be a list of 2 arrays \(kernel, bias\) for Dense",
    ):
        model.layers[0].set_weights({"kernel": 1})
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    model.set_weights([w + 1 for w in before])
    np.testing.assert_array_equal(model.layers[2].bias, before[3] + 1)


def test_sgd_refuses_to_step_without_gradients():
    dense = nn.Dense(2)
    dense(np.ones((1, 3)))
    with pytest.raises(
        ValueError,
        match=r"Dense has no gradient for 'kernel'; run backward\(\) before step\(\)",
    ):
        nn.SGD().step([dense])


def test_loss_rejects_bad_labels():
    z = np.zeros((2, 3))
    with pytest.raises(
        ValueError,
        match=r"labels must be in \[0, 2\]; received values from 0 to 3",
    ):
        nn.softmax_cross_entropy(z, np.array([0, 3]))
    with pytest.raises(TypeError, match=r"labels must be integers"):
        nn.softmax_cross_entropy(z, np.array([0.0, 1.0]))
    with pytest.raises(
        ValueError,
        match=r"labels must have shape \(2,\); received shape \(3,\)",
    ):
        nn.softmax_cross_entropy(z, np.array([0, 1, 1]))
    with pytest.raises(
        ValueError,
        match=r"logits must have shape \(N, classes\); received shape \(3,\)",
    ):
        nn.softmax_cross_entropy(np.zeros(3), np.array([0]))


# -------------------------------------------------------------- Keras parity
@pytest.fixture(scope="module")
def keras():
    import_tensorflow()
    import keras

    return keras


def keras_grads(keras_layer, x, dy):
    import tensorflow as tf

    x_tf = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_tf)
        loss = tf.reduce_sum(keras_layer(x_tf, training=True) * dy)
    grads = tape.gradient(loss, [x_tf, *keras_layer.trainable_weights])
    return [np.asarray(g) for g in grads]


@pytest.mark.tf
@pytest.mark.parametrize(
    ("ours", "theirs", "shape"),
    [
        (
            lambda: nn.Conv2D(4, 5, padding="same"),
            lambda k: k.layers.Conv2D(4, 5, padding="same"),
            (2, 7, 7, 3),
        ),
        (
            lambda: nn.Conv2D(4, (2, 4), padding="same"),
            lambda k: k.layers.Conv2D(4, (2, 4), padding="same"),
            (2, 6, 7, 3),
        ),
        (
            lambda: nn.Conv2D(4, 3, padding="valid"),
            lambda k: k.layers.Conv2D(4, 3, padding="valid"),
            (2, 6, 6, 2),
        ),
        (
            lambda: nn.MaxPool2D(2),
            lambda k: k.layers.MaxPooling2D(2, strides=2),
            (2, 7, 7, 3),
        ),
        (lambda: nn.Dense(5), lambda k: k.layers.Dense(5), (4, 6)),
        (lambda: nn.Flatten(), lambda k: k.layers.Flatten(), (2, 3, 3, 2)),
        (lambda: nn.ReLU(), lambda k: k.layers.ReLU(), (3, 4)),
        (
            lambda: nn.Sigmoid(),
            lambda k: k.layers.Activation("sigmoid"),
            (3, 4),
        ),
        (
            lambda: nn.BatchNorm(momentum=0.9),
            lambda k: k.layers.BatchNormalization(momentum=0.9),
            (8, 3, 3, 4),
        ),
    ],
    ids=[
        "conv_same_5x5",
        "conv_same_even",
        "conv_valid",
        "maxpool_7to3",
        "dense",
        "flatten",
        "relu",
        "sigmoid",
        "batchnorm",
    ],
)
def test_layers_match_keras_forward_and_backward(keras, ours, theirs, shape):
    x = rng().normal(size=shape)
    keras_layer = theirs(keras)
    keras_layer.dtype_policy = "float64"
    keras_layer.build(shape)
    for weight in (
        keras_layer.weights
    ):  # random, non-trivial weights (bias and beta included)
        weight.assign(rng(len(weight.path)).normal(size=weight.shape))
    layer = ours()
    layer.build(shape, np.float64)
    layer.set_weights(keras_layer.get_weights())
    y = layer(x, training=True)
    np.testing.assert_allclose(
        y, keras_layer(x, training=True), rtol=1e-10, atol=1e-10
    )
    dy = rng(1).normal(size=y.shape)
    dx = layer.backward(dy)
    expected = keras_grads(keras_layer, x, dy)
    np.testing.assert_allclose(dx, expected[0], rtol=1e-10, atol=1e-10)
    for name, grad in zip(layer.trainable_names(), expected[1:]):
        np.testing.assert_allclose(
            layer.grads[name], grad, rtol=1e-10, atol=1e-10
        )


@pytest.mark.tf
def test_sgd_and_loss_match_keras(keras):
    import tensorflow as tf

    logits = rng().normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 1, 0])
    ours, dlogits = nn.softmax_cross_entropy(logits, labels)
    z = tf.Variable(logits)
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            labels, z
        )
    np.testing.assert_allclose(ours, float(loss), rtol=1e-6)
    np.testing.assert_allclose(
        dlogits, tape.gradient(loss, z), rtol=1e-5, atol=1e-7
    )

    w0 = rng(1).normal(size=(3, 2)).astype(np.float32)
    variable = tf.Variable(w0)
    optimizer = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    dense = nn.Dense(2, use_bias=False)
    dense.build((None, 3))
    dense.set_weights([w0])
    sgd = nn.SGD(learning_rate=0.1, momentum=0.9)
    for step in range(5):
        g = rng(10 + step).normal(size=(3, 2)).astype(np.float32)
        optimizer.apply_gradients([(tf.constant(g), variable)])
        dense.grads = {"kernel": g}
        sgd.step([dense])
    np.testing.assert_allclose(
        dense.kernel, variable.numpy(), rtol=1e-6, atol=1e-6
    )
