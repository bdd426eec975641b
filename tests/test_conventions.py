"""companion.conventions: Keras <-> PyTorch batch norm state, exactly.

PyTorch is not a dependency: its documented update of the running
statistics is written out here (``pytorch_update``) and the conversions
are checked against it; when torch happens to be installed,
``test_against_torch_itself`` checks the real layer too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import companion
from companion import BatchNorm, conventions
from companion.conventions import (
    KERAS,
    PYTORCH,
    biased_moving_variance,
    from_pytorch,
    keras_momentum,
    match_epsilon,
    pytorch_momentum,
    steps_to_forget,
    to_pytorch,
    unbiased_moving_variance,
)


def pytorch_update(running_mean, running_var, batch, momentum):
    """torch.nn.BatchNorm*'s documented update (training mode).

    running = (1 - momentum) * running + momentum * batch statistic, with
    the *unbiased* batch variance; channels on the last axis here.
    """
    values = batch.reshape(-1, batch.shape[-1])
    m = values.shape[0]
    mean = values.mean(axis=0)
    unbiased = ((values - mean) ** 2).sum(axis=0) / (m - 1)
    return (
        (1 - momentum) * running_mean + momentum * mean,
        (1 - momentum) * running_var + momentum * unbiased,
    )


def stream(steps, shape, seed=0):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, size=shape[-1])
    return [
        rng.normal(2.0, 1.0, size=shape) * scale + rng.normal(size=shape[-1])
        for _ in range(steps)
    ]


def trained(steps, shape, momentum, seed=0):
    """A companion BatchNorm after ``steps`` training calls, and the
    PyTorch running statistics of the same batches (documented formula)."""
    layer = BatchNorm(momentum=momentum)
    channels = shape[-1]
    layer.build((None, channels), dtype=np.float64)
    running_mean, running_var = np.zeros(channels), np.ones(channels)
    for batch in stream(steps, shape, seed):
        layer(batch, training=True)
        running_mean, running_var = pytorch_update(
            running_mean, running_var, batch, 1 - momentum
        )
    rng = np.random.default_rng(seed + 1)
    layer.gamma[...] = rng.uniform(0.5, 1.5, channels)
    layer.beta[...] = rng.normal(size=channels)
    return layer, running_mean, running_var


def test_momentum_is_one_minus_the_other():
    assert pytorch_momentum(0.99) == pytest.approx(0.01, abs=1e-16)
    assert keras_momentum(0.1) == 0.9
    for rho in np.linspace(0.5, 1.0, 101):
        assert keras_momentum(pytorch_momentum(float(rho))) == rho
    assert keras_momentum(pytorch_momentum(0.3)) == pytest.approx(0.3)
    assert PYTORCH.keras_momentum == 0.9 and KERAS.keras_momentum == 0.99


def test_defaults_table():
    assert (KERAS.momentum, KERAS.epsilon, KERAS.stored_variance) == (
        0.99,
        1e-3,
        "biased",
    )
    assert (PYTORCH.momentum, PYTORCH.epsilon, PYTORCH.stored_variance) == (
        0.1,
        1e-5,
        "unbiased",
    )
    assert conventions.CONVENTIONS["tf1_fused"].stored_variance == "unbiased"
    assert conventions.CONVENTIONS["tf1"].stored_variance == "biased"
    layer = BatchNorm()  # the companion follows Keras
    assert (layer.momentum, layer.epsilon) == (KERAS.momentum, KERAS.epsilon)
    assert companion.conventions is conventions


@pytest.mark.parametrize(
    ("shape", "steps", "momentum"),
    [((16, 3), 25, 0.9), ((4, 3, 2, 5), 40, 0.99), ((8, 2), 0, 0.9)],
)
def test_to_pytorch_gives_the_documented_running_statistics(
    shape, steps, momentum
):
    layer, running_mean, running_var = trained(steps, shape, momentum)
    m = math.prod(shape[:-1])
    state = to_pytorch(layer, preserve="statistics", count=m, steps=steps)
    np.testing.assert_allclose(state["running_mean"], running_mean, rtol=1e-12)
    np.testing.assert_allclose(state["running_var"], running_var, rtol=1e-12)
    np.testing.assert_array_equal(state["weight"], layer.gamma)
    np.testing.assert_array_equal(state["bias"], layer.beta)
    assert state["num_batches_tracked"] == steps
    assert state["momentum"] == pytest.approx(1 - momentum, abs=1e-16)
    assert state["eps"] == layer.epsilon
    # the stored statistics differ where the factor m/(m-1) acts
    if steps:
        assert not np.allclose(layer.moving_variance, running_var)


@pytest.mark.parametrize(
    ("shape", "steps", "momentum"),
    [((16, 3), 25, 0.9), ((2, 3, 3, 4), 60, 0.95)],
)
def test_from_pytorch_gives_the_keras_moving_statistics(
    shape, steps, momentum
):
    layer, running_mean, running_var = trained(steps, shape, momentum, seed=3)
    m = math.prod(shape[:-1])
    state = {
        "weight": layer.gamma.copy(),
        "bias": layer.beta.copy(),
        "running_mean": running_mean,
        "running_var": running_var,
        "num_batches_tracked": np.int64(steps),  # a tensor's .numpy()
    }
    converted = from_pytorch(
        state,
        preserve="statistics",
        count=m,
        momentum=1 - momentum,
        eps=1e-3,
    )
    assert converted.momentum == momentum
    assert converted.epsilon == 1e-3
    for a, b in zip(converted.get_weights(), layer.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # the converted layer continues exactly as the original one
    for batch in stream(5, shape, seed=9):
        np.testing.assert_allclose(
            converted(batch, training=True),
            layer(batch, training=True),
            rtol=1e-12,
        )
    np.testing.assert_allclose(
        converted.moving_variance, layer.moving_variance, rtol=1e-12
    )


def test_round_trips_both_ways():
    layer, running_mean, running_var = trained(30, (10, 4), 0.9, seed=5)
    exact = {"preserve": "statistics", "count": 10}
    back = from_pytorch(to_pytorch(layer, steps=30, **exact), **exact)
    assert (back.momentum, back.epsilon) == (layer.momentum, layer.epsilon)
    for a, b in zip(back.get_weights(), layer.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    state = {
        "weight": np.full(4, 1.5),
        "bias": np.full(4, -0.5),
        "running_mean": running_mean,
        "running_var": running_var,
        "num_batches_tracked": 30,
    }
    again = to_pytorch(from_pytorch(state, **exact), steps=30, **exact)
    for key in state:
        np.testing.assert_allclose(again[key], state[key], rtol=1e-14)
    assert again["momentum"] == pytest.approx(0.1, abs=1e-16)
    assert again["eps"] == 1e-5


def pytorch_inference(state, x):
    """torch.nn.BatchNorm*'s documented eval(): the running statistics."""
    scale = state["weight"] / np.sqrt(state["running_var"] + state["eps"])
    return (x - state["running_mean"]) * scale + state["bias"]


def test_preserving_inference_keeps_the_outputs_both_ways():
    layer, running_mean, running_var = trained(40, (12, 3), 0.95, seed=7)
    x = stream(1, (20, 3), seed=8)[0]
    state = to_pytorch(layer)  # preserve="inference"
    np.testing.assert_array_equal(state["running_var"], layer.moving_variance)
    assert state["num_batches_tracked"] == 0
    np.testing.assert_allclose(
        pytorch_inference(state, x), layer(x), rtol=1e-12, atol=1e-12
    )
    torch_state = {
        "weight": layer.gamma,
        "bias": layer.beta,
        "running_mean": running_mean,
        "running_var": running_var,
        "num_batches_tracked": 40,
        "momentum": 0.05,
        "eps": 1e-5,
    }
    keras_layer = from_pytorch(torch_state)
    np.testing.assert_allclose(
        keras_layer(x),
        pytorch_inference(torch_state, x),
        rtol=1e-12,
        atol=1e-12,
    )
    # the same training run: the two frameworks' inference differs, and
    # converting the statistics reproduces the other framework's outputs
    keras_state = to_pytorch(layer, preserve="statistics", count=12, steps=40)
    np.testing.assert_allclose(
        keras_state["running_var"], running_var, rtol=1e-12
    )
    assert not np.allclose(
        pytorch_inference(keras_state, x), layer(x), rtol=1e-3
    )


def test_float32_layers_stay_float32():
    layer = BatchNorm(momentum=0.9)
    for batch in stream(10, (16, 3)):
        layer(batch.astype(np.float32), training=True)
    for preserve in ("inference", "statistics"):
        state = to_pytorch(layer, preserve=preserve, count=16, steps=10)
        assert state["running_var"].dtype == np.float32
        back = from_pytorch(state, preserve=preserve, count=16)
        assert back.moving_variance.dtype == np.float32


def test_variance_conversion_limits():
    v = np.array([0.5, 2.0, 1.0])
    # no step taken: the initial 1 is no batch's variance and stays 1
    np.testing.assert_array_equal(
        unbiased_moving_variance(np.ones(3), 8, momentum=0.9, steps=0),
        np.ones(3),
    )
    # the initial value forgotten: the factor m/(m-1)
    np.testing.assert_allclose(
        unbiased_moving_variance(v, 8, momentum=0.5, steps=2000), v * 8 / 7
    )
    np.testing.assert_allclose(
        biased_moving_variance(v * 8 / 7, 8, momentum=0.5, steps=2000), v
    )


def test_match_epsilon_keeps_inference_outputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    gamma, beta = rng.uniform(0.5, 2, 3), rng.normal(size=3)
    mean, variance = rng.normal(size=3), np.array([1e-4, 0.5, 3.0])
    y = companion.batchnorm_inference(
        x, gamma, beta, mean, variance, epsilon=1e-3
    )
    shifted = match_epsilon(variance, 1e-3, 1e-5)
    np.testing.assert_allclose(
        companion.batchnorm_inference(
            x, gamma, beta, mean, shifted, epsilon=1e-5
        ),
        y,
        rtol=1e-12,
    )
    unmatched = companion.batchnorm_inference(
        x, gamma, beta, mean, variance, epsilon=1e-5
    )
    # channel 0 (variance 1e-4) changes by sqrt(1.1e-3 / 1.1e-4) = 3.2x
    ratio = (unmatched - beta) / (y - beta)
    np.testing.assert_allclose(ratio[:, 0], math.sqrt(1.1e-3 / 1.1e-4))
    with pytest.raises(ValueError, match="below new_epsilon"):
        match_epsilon(np.array([0.0, 1.0]), 1e-5, 1e-3)


def test_steps_to_forget():
    assert steps_to_forget(0.99) == 459
    assert 0.99**459 < 0.01 < 0.99**458
    assert steps_to_forget(0.9, 0.5) == 7
    assert steps_to_forget(0.0) == 1
    with pytest.raises(ValueError, match="never forgets"):
        steps_to_forget(1.0)
    with pytest.raises(ValueError, match="fraction"):
        steps_to_forget(0.9, 1.5)


def built_layer():
    layer = BatchNorm()
    layer.build((None, 3), dtype=np.float64)
    return layer


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: pytorch_momentum(1.5), ValueError, "momentum"),
        (lambda: keras_momentum(-0.1), ValueError, "momentum"),
        (lambda: keras_momentum(None), ValueError, "cumulative average"),
        (lambda: keras_momentum("0.1"), TypeError, "momentum"),
        (
            lambda: unbiased_moving_variance(
                np.ones(2), 1, momentum=0.9, steps=3
            ),
            ValueError,
            "count",
        ),
        (
            lambda: unbiased_moving_variance(
                np.ones(2), 4, momentum=0.9, steps=-1
            ),
            ValueError,
            "steps",
        ),
        (
            lambda: biased_moving_variance(
                np.array([1.0, -1.0]), 4, momentum=0.9, steps=3
            ),
            ValueError,
            "running_variance must be finite and >= 0",
        ),
        (
            lambda: unbiased_moving_variance(
                np.array([np.nan]), 4, momentum=0.9, steps=3
            ),
            ValueError,
            "moving_variance",
        ),
        (lambda: match_epsilon(np.ones(2), 0.0, 1e-5), ValueError, "epsilon"),
        (lambda: to_pytorch("bn", count=4, steps=1), TypeError, "BatchNorm"),
        (
            lambda: to_pytorch(built_layer(), preserve="outputs"),
            ValueError,
            "preserve must be one of",
        ),
        (
            lambda: to_pytorch(built_layer(), preserve="statistics"),
            ValueError,
            "needs count",
        ),
        (
            lambda: to_pytorch(BatchNorm(), count=4, steps=1),
            ValueError,
            "built",
        ),
        (lambda: from_pytorch([1, 2], count=4), TypeError, "mapping"),
        (
            lambda: from_pytorch({"weight": np.ones(2)}, count=4),
            ValueError,
            "missing",
        ),
        (
            lambda: from_pytorch(
                {
                    "weight": np.ones(2),
                    "bias": np.zeros(3),
                    "running_mean": np.zeros(2),
                    "running_var": np.ones(2),
                    "num_batches_tracked": 3,
                },
                count=4,
            ),
            ValueError,
            "shape",
        ),
        (
            lambda: from_pytorch(
                {
                    "weight": np.ones(2),
                    "bias": np.zeros(2),
                    "running_mean": np.zeros(2),
                    "running_var": np.ones(2),
                    "num_batches_tracked": 3,
                    "momentum": None,
                },
                count=4,
            ),
            ValueError,
            "cumulative average",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_against_torch_itself():
    torch = pytest.importorskip("torch")
    shape, steps, momentum = (8, 3, 3, 4), 20, 0.9
    layer = BatchNorm(momentum=momentum, epsilon=1e-3)
    ref = torch.nn.BatchNorm2d(4, momentum=1 - momentum, eps=1e-3).double()
    ref.train()
    for batch in stream(steps, shape, seed=2):
        y = layer(batch, training=True)
        y_ref = ref(torch.from_numpy(batch).permute(0, 3, 1, 2))
        np.testing.assert_allclose(
            y_ref.permute(0, 2, 3, 1).detach().numpy(), y, rtol=1e-10
        )
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    exact = {"preserve": "statistics", "count": 8 * 3 * 3}
    converted = to_pytorch(layer, steps=steps, **exact)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(converted[key], state[key], rtol=1e-10)
    assert int(state["num_batches_tracked"]) == steps
    back = from_pytorch(state, momentum=1 - momentum, **exact)
    np.testing.assert_allclose(
        back.moving_variance, layer.moving_variance, rtol=1e-10
    )
