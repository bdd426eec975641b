"""companion.fold_batchnorm and companion.nn.fold: a Dense or Conv2D layer
followed by inference-mode batch norm equals one folded layer (chapter 18).

The references are written out here: the convolution by an explicit sum
over the kernel's taps, batch norm by its inference formula.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import companion
from companion import BatchNorm, fold_batchnorm, nn
from companion.folding import fold

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def bn_reference(z, gamma, beta, mean, variance, epsilon):
    """Inference-mode batch norm on the last axis, as Algorithm 2 writes it."""
    return gamma * (z - mean) / np.sqrt(variance + epsilon) + beta


def conv_reference(x, kernel, bias):
    """'same' cross-correlation, stride 1, NHWC, by a loop over the taps."""
    kh, kw, _, c_out = kernel.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    padded = np.pad(
        x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0))
    )
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, c_out), np.float64)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, i : i + h, j : j + w, :].astype(np.float64)
            out += window @ kernel[i, j].astype(np.float64)
    return out if bias is None else out + bias


def bn_arrays(rng, channels, dtype):
    return [
        rng.uniform(0.5, 2.0, channels).astype(dtype),  # gamma
        rng.normal(0.0, 0.5, channels).astype(dtype),  # beta
        rng.normal(0.0, 1.0, channels).astype(dtype),  # moving mean
        rng.uniform(0.01, 3.0, channels).astype(dtype),  # moving variance
    ]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_fold_equals_dense_then_batchnorm(dtype, with_bias):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 7)).astype(dtype)
    kernel = rng.normal(size=(7, 5)).astype(dtype)
    bias = rng.normal(size=5).astype(dtype) if with_bias else None
    gamma, beta, mean, variance = bn_arrays(rng, 5, dtype)
    before = [a.copy() for a in (kernel, gamma, beta, mean, variance)]

    k, b = fold_batchnorm(
        kernel, bias, gamma, beta, mean, variance, epsilon=1e-3
    )

    z = x.astype(np.float64) @ kernel.astype(np.float64)
    if bias is not None:
        z = z + bias
    expected = bn_reference(z, gamma, beta, mean, variance, 1e-3)
    got = x.astype(np.float64) @ k.astype(np.float64) + b
    np.testing.assert_allclose(got, expected, rtol=TOL[dtype], atol=TOL[dtype])
    assert k.dtype == b.dtype == dtype
    assert k.shape == kernel.shape and b.shape == (5,)
    for old, new in zip(
        before, (kernel, gamma, beta, mean, variance), strict=True
    ):
        np.testing.assert_array_equal(old, new)  # inputs untouched


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d_fold_equals_conv_then_batchnorm(dtype, with_bias):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 6, 5, 2)).astype(dtype)
    kernel = rng.normal(size=(3, 3, 2, 4)).astype(dtype)
    bias = rng.normal(size=4).astype(dtype) if with_bias else None
    gamma, beta, mean, variance = bn_arrays(rng, 4, dtype)

    k, b = fold_batchnorm(
        kernel, bias, gamma, beta, mean, variance, epsilon=1e-5
    )

    expected = bn_reference(
        conv_reference(x, kernel, bias), gamma, beta, mean, variance, 1e-5
    )
    got = conv_reference(x, k, b)
    np.testing.assert_allclose(got, expected, rtol=TOL[dtype], atol=TOL[dtype])
    # and per output channel o: K'[..., o] = K[..., o] * gamma_o / std_o
    for o in range(4):
        std = np.sqrt(float(variance[o]) + 1e-5)
        np.testing.assert_allclose(
            k[..., o], kernel[..., o] * (float(gamma[o]) / std), rtol=1e-6
        )


def test_companion_layers_and_batchnorm_inference_agree_with_the_fold():
    """The fold against the package's own layers (float64)."""
    rng = np.random.default_rng(3)
    conv = nn.Conv2D(4, 3, padding="same", use_bias=False, seed=0)
    conv.build((None, 8, 8, 2), dtype=np.float64)
    bn = BatchNorm(epsilon=1e-3)
    bn.build((None, 4), dtype=np.float64)
    bn.set_weights(bn_arrays(rng, 4, np.float64))
    x = rng.normal(size=(2, 8, 8, 2))
    k, b = fold_batchnorm(conv.kernel, None, *bn.get_weights(), epsilon=1e-3)
    folded = nn.Conv2D(4, 3, padding="same")
    folded.build((None, 8, 8, 2), dtype=np.float64)
    folded.set_weights([k, b])
    np.testing.assert_allclose(folded(x), bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_scale_and_center_none_mean_gamma_one_and_beta_zero():
    rng = np.random.default_rng(4)
    kernel, bias = rng.normal(size=(3, 2)), rng.normal(size=2)
    mean, variance = rng.normal(size=2), rng.uniform(0.5, 1.5, size=2)
    k1, b1 = fold_batchnorm(
        kernel, bias, None, None, mean, variance, epsilon=0.1
    )
    k2, b2 = fold_batchnorm(
        kernel, bias, np.ones(2), np.zeros(2), mean, variance, epsilon=0.1
    )
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(b1, b2)


def test_integer_inputs_are_folded_in_float64():
    k, b = fold_batchnorm(
        np.ones((2, 2), int), None, [1, 1], [0, 0], [0, 0], [3, 3], epsilon=1
    )
    assert k.dtype == b.dtype == np.float64
    np.testing.assert_allclose(k, 0.5)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"kernel": np.ones(3)}, ValueError, "kernel must have the output"),
        ({"bias": np.ones(4)}, ValueError, r"bias must have shape \(3,\)"),
        ({"gamma": np.ones((3, 1))}, ValueError, "gamma must have shape"),
        ({"beta": np.ones(2)}, ValueError, "beta must have shape"),
        ({"moving_mean": np.ones(5)}, ValueError, "moving_mean must have"),
        (
            {"moving_variance": np.array([1.0, -1.0, 1.0])},
            ValueError,
            "moving_variance must be >= 0",
        ),
        (
            {"moving_mean": np.array([1.0, np.nan, 1.0])},
            ValueError,
            "moving_mean must be finite",
        ),
        (
            {"kernel": np.full((2, 3), np.inf)},
            ValueError,
            "kernel must be finite",
        ),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"epsilon": -1e-3}, ValueError, "epsilon"),
        ({"epsilon": float("nan")}, ValueError, "epsilon"),
        ({"epsilon": "1e-3"}, TypeError, "epsilon"),
        ({"gamma": np.ones(3, bool)}, TypeError, "gamma"),
        ({"kernel": "abc"}, TypeError, "kernel"),
    ],
)
def test_bad_input_is_refused_with_a_message(change, error, match):
    args = {
        "kernel": np.ones((2, 3)),
        "bias": np.zeros(3),
        "gamma": np.ones(3),
        "beta": np.zeros(3),
        "moving_mean": np.zeros(3),
        "moving_variance": np.ones(3),
        "epsilon": 1e-3,
    }
    args.update(change)
    epsilon = args.pop("epsilon")
    with pytest.raises(error, match=match):
        fold_batchnorm(**args, epsilon=epsilon)


# ------------------------------------------------------------ nn.fold
def trained_like(model, seed=0):
    """Give every BatchNorm of ``model`` non-trivial statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, BatchNorm):
            dtype = layer.moving_mean.dtype
            layer.set_weights(bn_arrays(rng, layer.channels, dtype))
        elif isinstance(layer, nn.Sequential):
            trained_like(layer, seed + 1)
    return model


def cnn(dtype=np.float32, conv_bias=False):
    model = nn.Sequential(
        [
            nn.Conv2D(4, 3, padding="same", use_bias=conv_bias, seed=0),
            BatchNorm(),
            nn.ReLU(),
            nn.MaxPool2D(2, strides=2),
            nn.Flatten(),
            nn.Dense(6, use_bias=False, seed=1),
            BatchNorm(epsilon=1e-5),
            nn.ReLU(),
            nn.Dense(3, seed=2),
        ]
    )
    model.build((None, 6, 6, 2), dtype=dtype)
    return trained_like(model)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_fold_of_a_sequential_computes_its_inference_outputs(dtype, conv_bias):
    model = cnn(dtype, conv_bias)
    weights = model.get_weights()
    x = np.random.default_rng(5).normal(size=(8, 6, 6, 2)).astype(dtype)
    folded = fold(model)
    assert folded is not model
    kinds = [type(layer).__name__ for layer in folded.layers]
    assert kinds == [
        "Conv2D",
        "ReLU",
        "MaxPool2D",
        "Flatten",
        "Dense",
        "ReLU",
        "Dense",
    ]
    assert all(layer.use_bias for layer in folded.layers[::4][:2])
    np.testing.assert_allclose(
        folded(x), model(x), rtol=TOL[dtype], atol=TOL[dtype]
    )
    assert folded(x).dtype == dtype
    # the original model is unchanged, and not shared with the new one
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert folded.layers[-1] is not model.layers[-1]
    assert folded.layers[-1].kernel is not model.layers[-1].kernel
    np.testing.assert_array_equal(
        folded.layers[-1].kernel, model.layers[-1].kernel
    )
    # the folded arrays are what fold_batchnorm gives for the pairs
    conv, bn = model.layers[0], model.layers[1]
    k, b = fold_batchnorm(
        conv.kernel,
        conv.bias,
        *bn.get_weights(),
        epsilon=bn.epsilon,
    )
    np.testing.assert_array_equal(folded.layers[0].kernel, k)
    np.testing.assert_array_equal(folded.layers[0].bias, b)


def test_fold_is_companion_nn_fold_and_folds_nested_models():
    assert nn.fold is fold
    assert companion.fold_batchnorm is fold_batchnorm
    inner = nn.Sequential(
        [nn.Dense(4, use_bias=False, seed=3), BatchNorm(scale=False)]
    )
    model = nn.Sequential(
        [nn.Dense(5, seed=4), BatchNorm(center=False), nn.ReLU(), inner]
    )
    model.build((None, 3), dtype=np.float64)
    trained_like_flat = np.random.default_rng(6)
    for layer in (model.layers[1], inner.layers[1]):
        arrays = bn_arrays(trained_like_flat, layer.channels, np.float64)
        keep = [
            a
            for name, a in zip(
                ["gamma", "beta", "moving_mean", "moving_variance"],
                arrays,
                strict=True,
            )
            if name in layer.weight_names()
        ]
        layer.set_weights(keep)
    folded = nn.fold(model)
    assert [type(layer).__name__ for layer in folded.layers] == [
        "Dense",
        "ReLU",
        "Sequential",
    ]
    assert [type(x).__name__ for x in folded.layers[2].layers] == ["Dense"]
    x = np.random.default_rng(7).normal(size=(4, 3))
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_fold_refuses_what_it_cannot_fold_and_leaves_the_model_alone():
    plain = nn.Sequential([nn.Dense(3, seed=0), nn.ReLU(), nn.Dense(2)])
    plain.build((None, 4))
    with pytest.raises(ValueError, match="nothing to fold"):
        fold(plain)
    # batch norm first, or after an activation: not a Conv2D/Dense pair
    after_relu = nn.Sequential([nn.Dense(3, seed=0), nn.ReLU(), BatchNorm()])
    after_relu.build((None, 4))
    with pytest.raises(ValueError, match="nothing to fold"):
        fold(after_relu)
    with pytest.raises(TypeError, match=r"companion\.nn\.Sequential"):
        fold([nn.Dense(3), BatchNorm()])
    with pytest.raises(TypeError, match=r"companion\.nn\.Sequential"):
        fold(nn.Dense(3))
    unbuilt = nn.Sequential([nn.Dense(3), BatchNorm()])
    with pytest.raises(ValueError, match="needs built layers"):
        fold(unbuilt)
    # a batch norm over the height axis of a conv output cannot be folded
    model = nn.Sequential(
        [nn.Conv2D(2, 3, padding="same", seed=0), BatchNorm(axis=1)]
    )
    model.build((None, 5, 5, 1), dtype=np.float64)
    saved = copy.deepcopy(model.get_weights())
    with pytest.raises(ValueError, match="normalizes axis 1"):
        fold(model)
    for before, after in zip(saved, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert isinstance(model.layers[1], BatchNorm)
