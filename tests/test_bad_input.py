"""Bad input: a TypeError/ValueError that names the argument, what was received and what was
expected; a failed call leaves a layer's state unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import companion
from companion import BatchNorm

X = np.random.default_rng(0).normal(size=(8, 3))
ONES, ZEROS = np.ones(3), np.zeros(3)


@pytest.mark.parametrize(
    ("x", "error", "pattern"),
    [
        (
            np.array([["a", "b"], ["c", "d"]]),
            TypeError,
            r"x must be a real floating or integer array; received an array of dtype <U1",
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
    ("axis", "error", "pattern"),
    [
        (
            2,
            ValueError,
            r"axis=2 is out of range for an input of rank 2; expected an integer in \[-2, 1\]",
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


@pytest.mark.parametrize("name", ["gamma", "beta"])
@pytest.mark.parametrize("bad", [np.ones(4), np.ones((3, 1)), np.ones(())])
def test_parameter_shape_mismatch(name, bad):
    args = {"gamma": ONES, "beta": ZEROS, name: bad}
    with pytest.raises(
        ValueError,
        match=rf"{name} must have shape \(3,\), one value per channel; received shape {re_shape(bad.shape)}",
    ):
        companion.batchnorm_forward(X, args["gamma"], args["beta"])


def re_shape(shape):
    return str(shape).replace("(", r"\(").replace(")", r"\)")


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
        ValueError,
        match=rf"{name} must have shape \(3,\).*received shape \(2,\)",
    ):
        companion.batchnorm_inference(X, **args)


def test_non_numeric_parameters():
    with pytest.raises(
        TypeError,
        match=r"gamma must be a real floating or integer array; received an array of dtype <U",
    ):
        companion.batchnorm_forward(X, np.array(["1", "1", "1"]), ZEROS)


def test_negative_moving_variance():
    with pytest.raises(
        ValueError,
        match=r"moving_variance must be >= 0 in every channel; received minimum -1.0",
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
        match=r"Expected more than 1 value per channel when training; received x of shape",
    ):
        companion.batchnorm_forward(x, ONES, ZEROS)
    layer = BatchNorm()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(x, training=True)
    assert not layer.built
    layer(x)  # inference with one example is fine
    assert layer.built


def test_backward_needs_a_cache_from_a_training_forward():
    y = companion.batchnorm_inference(X, ONES, ZEROS, ZEROS, ONES)
    with pytest.raises(
        TypeError,
        match=r"cache must be the BatchNormCache returned by batchnorm_forward .*received array of dtype float64 and shape \(8, 3\)",
    ):
        companion.batchnorm_backward(X, y)
    with pytest.raises(TypeError, match=r"received \(1, 2\)"):
        companion.batchnorm_backward_staged(X, (1, 2))
    _, cache = companion.batchnorm_forward(X, ONES, ZEROS)
    with pytest.raises(
        ValueError,
        match=r"dy must have the shape of the forward output \(8, 3\); received shape \(8, 2\)",
    ):
        companion.batchnorm_backward(np.ones((8, 2)), cache)


def test_layer_backward_before_training_forward():
    layer = BatchNorm()
    with pytest.raises(
        ValueError,
        match=r"backward\(dy\) needs a preceding forward call; this BatchNorm has not been called",
    ):
        layer.backward(X)
    layer(X)
    with pytest.raises(
        ValueError,
        match=r"this BatchNorm was last called with training=False, which keeps nothing to differentiate",
    ):
        layer.backward(X)
    layer(X, training=True)
    layer.backward(X)
    layer(X)  # an inference call forgets the training cache
    with pytest.raises(ValueError, match="training=False"):
        layer.backward(X)


def snapshot(layer):
    return (
        [w.copy() for w in layer.get_weights()],
        layer.momentum,
        layer.epsilon,
        layer._cache,
    )


def assert_unchanged(layer, before):
    weights, momentum, epsilon, cache = before
    for a, b in zip(weights, layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert (layer.momentum, layer.epsilon) == (momentum, epsilon)
    assert layer._cache is cache


def trained_layer():
    layer = BatchNorm(momentum=0.9)
    layer(X, training=True)
    layer(X * 2 + 1, training=True)
    return layer


@pytest.mark.parametrize(
    ("bad_call", "error", "pattern"),
    [
        (
            lambda l: l(np.ones((8, 4)), training=True),
            ValueError,
            r"x has 4 channels on axis -1 \(shape \(8, 4\)\), but this layer was built for 3 channels",
        ),
        (lambda l: l(np.ones((8, 4))), ValueError, r"built for 3 channels"),
        (
            lambda l: l(np.ones((1, 3)), training=True),
            ValueError,
            r"more than 1 value per channel",
        ),
        (
            lambda l: l(np.array([["x"] * 3] * 2)),
            TypeError,
            r"x must be a real floating",
        ),
        (
            lambda l: l(X, training="yes"),
            TypeError,
            r"training must be a bool; received 'yes'",
        ),
        (
            lambda l: l.backward(np.ones((2, 3))),
            ValueError,
            r"dy must have the shape of the last output \(8, 3\); received shape \(2, 3\)",
        ),
        (
            lambda l: l.set_weights([ONES, ZEROS, ZEROS]),
            ValueError,
            r"weights must be a list of 4 arrays \(gamma, beta, moving_mean, moving_variance\)",
        ),
        (
            lambda l: l.set_weights([ONES, ZEROS, ZEROS, np.ones(4)]),
            ValueError,
            r"weights\['moving_variance'\] has shape \(4,\); expected \(3,\) \(the layer's channels\)",
        ),
    ],
)
def test_failed_calls_leave_the_layer_unchanged(bad_call, error, pattern):
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(error, match=pattern):
        bad_call(layer)
    assert_unchanged(layer, before)


@pytest.mark.parametrize(
    ("other", "x", "pattern"),
    [
        (
            BatchNorm(),
            np.ones((4, 5)),
            r"state file '.*other.npz'\['gamma'\] has shape \(5,\); expected \(3,\)",
        ),
        (
            BatchNorm(center=False),
            X,
            r"must hold exactly \['gamma', 'beta', 'moving_mean', 'moving_variance'\]; "
            r"received \['gamma', 'moving_mean', 'moving_variance'\]",
        ),
    ],
    ids=["wrong_shape", "other_arrays"],
)
def test_loading_a_state_that_does_not_fit(tmp_path, other, x, pattern):
    other(x, training=True)
    path = tmp_path / "other.npz"
    other.save(path)
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(ValueError, match=pattern):
        layer.load(path)
    assert_unchanged(layer, before)


def test_loading_a_state_whose_arrays_disagree_into_an_unbuilt_layer(tmp_path):
    path = tmp_path / "ragged.npz"
    np.savez(
        path,
        gamma=np.ones(3),
        beta=np.zeros(2),
        moving_mean=np.zeros(3),
        moving_variance=np.ones(3),
    )
    layer = BatchNorm()
    with pytest.raises(
        ValueError,
        match=r"\['beta'\] has shape \(2,\); expected \(3,\) \(the shape of moving_mean\)",
    ):
        layer.load(path)
    assert not layer.built
    np.savez(
        path,
        gamma=np.ones((3, 1)),
        beta=np.zeros((3, 1)),
        moving_mean=np.zeros((3, 1)),
        moving_variance=np.ones((3, 1)),
    )
    with pytest.raises(
        ValueError,
        match=r"\['moving_mean'\] must have shape \(C,\); received shape \(3, 1\)",
    ):
        layer.load(path)


def test_a_state_file_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(
        path,
        gamma=np.array([{"evil": 1}], dtype=object),
        beta=ZEROS,
        moving_mean=ZEROS,
        moving_variance=ONES,
    )
    with pytest.raises(ValueError, match="allow_pickle=False"):
        BatchNorm().load(path)


def test_get_weights_and_build_need_sensible_arguments():
    with pytest.raises(
        ValueError, match=r"get_weights\(\) needs a built BatchNorm"
    ):
        BatchNorm().get_weights()
    with pytest.raises(ValueError, match=r"x must have rank >= 2"):
        BatchNorm().build((4,))
    with pytest.raises(
        ValueError, match=r"weights must be a list of 4 arrays .*received \{"
    ):
        BatchNorm().set_weights({"gamma": ONES})
