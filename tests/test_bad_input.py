"""Bad input: a TypeError/ValueError that names the argument, what was
received and what was expected; a failed call leaves a layer's state
unchanged.  State files that do not fit are refused the same way."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import companion
from companion import BatchNorm, nn

X = np.random.default_rng(0).normal(size=(8, 3))
ONES, ZEROS = np.ones(3), np.zeros(3)
NAN_AT_1 = np.array([1.0, np.nan, 1.0])
INF_AT_2 = np.array([0.0, 0.0, np.inf])


def escaped(text):
    return re.escape(str(text))


# ------------------------------------------------------------- the input x
@pytest.mark.parametrize(
    ("x", "error", "pattern"),
    [
        (
            np.array([["a", "b"], ["c", "d"]]),
            TypeError,
            r"x must be a real floating or integer array; received an array "
            r"of dtype <U1",
        ),
        (
            np.array([[object(), 1]], dtype=object),
            TypeError,
            r"x must be .* dtype object",
        ),
        (
            [[1.0, 2.0], [3.0]],
            TypeError,
            r"x must be a numeric array; received \[\[1.0, 2.0\], \[3.0\]\]",
        ),
        (np.ones((4, 3), dtype=bool), TypeError, r"dtype bool"),
        (
            np.ones((4, 3), dtype=complex),
            TypeError,
            r"dtype complex128.*expected e.g. float32 or float64",
        ),
        (
            np.ones(3),
            ValueError,
            r"x must have rank >= 2 .*received shape \(3,\) \(rank 1\)",
        ),
        (np.float64(1.0), ValueError, r"rank >= 2.*rank 0"),
    ],
)
def test_bad_x(x, error, pattern):
    with pytest.raises(error, match=pattern):
        companion.batchnorm_forward(x, ONES, ZEROS)
    with pytest.raises(error, match=pattern):
        BatchNorm()(x, training=True)


@pytest.mark.parametrize(
    ("shape", "axis", "pattern"),
    [
        (
            (8, 0),
            -1,
            r"x has 0 channels on axis -1 \(shape \(8, 0\)\); expected at "
            r"least 1 channel",
        ),
        ((4, 0, 5, 5), 1, r"x has 0 channels on axis 1 \(shape \(4, 0,"),
        (
            (0, 3),
            -1,
            r"x of shape \(0, 3\) is empty \(size 0 on axis 0\); expected at "
            r"least one value per channel",
        ),
        ((4, 0, 5, 3), -1, r"is empty \(size 0 on axis 1\)"),
    ],
    ids=["no_channel", "no_channel_nchw", "empty_batch", "empty_height"],
)
def test_zero_channels_and_empty_batches(shape, axis, pattern):
    x = np.ones(shape)
    c = shape[axis]
    with pytest.raises(ValueError, match=pattern):
        companion.batchnorm_forward(x, np.ones(c), np.zeros(c), axis=axis)
    stats = (np.ones(c), np.zeros(c), np.zeros(c), np.ones(c))
    with pytest.raises(ValueError, match=pattern):
        companion.batchnorm_inference(x, *stats, axis=axis)
    with pytest.raises(ValueError, match=pattern):
        companion.batchnorm_inference_backward(
            x, x, np.ones(c), np.zeros(c), np.ones(c), axis=axis
        )
    for training in (True, False):
        layer = BatchNorm(axis=axis)
        with pytest.raises(ValueError, match=pattern):
            layer(x, training=training)
        assert not layer.built
    with pytest.raises(ValueError, match=pattern):
        BatchNorm(axis=axis).build(shape[:1] + shape[1:])


def test_an_empty_batch_into_a_built_layer_leaves_it_unchanged():
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"is empty \(size 0 on axis 0\)"):
        layer(np.ones((0, 3)))
    assert_unchanged(layer, before)


@pytest.mark.parametrize(
    ("axis", "error", "pattern"),
    [
        (
            2,
            ValueError,
            r"axis=2 is out of range for an input of rank 2; expected an "
            r"integer in \[-2, 1\]",
        ),
        (-3, ValueError, r"axis=-3 is out of range"),
        (1.0, TypeError, r"axis must be an int; received 1.0"),
        (True, TypeError, r"axis must be an int; received True"),
    ],
)
def test_bad_axis(axis, error, pattern):
    with pytest.raises(error, match=pattern):
        companion.batchnorm_forward(X, ONES, ZEROS, axis=axis)
    with pytest.raises(error, match=pattern):
        companion.batchnorm_inference(X, ONES, ZEROS, ZEROS, ONES, axis=axis)


def test_layer_axis_out_of_range_for_the_input():
    layer = BatchNorm(axis=3)
    with pytest.raises(
        ValueError, match=r"axis=3 is out of range for an input of rank 2"
    ):
        layer(X, training=True)
    assert not layer.built
    with pytest.raises(
        TypeError, match=r"axis must be an int; received 'channels_last'"
    ):
        BatchNorm(axis="channels_last")


# ------------------------------------------------- per-channel parameters
def re_shape(shape):
    return escaped(shape)


@pytest.mark.parametrize("name", ["gamma", "beta"])
@pytest.mark.parametrize("bad", [np.ones(4), np.ones((3, 1)), np.ones(())])
def test_parameter_shape_mismatch(name, bad):
    args = {"gamma": ONES, "beta": ZEROS, name: bad}
    with pytest.raises(
        ValueError,
        match=rf"{name} must have shape \(3,\), one value per channel; "
        rf"received shape {re_shape(bad.shape)}",
    ):
        companion.batchnorm_forward(X, args["gamma"], args["beta"])


@pytest.mark.parametrize(
    "name", ["gamma", "beta", "moving_mean", "moving_variance"]
)
def test_inference_statistic_shape_mismatch(name):
    args = {
        "gamma": ONES,
        "beta": ZEROS,
        "moving_mean": ZEROS,
        "moving_variance": ONES,
        name: np.ones(2),
    }
    with pytest.raises(
        ValueError, match=rf"{name} must have shape \(3,\).*received shape"
    ):
        companion.batchnorm_inference(X, **args)


def test_non_numeric_parameters():
    with pytest.raises(
        TypeError,
        match=r"gamma must be a real floating or integer array; received an "
        r"array of dtype <U",
    ):
        companion.batchnorm_forward(X, np.array(["1", "1", "1"]), ZEROS)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda: companion.batchnorm_forward(X, NAN_AT_1, ZEROS),
            r"gamma must be finite; received nan at index 1 \(of shape \(3,\)",
        ),
        (
            lambda: companion.batchnorm_forward(X, ONES, INF_AT_2),
            r"beta must be finite; received inf at index 2",
        ),
        (
            lambda: companion.batchnorm_inference(
                X, ONES, ZEROS, NAN_AT_1, ONES
            ),
            r"moving_mean must be finite; received nan at index 1",
        ),
        (
            lambda: companion.batchnorm_inference(
                X, ONES, ZEROS, ZEROS, INF_AT_2
            ),
            r"moving_variance must be finite; received inf at index 2",
        ),
        (
            lambda: companion.batchnorm_inference_backward(
                X, X, NAN_AT_1, ZEROS, ONES
            ),
            r"gamma must be finite; received nan",
        ),
    ],
    ids=["gamma", "beta", "moving_mean", "moving_variance", "backward"],
)
def test_non_finite_parameters_are_refused(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_check_finite_false_propagates_nan_as_a_diverged_layer_does():
    y, _ = companion.batchnorm_forward(X, NAN_AT_1, ZEROS, check_finite=False)
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))
    y = companion.batchnorm_inference(
        X, ONES, ZEROS, NAN_AT_1, ONES, check_finite=False
    )
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))
    # A layer whose parameters went NaN in training keeps computing (NaN).
    layer = trained_layer()
    layer.gamma[1] = np.nan  # what a diverged SGD step does, in place
    y = layer(X, training=True)
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))


def test_negative_moving_variance():
    with pytest.raises(
        ValueError,
        match=r"moving_variance must be >= 0 in every channel; received "
        r"minimum -1.0",
    ):
        companion.batchnorm_inference(
            X, ONES, ZEROS, ZEROS, np.array([1.0, -1.0, 1.0])
        )


@pytest.mark.parametrize(
    ("epsilon", "error", "pattern"),
    [
        (0.0, ValueError, r"epsilon must be finite and > 0 .*; received 0.0"),
        (-1e-3, ValueError, r"received -0.001"),
        (float("nan"), ValueError, r"received nan"),
        (float("inf"), ValueError, r"received inf"),
        ("1e-3", TypeError, r"epsilon must be a float; received '1e-3'"),
    ],
)
def test_bad_epsilon(epsilon, error, pattern):
    with pytest.raises(error, match=pattern):
        companion.batchnorm_forward(X, ONES, ZEROS, epsilon=epsilon)
    with pytest.raises(error, match=pattern):
        companion.batchnorm_inference(
            X, ONES, ZEROS, ZEROS, ONES, epsilon=epsilon
        )
    with pytest.raises(error, match=pattern):
        BatchNorm(epsilon=epsilon)


@pytest.mark.parametrize(
    ("momentum", "error", "pattern"),
    [
        (1.5, ValueError, r"momentum must be in \[0, 1\] .*; received 1.5"),
        (-0.1, ValueError, r"received -0.1"),
        (None, TypeError, r"momentum must be a float; received None"),
    ],
)
def test_bad_momentum(momentum, error, pattern):
    with pytest.raises(error, match=pattern):
        BatchNorm(momentum=momentum)


@pytest.mark.parametrize("flag", ["center", "scale"])
def test_center_and_scale_must_be_bools(flag):
    with pytest.raises(
        TypeError, match=rf"{flag} must be a bool; received 'yes'"
    ):
        BatchNorm(**{flag: "yes"})


@pytest.mark.parametrize("shape", [(1, 3), (1, 1, 1, 3)])
def test_training_with_a_single_value_per_channel(shape):
    x = np.ones(shape)
    with pytest.raises(
        ValueError,
        match=r"Expected more than 1 value per channel when training; "
        r"received x of shape",
    ):
        companion.batchnorm_forward(x, ONES, ZEROS)
    layer = BatchNorm()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(x, training=True)
    assert not layer.built
    layer(x)  # inference with one example is fine
    assert layer.built


# ---------------------------------------------------------------- backward
def test_backward_needs_a_cache_from_a_training_forward():
    y = companion.batchnorm_inference(X, ONES, ZEROS, ZEROS, ONES)
    with pytest.raises(
        TypeError,
        match=r"cache must be the BatchNormCache returned by "
        r"batchnorm_forward .*received array of dtype float64 and shape "
        r"\(8, 3\).*differentiate it with batchnorm_inference_backward",
    ):
        companion.batchnorm_backward(X, y)
    with pytest.raises(TypeError, match=r"received \(1, 2\)"):
        companion.batchnorm_backward_staged(X, (1, 2))
    _, cache = companion.batchnorm_forward(X, ONES, ZEROS)
    with pytest.raises(
        ValueError,
        match=r"dy must have the shape of the forward output \(8, 3\); "
        r"received shape \(8, 2\)",
    ):
        companion.batchnorm_backward(np.ones((8, 2)), cache)
    with pytest.raises(
        ValueError,
        match=r"dy must have the shape of x, \(8, 3\); received shape "
        r"\(8, 2\)",
    ):
        companion.batchnorm_inference_backward(
            np.ones((8, 2)), X, ONES, ZEROS, ONES
        )


def test_layer_backward_needs_a_call_since_the_weights_were_set():
    layer = BatchNorm()
    with pytest.raises(
        ValueError,
        match=r"backward\(dy\) needs a preceding forward call; this "
        r"BatchNorm has not been called$",
    ):
        layer.backward(X)
    layer(X)
    layer.backward(X)  # inference mode: the affine map's backward
    layer.set_weights(layer.get_weights())
    with pytest.raises(
        ValueError,
        match=r"this BatchNorm has not been called since its weights were "
        r"set",
    ):
        layer.backward(X)
    layer(X, training=True)
    layer.backward(X)


# ------------------------------------------------- the layer stays as it was
def snapshot(layer):
    return (
        [w.copy() for w in layer.get_weights()],
        layer.get_config(),
        layer._cache,
        dict(layer.grads),
    )


def assert_unchanged(layer, before):
    weights, config, cache, grads = before
    for a, b in zip(weights, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert layer.get_config() == config
    assert layer._cache is cache
    assert layer.grads.keys() == grads.keys()
    assert all(layer.grads[k] is grads[k] for k in grads)


def trained_layer(dtype=np.float32):
    layer = BatchNorm(momentum=0.9)
    layer(X.astype(dtype), training=True)
    layer(X.astype(dtype) * 2 + 1, training=True)
    layer.backward(np.ones_like(X, dtype=dtype))
    return layer


def weights(gamma=ONES, beta=ZEROS, mean=ZEROS, variance=ONES):
    return [gamma, beta, mean, variance]


@pytest.mark.parametrize(
    ("bad_call", "error", "pattern"),
    [
        (
            lambda bn: bn(np.ones((8, 4)), training=True),
            ValueError,
            r"x has 4 channels on axis -1 \(shape \(8, 4\)\), but this layer "
            r"was built for 3 channels",
        ),
        (lambda bn: bn(np.ones((8, 4))), ValueError, r"built for 3 channels"),
        (
            lambda bn: bn(np.ones((1, 3)), training=True),
            ValueError,
            r"more than 1 value per channel",
        ),
        (
            lambda bn: bn(np.array([["x"] * 3] * 2)),
            TypeError,
            r"x must be a real floating",
        ),
        (
            lambda bn: bn(X, training="yes"),
            TypeError,
            r"training must be a bool; received 'yes'",
        ),
        (
            lambda bn: bn.backward(np.ones((2, 3))),
            ValueError,
            r"dy must have the shape of the last output \(8, 3\); received "
            r"shape \(2, 3\)",
        ),
        (
            lambda bn: bn.set_weights([ONES, ZEROS, ZEROS]),
            ValueError,
            r"weights must be a list of 4 arrays \(gamma, beta, moving_mean, "
            r"moving_variance\) for BatchNorm; received 3 arrays",
        ),
        (
            lambda bn: bn.set_weights([ONES, ZEROS, ZEROS, np.ones(4)]),
            ValueError,
            r"weights\['moving_variance'\] has shape \(4,\); expected "
            r"\(3,\) \(the layer's channels\)",
        ),
        (
            lambda bn: bn.set_weights(weights(gamma=NAN_AT_1)),
            ValueError,
            r"weights\['gamma'\] must be finite; received nan at index 1",
        ),
        (
            lambda bn: bn.set_weights(weights(beta=INF_AT_2)),
            ValueError,
            r"weights\['beta'\] must be finite; received inf at index 2",
        ),
        (
            lambda bn: bn.set_weights(weights(mean=NAN_AT_1)),
            ValueError,
            r"weights\['moving_mean'\] must be finite",
        ),
        (
            lambda bn: bn.set_weights(weights(variance=np.array([1, -2, 1]))),
            ValueError,
            r"weights\['moving_variance'\] must be >= 0 in every channel "
            r"\(a variance\); received -2.0 at index 1",
        ),
        (
            lambda bn: bn.set_weights(weights(variance=INF_AT_2)),
            ValueError,
            r"weights\['moving_variance'\] must be finite",
        ),
        (
            lambda bn: bn.set_weights({"gamma": ONES}),
            TypeError,
            r"weights must be a list of 4 arrays .*received \{'gamma'",
        ),
        (
            lambda bn: bn.set_weights("gamma"),
            TypeError,
            r"received 'gamma'",
        ),
        (
            lambda bn: bn.set_weights(3.0),
            TypeError,
            r"weights must be a list of 4 arrays .*received 3.0",
        ),
        (
            lambda bn: bn.set_weights(w for w in weights()[:3]),
            ValueError,
            r"received 3 arrays",
        ),
        (
            lambda bn: bn.set_weights(
                [ONES, ZEROS, ZEROS, np.array(["1"] * 3)]
            ),
            TypeError,
            r"weights\['moving_variance'\] must be a real floating",
        ),
        (
            lambda bn: bn.save(123),
            TypeError,
            r"path must be a str or an os.PathLike; received 123",
        ),
    ],
)
def test_failed_calls_leave_the_layer_unchanged(bad_call, error, pattern):
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(error, match=pattern):
        bad_call(layer)
    assert_unchanged(layer, before)


def test_set_weights_takes_any_iterable():
    layer = BatchNorm()
    layer.set_weights(np.full(2, float(v)) for v in (2, 3, 4, 5))
    np.testing.assert_array_equal(layer.moving_variance, 5.0)
    layer.set_weights(tuple(layer.get_weights()))
    np.testing.assert_array_equal(layer.gamma, 2.0)


def test_a_failed_set_weights_leaves_an_unbuilt_layer_unbuilt():
    layer = BatchNorm()
    with pytest.raises(ValueError, match=r"must be finite"):
        layer.set_weights(weights(variance=NAN_AT_1))
    with pytest.raises(
        ValueError,
        match=r"weights\['beta'\] has shape \(2,\); expected \(3,\) "
        r"\(moving_mean's\)",
    ):
        layer.set_weights(weights(beta=np.zeros(2)))
    with pytest.raises(
        ValueError,
        match=r"weights\['moving_mean'\] must have shape \(C,\) with C >= 1; "
        r"received shape \(3, 1\)",
    ):
        layer.set_weights([np.ones((3, 1))] * 4)
    with pytest.raises(ValueError, match=r"received shape \(0,\)"):
        layer.set_weights([np.ones(0)] * 4)
    assert not layer.built and layer.gamma is None


def test_a_failed_nested_set_weights_leaves_every_layer_unchanged():
    bn = BatchNorm()
    model = nn.Sequential([nn.Dense(3, seed=0), nn.Sequential([bn])])
    model.build((None, 2))
    before = model.get_weights()
    bad = [w + 1.0 for w in before]
    bad[-1][0] = -1.0  # the last array: the moving variance of the BN
    with pytest.raises(
        ValueError,
        match=r"weights for layers\[1\] \(Sequential.*weights for "
        r"layers\[0\] \(BatchNorm.*weights\['moving_variance'\] must be "
        r">= 0",
    ):
        model.set_weights(bad)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_get_weights_save_and_build_need_a_built_layer(tmp_path):
    with pytest.raises(
        ValueError, match=r"get_weights\(\) needs a built BatchNorm"
    ):
        BatchNorm().get_weights()
    with pytest.raises(ValueError, match=r"save\(\) needs a built BatchNorm"):
        BatchNorm().save(tmp_path / "bn")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"x must have rank >= 2"):
        BatchNorm().build((4,))


# ------------------------------------------------------------- state files
def good_state(layer):
    """A state file's arrays, as BatchNorm.save writes them."""
    return {
        "format_version": np.array(1),
        "config": np.array(
            json.dumps({**layer.get_config(), "dtype": "float32"})
        ),
        **dict(zip(layer.weight_names(), layer.get_weights(), strict=True)),
    }


def with_config(**changes):
    def change(state):
        config = json.loads(str(state["config"]))
        config.update(changes)
        state["config"] = np.array(json.dumps(config))

    return change


def without(key):
    def change(state):
        del state[key]

    return change


def setting(key, value):
    def change(state):
        state[key] = value

    return change


def scaled(key, index, value):
    def change(state):
        state[key] = state[key].copy()
        state[key][index] = value

    return change


BAD_STATES = {
    "missing_key": (
        without("moving_variance"),
        r"lacks \['moving_variance'\]; expected exactly \['gamma', 'beta', "
        r"'moving_mean', 'moving_variance'\] besides 'format_version' and "
        r"'config'",
    ),
    "extra_key": (
        setting("running_var", np.ones(3, np.float32)),
        r"has unexpected arrays \['running_var'\]",
    ),
    "other_epsilon": (
        with_config(epsilon=1e-5),
        r"was saved by a BatchNorm with epsilon=1e-05; this layer has "
        r"epsilon=0.001; use BatchNorm.from_file\(path\)",
    ),
    "other_axis": (
        with_config(axis=1),
        r"was saved by a BatchNorm with axis=1; this layer has axis=-1",
    ),
    "other_momentum_and_center": (
        with_config(momentum=0.99, center=False),
        r"with momentum=0.99, center=False; this layer has momentum=0.9, "
        r"center=True",
    ),
    "negative_variance": (
        scaled("moving_variance", 1, -0.5),
        r"\['moving_variance'\] must be >= 0 in every channel \(a "
        r"variance\); received -0.5 at index 1",
    ),
    "nan_variance": (
        scaled("moving_variance", 2, np.nan),
        r"\['moving_variance'\] must be finite; received nan at index 2",
    ),
    "inf_gamma": (
        scaled("gamma", 0, np.inf),
        r"\['gamma'\] must be finite; received inf at index 0",
    ),
    "wrong_shape": (
        setting("beta", np.zeros(5, np.float32)),
        r"\['beta'\] has shape \(5,\); expected \(3,\) \(the layer's "
        r"channels\)",
    ),
    "array_dtype_differs_from_config": (
        setting("moving_mean", np.zeros(3, np.float64)),
        r"\['moving_mean'\] has dtype float64; expected float32 \(the "
        r"dtype in the file's config\)",
    ),
    "float64_file_into_float32_layer": (
        lambda state: state.update(
            {
                **{
                    k: v.astype(np.float64)
                    for k, v in state.items()
                    if v.dtype.kind == "f"
                },
                "config": np.array(
                    str(state["config"]).replace("float32", "float64")
                ),
            }
        ),
        r"holds float64 arrays; this layer's arrays are float32 \(values "
        r"would be rounded\)",
    ),
    "no_format_version": (
        without("format_version"),
        r"has no 'format_version' array, so it was not written by "
        r"BatchNorm.save",
    ),
    "future_format_version": (
        setting("format_version", np.array(2)),
        r"has format version 2; this version of companion reads format "
        r"version 1",
    ),
    "format_version_not_an_integer": (
        setting("format_version", np.array([1.0])),
        r"\['format_version'\] must be a single integer",
    ),
    "no_config": (
        without("config"),
        r"has no 'config' array \(the layer's settings\)",
    ),
    "config_not_json": (
        setting("config", np.array("axis=-1")),
        r"has an invalid config: Expecting value",
    ),
    "config_not_a_string": (
        setting("config", np.array([1, 2])),
        r"has an invalid config: expected a single string; received an "
        r"array of dtype int64 and shape \(2,\)",
    ),
    "config_not_an_object": (
        setting("config", np.array("[-1, 0.99]")),
        r"has an invalid config: expected a JSON object; received \[-1, ",
    ),
    "config_missing_a_setting": (
        lambda state: state.update(
            config=np.array(json.dumps({"axis": -1, "dtype": "float32"}))
        ),
        r"has an invalid config: expected the keys \['axis', 'momentum', "
        r"'epsilon', 'center', 'scale', 'dtype'\]",
    ),
    "config_with_a_bad_value": (
        with_config(momentum=3.0),
        r"has an invalid config: momentum must be in \[0, 1\]",
    ),
    "config_with_a_bad_dtype": (
        with_config(dtype="int8"),
        r"has an invalid config: dtype must be float32 or float64; "
        r"received int8",
    ),
}


def write_state(path, state):
    np.savez(path, **state)


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_loading_a_bad_state_file_changes_nothing(tmp_path, name):
    change, pattern = BAD_STATES[name]
    layer = trained_layer()
    state = good_state(layer)
    change(state)
    path = tmp_path / "bad.npz"
    write_state(path, state)
    label = rf"state file {escaped(repr(str(path)))}"
    before = snapshot(layer)
    with pytest.raises(ValueError, match=rf"^{label}.*{pattern}"):
        layer.load(path)
    assert_unchanged(layer, before)
    unbuilt = BatchNorm(momentum=0.9)
    if name == "float64_file_into_float32_layer":
        unbuilt.load(path)  # an unbuilt layer takes the file's dtype
        assert unbuilt.moving_mean.dtype == np.float64
        return
    with pytest.raises(ValueError, match=rf"^{label}"):
        unbuilt.load(path)
    assert not unbuilt.built and unbuilt.gamma is None


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", r"is not a readable .npz file written by BatchNorm.save"),
        (b"not an npz file at all\n" * 10, r"is not a readable .npz file"),
        ("half", r"is not a readable .npz file .*(BadZipFile|EOFError)"),
        ("npy", r"it holds a single array \(a .npy file\)"),
        ("pickled", r"allow_pickle=False"),
    ],
    ids=["empty", "text", "truncated", "npy", "pickled"],
)
def test_a_corrupt_state_file_is_refused(tmp_path, content, pattern):
    layer = trained_layer()
    path = tmp_path / "corrupt.npz"
    if content == "half":
        layer.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "npy":
        with open(path, "wb") as file:
            np.save(file, np.ones(3))
    elif content == "pickled":
        state = good_state(layer)
        state["gamma"] = np.array([{"evil": 1}] * 3, dtype=object)
        write_state(path, state)
    else:
        path.write_bytes(content)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=pattern):
        layer.load(path)
    assert_unchanged(layer, before)


def test_a_missing_state_file_names_both_paths(tmp_path):
    base = tmp_path / "nothing"
    with pytest.raises(
        FileNotFoundError,
        match=rf"no BatchNorm state file at {escaped(repr(str(base)))} or "
        rf"{escaped(repr(str(base) + '.npz'))}",
    ):
        BatchNorm().load(base)
