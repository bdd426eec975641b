"""companion.recalibrate: the paper's Algorithm 2 (population statistics
with the unbiased variance), against a direct computation written here."""

from __future__ import annotations

import numpy as np
import pytest

import companion
from companion import BatchNorm, nn, recalibrate
from companion.recalibration import PopulationStatistics


def mlp(seed=0):
    model = nn.Sequential(
        [
            nn.Dense(5, use_bias=False, seed=seed),
            BatchNorm(momentum=0.9),
            nn.ReLU(),
            nn.Dense(4, seed=seed + 1),
            BatchNorm(epsilon=1e-2),
            nn.Dense(3, seed=seed + 2),
        ]
    )
    model.build((None, 6), dtype=np.float64)
    rng = np.random.default_rng(seed + 10)
    for index in (1, 4):
        c = model.layers[index].channels
        model.layers[index].set_weights(
            [
                rng.uniform(0.5, 2, c),
                rng.normal(0, 1, c),
                rng.normal(0, 1, c),
                rng.uniform(0.5, 2, c),
            ]
        )
    return model


def data(n_batches, m, seed=1, shape=(6,)):
    rng = np.random.default_rng(seed)
    return [rng.normal(1.0, 2.0, size=(m, *shape)) for _ in range(n_batches)]


def direct_statistics(model, batches):
    """Algorithm 2 for mlp(): the training-mode forward pass written out."""

    def train_bn(z, layer):
        mu, var = z.mean(axis=0), z.var(axis=0)
        return layer.gamma * (z - mu) / np.sqrt(var + layer.epsilon) + (
            layer.beta
        )

    dense1, bn1, _, dense2, _, _ = model.layers
    inputs1, inputs2 = [], []
    for x in batches:
        z1 = x @ dense1.kernel
        inputs1.append(z1)
        h = np.maximum(train_bn(z1, bn1), 0.0)
        inputs2.append(h @ dense2.kernel + dense2.bias)
    out = []
    for inputs in (inputs1, inputs2):
        mean = np.mean([z.mean(axis=0) for z in inputs], axis=0)
        # Bessel's correction batch by batch: var(ddof=1) = m/(m-1) var
        variance = np.mean([z.var(axis=0, ddof=1) for z in inputs], axis=0)
        out.append((mean, variance))
    return out


def test_recalibrate_sets_algorithm_2_statistics_and_nothing_else():
    model = mlp()
    batches = data(7, m=8)
    expected = direct_statistics(model, batches)
    kernels = [layer.get_weights() for layer in model.layers[::3]]
    affine = [model.layers[i].get_weights()[:2] for i in (1, 4)]

    result = recalibrate(model, batches)

    assert companion.recalibrate is recalibrate
    assert len(result) == 2
    for layer, stats, (mean, variance) in zip(
        (model.layers[1], model.layers[4]), result, expected, strict=True
    ):
        assert isinstance(stats, PopulationStatistics)
        assert stats.m == 8 and stats.batches == 7
        np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-12)
        np.testing.assert_allclose(layer.moving_variance, variance, rtol=1e-12)
        np.testing.assert_array_equal(stats.mean, layer.moving_mean)
        np.testing.assert_array_equal(stats.variance, layer.moving_variance)
    for before, layer in zip(kernels, model.layers[::3], strict=True):
        for a, b in zip(before, layer.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    for before, i in zip(affine, (1, 4), strict=True):
        for a, b in zip(
            before, model.layers[i].get_weights()[:2], strict=True
        ):
            np.testing.assert_array_equal(a, b)
    assert model.layers[1].momentum == 0.9


def test_the_variance_is_unbiased_and_keras_average_is_not():
    """Batches of m = 2 from N(3, 4): Algorithm 2 estimates 4; the plain
    average of the biased batch variances estimates (m-1)/m * 4 = 2."""
    model = nn.Sequential([BatchNorm()])
    model.build((None, 200), dtype=np.float64)
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(2, 200)) for _ in range(500)]
    (stats,) = recalibrate(model, batches)
    assert stats.m == 2
    # 200 channels x 500 batches: the mean over channels is within 2 %
    assert abs(stats.variance.mean() / 4.0 - 1) < 0.02
    biased = np.mean([b.var(axis=0) for b in batches], axis=0)
    assert abs(biased.mean() / 2.0 - 1) < 0.02
    np.testing.assert_allclose(stats.variance, 2 * biased, rtol=1e-12)
    np.testing.assert_allclose(
        stats.mean, np.concatenate(batches).mean(axis=0), rtol=1e-12
    )


def test_convolutional_batch_norm_counts_n_h_w_values_per_channel():
    model = nn.Sequential(
        [nn.Conv2D(3, 3, padding="same", seed=0), BatchNorm(), nn.ReLU()]
    )
    model.build((None, 5, 4, 2), dtype=np.float64)
    batches = data(3, m=2, shape=(5, 4, 2))
    conv = model.layers[0]
    inputs = [conv(x) for x in batches]
    (stats,) = recalibrate(model, ((x, None) for x in batches))
    assert stats.m == 2 * 5 * 4 and stats.batches == 3
    mean = np.mean([z.mean(axis=(0, 1, 2)) for z in inputs], axis=0)
    variance = np.mean(
        [z.reshape(-1, 3).var(axis=0, ddof=1) for z in inputs], axis=0
    )
    np.testing.assert_allclose(model.layers[1].moving_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(
        model.layers[1].moving_variance, variance, rtol=1e-12
    )


def test_float32_models_accumulate_in_float64():
    model = nn.Sequential([nn.Dense(3, seed=0), BatchNorm()])
    model.build((None, 4))  # float32
    batches = [x.astype(np.float32) for x in data(4, m=16, shape=(4,))]
    (stats,) = recalibrate(model, batches)
    layer = model.layers[1]
    assert layer.moving_mean.dtype == np.float32
    assert stats.mean.dtype == np.float64
    z = [x.astype(np.float64) @ model.layers[0].kernel for x in batches]
    z = [zi + model.layers[0].bias for zi in z]
    mean = np.mean([zi.mean(axis=0) for zi in z], axis=0)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-6, atol=1e-6)


def test_recalibrate_follows_nested_sequentials():
    inner = nn.Sequential([nn.Dense(3, seed=1), BatchNorm()])
    model = nn.Sequential([nn.Dense(4, seed=0), nn.ReLU(), inner])
    model.build((None, 6), dtype=np.float64)
    batches = data(3, m=5)
    (stats,) = recalibrate(model, batches)
    h = [np.maximum(x @ model.layers[0].kernel, 0) for x in batches]
    z = [hi @ inner.layers[0].kernel for hi in h]
    np.testing.assert_allclose(
        stats.variance,
        np.mean([zi.var(axis=0, ddof=1) for zi in z], axis=0),
        rtol=1e-12,
    )


def state(model):
    return [w.copy() for w in model.get_weights()]


def assert_unchanged(model, before):
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("batches", "error", "match"),
    [
        ([], ValueError, "batches is empty"),
        (
            [np.ones((8, 6)), np.ones((7, 6))],
            ValueError,
            "same number m of values per channel",
        ),
        ([np.ones((1, 6))], ValueError, "needs m >= 2"),
        ([np.full((4, 6), np.nan)], ValueError, "not finite"),
        ([np.ones((4, 5))], ValueError, "features"),
        ([(np.ones((4, 6)), 1, 2)], ValueError, "tuple of 3 items"),
        ([np.array([["a"] * 6] * 4)], TypeError, "batches"),
    ],
)
def test_bad_batches_leave_the_model_unchanged(batches, error, match):
    model = mlp()
    good = data(3, m=4)
    before = state(model)
    with pytest.raises(error, match=match):
        recalibrate(model, [*good, *batches] if batches else batches)
    assert_unchanged(model, before)


def test_bad_models_are_refused():
    no_bn = nn.Sequential([nn.Dense(3, seed=0)])
    no_bn.build((None, 2))
    with pytest.raises(ValueError, match="nothing to recalibrate"):
        recalibrate(no_bn, data(2, m=4, shape=(2,)))
    unbuilt = nn.Sequential([nn.Dense(3, seed=0), BatchNorm()])
    with pytest.raises(ValueError, match="not built"):
        recalibrate(unbuilt, data(2, m=4, shape=(2,)))
    with pytest.raises(TypeError, match="companion Sequential"):
        recalibrate([BatchNorm()], data(2, m=4))
    with pytest.raises(TypeError, match="companion Sequential"):
        recalibrate([*nn.Sequential([nn.Dense(2)]).layers, 3], [])

    class Branches(nn.Dense):  # a composite layer that is not a Sequential
        def __init__(self, units):
            super().__init__(units)
            self.layers = [nn.Dense(units)]

    with pytest.raises(TypeError, match="composite layer"):
        recalibrate(nn.Sequential([Branches(2), BatchNorm()]), [])
