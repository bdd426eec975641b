"""companion.BatchNorm: Keras semantics, state, save/load, inference-mode
backward (TensorFlow parity is in test_tf_parity.py)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

import companion
from companion import BatchNorm, nn

ONE3 = np.ones(3)


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
    layer.set_weights([[0.5, 2.0, 1.0], [1.0, -1.0, 0.0], np.zeros(3), ONE3])
    moving_mean, moving_var = np.zeros(3), np.ones(3)
    for x in batches(5):
        y = layer(x, training=True)
        # Written out independently of companion.functional:
        x_hat = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-3)
        expected = [0.5, 2.0, 1.0] * x_hat + [1.0, -1.0, 0.0]
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
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
    layer.gamma[...], layer.beta[...] = [0.5, 2.0, 1.0], [1.0, -1.0, 0.0]
    before = layer.get_weights()
    y = layer(x)  # training=False is the default
    gamma, beta, mean, var = before
    expected = gamma * (x - mean) / np.sqrt(var + 1e-3) + beta
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    assert not np.allclose(mean, 0) and not np.allclose(var, 1)
    for a, b in zip(before, layer.get_weights(), strict=True):
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


def trained(momentum=0.8, dtype=np.float64, **config):
    layer = BatchNorm(momentum=momentum, **config)
    for x in batches(4):
        layer(x.astype(dtype), training=True)
    if layer.gamma is not None:
        layer.gamma[...] = [0.5, 2.0, 3.0]
    return layer


def assert_same_layer(a, b):
    assert a.get_config() == b.get_config()
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        assert wa.dtype == wb.dtype
        np.testing.assert_array_equal(wa, wb)
    x = batches(1, seed=7)[0].astype(a.moving_mean.dtype)
    np.testing.assert_array_equal(a(x), b(x))


def test_save_and_load_round_trip(tmp_path):
    layer = trained()
    path = layer.save(tmp_path / "bn.npz")
    assert path == tmp_path / "bn.npz" and path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.npz"]
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == [
            "beta",
            "config",
            "format_version",
            "gamma",
            "moving_mean",
            "moving_variance",
        ]
        assert int(data["format_version"]) == 1
        assert json.loads(str(data["config"])) == {
            "axis": -1,
            "momentum": 0.8,
            "epsilon": 1e-3,
            "center": True,
            "scale": True,
            "dtype": "float64",
        }
    fresh = BatchNorm(momentum=0.8)
    fresh.load(path)  # builds an unbuilt layer from the file
    assert_same_layer(layer, fresh)
    built = BatchNorm(momentum=0.8)
    built(np.zeros((2, 3)))
    gamma = built.gamma
    built.load(path)
    assert built.gamma is gamma  # loaded in place
    np.testing.assert_array_equal(built.gamma, [0.5, 2.0, 3.0])


@pytest.mark.parametrize(
    ("saved_as", "loaded_as", "written"),
    [
        ("bn", "bn", "bn.npz"),
        ("bn", "bn.npz", "bn.npz"),
        ("bn.npz", "bn", "bn.npz"),
        ("bn.npz", "bn.npz", "bn.npz"),
        ("state.v1", "state.v1", "state.v1.npz"),
    ],
)
def test_the_npz_suffix_is_optional_both_ways(
    tmp_path, saved_as, loaded_as, written
):
    layer = trained()
    assert layer.save(str(tmp_path / saved_as)) == tmp_path / written
    assert sorted(p.name for p in tmp_path.iterdir()) == [written]
    fresh = BatchNorm(momentum=0.8)
    fresh.load(tmp_path / loaded_as)
    assert_same_layer(layer, fresh)


@pytest.mark.parametrize(
    "config",
    [
        {"axis": 1, "epsilon": 1e-5, "momentum": 0.5},
        {"center": False},
        {"scale": False},
        {"center": False, "scale": False},
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_file_rebuilds_the_layer_with_its_config(tmp_path, config, dtype):
    layer = BatchNorm(**config)
    shape = (16, 3, 2) if config.get("axis") == 1 else (16, 3)
    for seed in range(3):
        x = np.random.default_rng(seed).normal(1.0, 2.0, size=shape)
        layer(x.astype(dtype), training=True)
    path = layer.save(tmp_path / "layer")
    loaded = BatchNorm.from_file(path)
    assert loaded.get_config() == layer.get_config()
    assert loaded.weight_names() == layer.weight_names()
    for a, b in zip(layer.get_weights(), loaded.get_weights(), strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b)


def test_a_zero_moving_variance_is_a_valid_state(tmp_path):
    """momentum=0 and a constant channel give moving_variance 0 exactly;
    epsilon keeps the layer finite, so save/load accept variance >= 0."""
    layer = BatchNorm(momentum=0.0)
    x = batches(1)[0]
    x[:, 1] = 4.0
    layer(x, training=True)
    assert layer.moving_variance[1] == 0.0
    loaded = BatchNorm.from_file(layer.save(tmp_path / "zero"))
    assert loaded.moving_variance[1] == 0.0
    assert np.all(np.isfinite(loaded(x)))


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    layer = trained()
    layer.save(tmp_path / "bn")
    good = (tmp_path / "bn.npz").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        layer.save(tmp_path / "bn")
    assert (tmp_path / "bn.npz").read_bytes() == good  # the old file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.npz"]


# ---------------------------------------------- inference-mode backward
@pytest.mark.parametrize(
    ("shape", "axis"), [((6, 3), -1), ((4, 2, 3, 3), -1), ((4, 3, 2, 2), 1)]
)
def test_inference_backward_is_the_affine_maps_gradient(shape, axis):
    rng = np.random.default_rng(8)
    channels = shape[axis]
    layer = BatchNorm(axis=axis)
    layer.set_weights(
        [
            rng.normal(size=channels),
            rng.normal(size=channels),
            rng.normal(size=channels),
            rng.uniform(0.5, 2.0, size=channels),
        ]
    )
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    before = layer.get_weights()
    layer(x)  # training=False
    dx = layer.backward(dy)
    bshape = [1] * len(shape)
    bshape[axis] = channels
    gamma, _, mean, var = (w.reshape(bshape) for w in before)
    reduce = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    np.testing.assert_allclose(
        dx, gamma * dy / np.sqrt(var + 1e-3), rtol=1e-12
    )
    x_hat = (x - mean) / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(
        layer.grads["gamma"], (dy * x_hat).sum(axis=reduce), rtol=1e-12
    )
    np.testing.assert_allclose(
        layer.grads["beta"], dy.sum(axis=reduce), rtol=1e-12
    )
    for a, b in zip(before, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # statistics untouched
    # Finite differences of the inference-mode output (float64, random dy).
    numeric = companion.numerical_gradient(layer, x, dy)
    assert companion.rel_error(dx, numeric) < 1e-8
    for name in ("gamma", "beta"):
        param = getattr(layer, name)
        saved = param.copy()

        def f(value, param=param):
            param[...] = value
            return layer(x)

        numeric = companion.numerical_gradient(f, saved, dy)
        param[...] = saved
        assert companion.rel_error(layer.grads[name], numeric) < 1e-8, name


def test_inference_backward_has_no_batch_terms():
    """Unlike training mode, dx does not sum to 0 over the batch."""
    rng = np.random.default_rng(9)
    layer = BatchNorm()
    x, dy = rng.normal(size=(8, 2)), rng.normal(size=(8, 2))
    layer(x, training=True)
    train_dx = layer.backward(dy)
    infer_dx = BatchNorm()
    infer_dx.set_weights(layer.get_weights())
    infer_dx(x)
    dx = infer_dx.backward(dy)
    np.testing.assert_allclose(train_dx.sum(axis=0), 0.0, atol=1e-12)
    assert np.all(np.abs(dx.sum(axis=0)) > 1e-3)


@pytest.mark.parametrize(("center", "scale"), [(False, True), (True, False)])
def test_inference_backward_fills_the_grads_the_layer_has(center, scale):
    layer = BatchNorm(center=center, scale=scale)
    layer(np.ones((4, 2)))
    dx = layer.backward(np.ones((4, 2)))
    assert sorted(layer.grads) == sorted(layer.trainable_names())
    np.testing.assert_allclose(dx, 1 / np.sqrt(1.001))  # gamma 1, var 1


def test_a_network_with_frozen_batch_norm_trains():
    """Dense -> BN (inference mode, statistics frozen) -> ReLU -> Dense:
    the gradient is right and SGD lowers the loss on a fixed batch."""
    rng = np.random.default_rng(10)
    bn = BatchNorm()
    model = nn.Sequential(
        [nn.Dense(6, seed=0), bn, nn.ReLU(), nn.Dense(3, seed=1)]
    )
    model.build((None, 4))
    bn.set_weights([np.ones(6), np.zeros(6), rng.normal(size=6), np.ones(6)])
    frozen = [w.copy() for w in bn.get_weights()[2:]]
    x, labels = rng.normal(size=(16, 4)), np.arange(16) % 3
    loss, dlogits = nn.softmax_cross_entropy(model(x), labels)
    dx = model.backward(dlogits)
    numeric = companion.numerical_gradient(
        lambda t: np.array(nn.softmax_cross_entropy(model(t), labels)[0]),
        x,
        np.array(1.0),
    )
    assert companion.rel_error(dx, numeric) < 1e-7
    sgd = nn.SGD(0.5)
    losses = [loss]
    for _ in range(20):
        loss, dlogits = nn.softmax_cross_entropy(model(x), labels)
        model.backward(dlogits)
        sgd.step(model)
        losses.append(loss)
    # Every step descends (losses[0] and [1] are the same, untrained model).
    assert all(b < a for a, b in itertools.pairwise(losses[1:]))
    for a, b in zip(frozen, bn.get_weights()[2:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_set_weights_accepts_keras_order():
    layer = BatchNorm()
    layer.set_weights(
        [np.full(2, 2.0), np.full(2, 3.0), np.full(2, 4.0), np.full(2, 5.0)]
    )
    np.testing.assert_array_equal(layer.gamma, 2.0)
    np.testing.assert_array_equal(layer.beta, 3.0)
    np.testing.assert_array_equal(layer.moving_mean, 4.0)
    np.testing.assert_array_equal(layer.moving_variance, 5.0)
