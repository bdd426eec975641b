"""companion.nn: every layer gradient-checked (float64, random dy), nesting,
the optimizer's state, bad input, Keras parity."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import companion
from companion import nn
from companion.base import Layer
from companion.layers import batchnorm_layers, keep_moving_statistics
from companion.tf_env import import_tensorflow


def rng(seed=0):
    return np.random.default_rng(seed)


def check_layer_gradients(layer, x, seed=1, training=True):
    """dx and every parameter gradient against central differences of
    sum(layer(x) * dy)."""
    y = layer(x, training=training)
    dy = rng(seed).normal(size=y.shape)
    dx = layer.backward(dy)
    numeric = companion.numerical_gradient(
        lambda t: layer(t, training=training), x, dy
    )
    assert companion.rel_error(dx, numeric) < 1e-7
    for name, param in layer.params.items():
        analytic = layer.grads[name].copy()
        saved = param.copy()

        def f(value, param=param):
            param[...] = value
            return layer(x, training=training)

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
    kh, kw = conv.kernel_size
    expected = (6, 5) if padding == "same" else (6 - kh + 1, 5 - kw + 1)
    assert conv(x).shape[1:3] == expected


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
    assert layer.built
    assert layer.weight_names() == [] and layer.params == {}
    assert layer.get_weights() == [] and layer.grads == {}
    layer.set_weights([])  # nothing to set, and nothing else accepted
    with pytest.raises(ValueError, match=r"a list of 0 arrays"):
        layer.set_weights([np.ones(2)])


def test_sigmoid_does_not_overflow():
    y = nn.Sigmoid()(np.array([[-1000.0, 0.0, 1000.0]]))
    np.testing.assert_array_equal(y, [[0.0, 0.5, 1.0]])


def test_relu_propagates_nan_and_has_gradient_zero_at_zero():
    """A NaN behind a ReLU stays visible (np.where(x > 0, x, 0) hid it)."""
    relu = nn.ReLU()
    x = np.array([[np.nan, -1.0, 0.0, 2.0, -np.inf, np.inf]])
    y = relu(x, training=True)
    assert np.isnan(y[0, 0])
    np.testing.assert_array_equal(y[0, 1:], [0.0, 0.0, 2.0, 0.0, np.inf])
    dx = relu.backward(np.ones_like(x))
    np.testing.assert_array_equal(dx, [[0.0, 0.0, 0.0, 1.0, 0.0, 1.0]])
    assert relu(np.ones((2, 2), np.float32)).dtype == np.float32


def source_block(seed=0):
    return nn.Sequential(
        [
            nn.Conv2D(3, 3, padding="same", seed=seed),
            nn.BatchNorm(momentum=0.9),
            nn.ReLU(),
            nn.MaxPool2D(2),
            nn.Flatten(),
            nn.Dense(4, seed=seed + 1),
        ]
    )


def test_sequential_gradient_through_the_source_block():
    """conv -> BN -> ReLU -> pool -> flatten -> dense, end to end."""
    model = source_block()
    x = rng().normal(size=(3, 4, 4, 2))
    y = model(x, training=True)
    dy = rng(1).normal(size=y.shape)
    dx = model.backward(dy)
    numeric = companion.numerical_gradient(
        lambda t: model(t, training=True), x, dy
    )
    assert companion.rel_error(dx, numeric) < 1e-6
    names = ["0.kernel", "0.bias", "1.gamma", "1.beta", "5.kernel", "5.bias"]
    assert list(model.params) == names
    assert list(model.grads) == names
    assert model.trainable_names() == names
    np.testing.assert_array_equal(
        model.grads["5.bias"], model.layers[5].grads["bias"]
    )
    assert len(model) == 6 and "Conv2D(filters=3" in repr(model)


def test_sequential_is_a_layer_and_nests():
    dense = nn.Dense(4, use_bias=False, seed=0)  # BN cancels a bias
    inner = nn.Sequential([dense, nn.BatchNorm(), nn.ReLU()])
    model = nn.Sequential([inner, nn.Dense(3, seed=1)])
    assert isinstance(model, Layer) and not model.built
    x = rng().normal(size=(6, 5))
    check_layer_gradients(model, x)
    assert model.built and inner.built
    assert list(model.params) == [
        "0.0.kernel",
        "0.1.gamma",
        "0.1.beta",
        "1.kernel",
        "1.bias",
    ]
    assert model.weight_names()[:5] == [
        "0.0.kernel",
        "0.1.gamma",
        "0.1.beta",
        "0.1.moving_mean",
        "0.1.moving_variance",
    ]
    assert batchnorm_layers(model) == [inner.layers[1]]
    assert "Sequential([\n    Sequential([\n        Dense" in repr(model)
    # The same weights in a flat model compute the same function.
    flat = nn.Sequential([*inner.layers, nn.Dense(3, seed=5)])
    flat.build((None, 5))
    flat.set_weights(model.get_weights())
    np.testing.assert_array_equal(flat(x), model(x))


def test_sequential_grads_are_the_layers_grads():
    model = nn.Sequential([nn.Dense(2, seed=0)])
    model(np.ones((3, 2)), training=True)
    model.backward(np.ones((3, 2)))
    assert model.grads["0.kernel"] is model.layers[0].grads["kernel"]
    with pytest.raises(AttributeError, match=r"set them on the layers"):
        model.grads = {}


def test_keep_moving_statistics_restores_nested_batch_norms():
    bn_inner, bn_outer = nn.BatchNorm(momentum=0.5), nn.BatchNorm()
    model = nn.Sequential(
        [nn.Sequential([nn.Dense(3, seed=0), bn_inner]), bn_outer]
    )
    model(rng().normal(size=(8, 2)), training=True)
    saved = [bn.get_weights() for bn in (bn_inner, bn_outer)]
    with keep_moving_statistics(model):
        model(rng(1).normal(3.0, 2.0, size=(8, 2)), training=True)
        assert not np.allclose(bn_inner.moving_mean, saved[0][2])
    for bn, weights in zip((bn_inner, bn_outer), saved, strict=True):
        for a, b in zip(bn.get_weights(), weights, strict=True):
            np.testing.assert_array_equal(a, b)


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


# ------------------------------------------------------------ the optimizer
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
    expected = w0 - 0.1 * g + (0.9 * -0.1 * g - 0.1 * g)
    np.testing.assert_allclose(dense.kernel, expected, rtol=1e-6)


def test_sgd_steps_a_nested_model_as_its_flat_twin():
    def build(nested):
        layers = [nn.Dense(4, seed=0), nn.BatchNorm(), nn.ReLU()]
        head = nn.Dense(3, seed=1)
        if nested:
            return nn.Sequential([nn.Sequential(layers), head])
        return nn.Sequential([*layers, head])

    models = {True: build(True), False: build(False)}
    for model in models.values():
        model.build((None, 5))
    start = models[True].get_weights()
    optimizers = {key: nn.SGD(0.1, momentum=0.9) for key in models}
    for step in range(3):
        x = rng(step).normal(size=(8, 5))
        labels = np.arange(8) % 3
        for key, model in models.items():
            _, dlogits = nn.softmax_cross_entropy(model(x, True), labels)
            model.backward(dlogits)
            optimizers[key].step(model)
    for a, b in zip(
        models[True].get_weights(), models[False].get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(models[True].get_weights()[0], start[0])


class IdKeyedSGD:
    """The old optimizer's bookkeeping: velocities keyed by id(param)."""

    def __init__(self):
        self.velocity = {}

    def step(self, layer, learning_rate=0.1, momentum=0.9):
        for name, param in layer.params.items():
            v = self.velocity.setdefault(id(param), np.zeros_like(param))
            v *= momentum
            v -= learning_rate * layer.grads[name]
            param += v


def bn_layer():
    layer = nn.BatchNorm()  # gamma and beta: two arrays of one shape
    layer.build((None, 3))
    return layer


ZERO_GRADS = {"gamma": np.zeros(3), "beta": np.zeros(3)}


def stepped_then_freed(optimizer_step):
    """Step a layer (leaving a velocity) and free it; return a new layer
    whose gamma is an array with a freed array's id (CPython reuses the
    memory of freed objects, so new arrays soon get old ids)."""
    old = bn_layer()
    old.grads = {"gamma": np.ones(3), "beta": np.ones(3)}
    optimizer_step(old)
    freed = {id(p) for p in old.params.values()}
    del old
    gc.collect()
    candidates = [np.zeros(3) for _ in range(2000)]
    reused = [a for a in candidates if id(a) in freed]
    assert reused, "no new array reused a freed id"
    new = bn_layer()
    new.gamma = reused[0]  # a layer may be given a new array
    new.gamma[...] = 1.0
    return new


def test_a_new_layer_never_inherits_the_velocity_of_a_freed_one():
    # The failure mode: keyed by id, the new layer moves on a zero gradient.
    old_style = IdKeyedSGD()
    new = stepped_then_freed(old_style.step)
    before = new.get_weights()
    new.grads = ZERO_GRADS
    old_style.step(new)
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(before, new.get_weights(), strict=True)
    ]
    assert any(moved), "id keys should have leaked the old velocity"
    # companion.nn.SGD keys by the layer, weakly: the freed layer's entry
    # went with it, so no later layer can find it, whatever its ids.
    sgd = nn.SGD(0.1, momentum=0.9)
    new = stepped_then_freed(lambda layer: sgd.step([layer]))
    assert len(sgd._velocity) == 0
    before = new.get_weights()
    new.grads = ZERO_GRADS
    sgd.step([new])
    for a, b in zip(before, new.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sgd_slots_round_trip_and_continue_the_same_trajectory():
    def model():
        return nn.Sequential([nn.Dense(3, seed=0), nn.Dense(2, seed=1)])

    def step(net, opt, seed):
        x = rng(seed).normal(size=(4, 5))
        net(x, training=True)
        net.backward(rng(seed + 10).normal(size=(4, 2)))
        opt.step(net)

    first, opt = model(), nn.SGD(0.05, momentum=0.9)
    assert repr(opt) == "SGD(learning_rate=0.05, momentum=0.9)"
    assert [s.shape for s in opt.get_slots(first)] == []  # not built yet
    first.build((None, 5))
    assert all(not s.any() for s in opt.get_slots(first))  # zeros
    for seed in range(3):
        step(first, opt, seed)
    twin, twin_opt = model(), nn.SGD(0.05, momentum=0.9)
    twin.build((None, 5))
    twin.set_weights(first.get_weights())
    twin_opt.set_slots(twin, opt.get_slots(first))
    for seed in range(3, 5):
        step(first, opt, seed)
        step(twin, twin_opt, seed)
    for a, b in zip(first.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    slots = opt.get_slots(first)
    slots[0][...] = 99.0  # copies: the optimizer's state is not aliased
    assert not np.array_equal(opt.get_slots(first)[0], slots[0])


@pytest.mark.parametrize(
    ("values", "error", "pattern"),
    [
        ("abc", TypeError, r"values must be a list of 2 arrays"),
        ([np.zeros((3, 2))], ValueError, r"received 1$"),
        (
            [np.zeros((3, 2)), np.zeros(3)],
            ValueError,
            r"values\[1\] \(Dense 'bias'\) has shape \(3,\); expected \(2,\)",
        ),
        (
            [np.full((3, 2), np.nan), np.zeros(2)],
            ValueError,
            r"values\[0\] \(Dense 'kernel'\) must be finite; received nan",
        ),
    ],
)
def test_set_slots_checks_everything_first(values, error, pattern):
    dense = nn.Dense(2, seed=0)
    dense.build((None, 3))
    sgd = nn.SGD(0.1, momentum=0.9)
    sgd.set_slots([dense], [np.ones((3, 2)), np.ones(2)])
    with pytest.raises(error, match=pattern):
        sgd.set_slots([dense], values)
    for slot in sgd.get_slots([dense]):
        np.testing.assert_array_equal(slot, 1.0)


def test_sgd_refuses_gradients_it_cannot_apply():
    dense = nn.Dense(2)
    dense(np.ones((1, 3)))
    before = dense.get_weights()
    with pytest.raises(
        ValueError,
        match=r"Dense has no gradient for 'kernel'; run backward\(\) before",
    ):
        nn.SGD().step([dense])
    dense.grads = {"kernel": np.ones((3, 2)), "bias": np.ones(3)}
    with pytest.raises(
        ValueError,
        match=r"Dense's gradient for 'bias' has shape \(3,\); expected \(2,",
    ):
        nn.SGD().step([dense])
    with pytest.raises(TypeError, match=r"must be companion layers"):
        nn.SGD().step([dense, "dense"])
    for a, b in zip(before, dense.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing was updated


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
            r"x of height x width 4 x 6 is smaller than the 5 x 5 kernel "
            r"with padding='valid'",
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
            r"x must have shape \(N, features\); received shape "
            r"\(2, 3, 4\) \(use Flatten first\)",
        ),
        (lambda: nn.Flatten(), np.ones(3), ValueError, r"batch axis"),
        (
            lambda: nn.ReLU(),
            np.array([["a"]]),
            TypeError,
            r"x must be a real floating or integer array",
        ),
        (
            lambda: nn.Dense(3),
            np.ones((0, 4)),
            ValueError,
            r"x has an empty batch \(shape \(0, 4\)\); expected at least one",
        ),
        (
            lambda: nn.Conv2D(2, 3, padding="same"),
            np.ones((0, 5, 5, 1)),
            ValueError,
            r"x has an empty batch",
        ),
        (
            lambda: nn.Sequential([nn.Flatten(), nn.Dense(2)]),
            np.ones((0, 2, 2)),
            ValueError,
            r"x has an empty batch \(shape \(0, 2, 2\)\)",
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
            r"x has 4 channels \(shape \(1, 5, 5, 4\)\); this Conv2D was "
            r"built for 3 input channels",
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
    for a, b in zip(before, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (
            lambda: nn.Conv2D(0, 3),
            ValueError,
            r"filters=0 is out of range; expected an int >= 1",
        ),
        (
            lambda: nn.Conv2D(2, 2.5),
            TypeError,
            r"kernel_size must be an int; received 2.5",
        ),
        (
            lambda: nn.Conv2D(2, (3, 3, 3)),
            ValueError,
            r"kernel_size must be an int or a pair of ints; received "
            r"\(3, 3, 3\)",
        ),
        (
            lambda: nn.Conv2D(2, 3, padding="full"),
            ValueError,
            r"padding must be \"same\" or \"valid\"; received 'full'",
        ),
        (
            lambda: nn.Conv2D(2, 3, use_bias="no"),
            TypeError,
            r"use_bias must be a bool; received 'no'",
        ),
        (
            lambda: nn.MaxPool2D(0),
            ValueError,
            r"pool_size=0 is out of range; expected an int >= 1",
        ),
        (
            lambda: nn.MaxPool2D(2, strides=-1),
            ValueError,
            r"strides=-1 is out of range",
        ),
        (
            lambda: nn.Dense(True),
            TypeError,
            r"units must be an int; received True",
        ),
        (
            lambda: nn.Dense(2, seed=-1),
            ValueError,
            r"seed=-1 is out of range; expected an int >= 0",
        ),
        (
            lambda: nn.SGD(learning_rate=0),
            ValueError,
            r"learning_rate must be finite and > 0; received 0",
        ),
        (
            lambda: nn.SGD(learning_rate=float("nan")),
            ValueError,
            r"learning_rate must be finite and > 0; received nan",
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
        match=r"backward\(dy\) needs a preceding forward call; this Dense "
        r"has not been called",
    ):
        dense.backward(np.ones((1, 2)))
    dense(np.ones((3, 4)))
    with pytest.raises(
        ValueError,
        match=r"dy must have the shape of the last output \(3, 2\); "
        r"received shape \(3, 3\)",
    ):
        dense.backward(np.ones((3, 3)))
    with pytest.raises(
        TypeError, match=r"training must be a bool; received 1"
    ):
        dense(np.ones((3, 4)), training=1)
    with pytest.raises(TypeError, match=r"training must be a bool"):
        nn.Sequential([dense])(np.ones((3, 4)), training="yes")


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
        ValueError,
        match=r"weights must be a list of 4 arrays \(0.kernel, 0.bias, "
        r"2.kernel, 2.bias\) for Sequential; received 3 arrays",
    ):
        model.set_weights(before[:3])
    bad = [w.copy() for w in before]
    bad[3] = np.ones(5)
    with pytest.raises(
        ValueError,
        match=r"weights for layers\[2\] \(Dense\(units=2\)\): "
        r"weights\['bias'\] has shape \(5,\); expected \(2,\)",
    ):
        model.set_weights(bad)
    bad = [w.copy() for w in before]
    bad[2][0, 0] = np.inf  # the last layer is bad: the first is not set
    bad[0] += 1.0
    with pytest.raises(
        ValueError,
        match=r"layers\[2\].*weights\['kernel'\] must be finite; received "
        r"inf at index \(0, 0\)",
    ):
        model.set_weights(bad)
    with pytest.raises(
        ValueError,
        match=r"weights\['kernel'\] has shape \(4, 4\); expected \(4, 3\)",
    ):
        model.layers[0].set_weights([np.ones((4, 4)), np.ones(3)])
    with pytest.raises(
        TypeError,
        match=r"weights must be a list of 2 arrays \(kernel, bias\) for "
        r"Dense; received \{'kernel': 1\}",
    ):
        model.layers[0].set_weights({"kernel": 1})
    with pytest.raises(TypeError, match=r"received 7"):
        model.layers[0].set_weights(7)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    model.set_weights(w + 1 for w in before)  # any iterable: a generator
    np.testing.assert_array_equal(model.layers[2].bias, before[3] + 1)


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
    with pytest.raises(
        ValueError, match=r"logits must hold at least one example"
    ):
        nn.softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, np.int64))


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
    # Random, non-trivial weights (bias and beta included); a variance > 0.
    for weight in keras_layer.weights:
        values = rng(len(weight.path)).normal(size=weight.shape)
        if "variance" in weight.path:
            values = np.abs(values) + 0.5
        weight.assign(values)
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
    names = layer.trainable_names()
    assert len(names) == len(expected) - 1
    for name, grad in zip(names, expected[1:], strict=True):
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


def test_backward_without_the_input_gradient_fills_the_same_grads():
    """A network's first layer does not need dx: backward(dy,
    input_gradient=False) skips it, and the layers below the first one with
    parameters, and leaves every gradient as the full backward pass does."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(12, 4, 4, 2)).astype(np.float32)
    dy = rng.normal(size=(12, 3)).astype(np.float32)

    def model():
        return nn.Sequential(
            [
                nn.Flatten(),
                nn.Dense(5, seed=1),
                companion.BatchNorm(),
                nn.ReLU(),
                nn.Dense(3, seed=2),
            ]
        )

    full, short = model(), model()
    for net in (full, short):
        net(x, training=True)
    dx = full.backward(dy)
    assert dx.shape == x.shape
    assert short.backward(dy, input_gradient=False) is None
    assert set(full.grads) == set(short.grads) and full.grads
    for name, grad in full.grads.items():
        np.testing.assert_array_equal(short.grads[name], grad)
    # The first Dense computed no dx: its backward was asked for grads only.
    dense = short.layers[1]
    with pytest.raises(TypeError, match="input_gradient must be a bool"):
        dense.backward(np.ones((12, 5), np.float32), input_gradient=1)
    ones = np.ones((12, 5), np.float32)
    assert dense.backward(ones, input_gradient=False) is None
    # A network without parameters has nothing to do.
    flat = nn.Sequential([nn.Flatten()])
    flat(x)
    assert flat.backward(dy, input_gradient=False) is None
