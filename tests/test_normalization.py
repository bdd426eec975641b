"""Chapter 16's normalizations and chapter 17's merge: layer norm, group
norm, batch renormalization, ghost batches, merge_moments.

Every forward pass is compared with a reference written out here in plain
numpy (not with the functions the package calls); every backward pass with
central differences in float64 and a random upstream gradient.  Keras and
tf-keras parity is in test_tf_parity.py, the properties under hypothesis in
test_properties.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import companion
from companion import functional as F
from companion.gradcheck import numerical_gradient, rel_error
from companion.layers import BatchNorm, keep_moving_statistics
from companion.nn import GroupNorm, LayerNorm, Sequential

EPS = 1e-3
GRAD_TOL = 1e-7  # relative error of the analytic gradient, float64

# (shape, axis): (N, D), NHWC, NCHW.
LAYOUTS = [((12, 6), -1), ((4, 3, 5, 6), -1), ((4, 6, 3, 5), 1)]


def rng_data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(1.5, 2.0, size=shape), rng.normal(size=shape)


def standardized(x, axes, eps=EPS):
    """Reference: (x - mean) / sqrt(var + eps) over ``axes``, numpy's own
    mean and (biased, two-pass) var."""
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


# --------------------------------------------------- BatchNorm's default path
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_default_batchnorm_is_bit_identical_to_the_functional_api(
    shape, axis, dtype
):
    """renorm=False, virtual_batch_size=None: outputs, gradients and
    moving statistics are exactly those of batchnorm_forward/backward and
    Keras's update (the full-scale experiment files depend on it)."""
    rng = np.random.default_rng(1)
    channels = shape[axis]
    gamma = rng.normal(1.0, 0.3, size=channels).astype(dtype)
    beta = rng.normal(size=channels).astype(dtype)
    layer = BatchNorm(axis=axis, momentum=0.9)
    layer.set_weights(
        [gamma, beta, np.zeros(channels, dtype), np.ones(channels, dtype)]
    )
    mean, var = np.zeros(channels, dtype), np.ones(channels, dtype)
    for step in range(3):
        x = rng.normal(step, 1.0 + step, size=shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        y = layer(x, training=True)
        dx = layer.backward(dy)
        y_f, cache = F.batchnorm_forward(x, gamma, beta, axis=axis)
        dx_f, dgamma_f, dbeta_f = F.batchnorm_backward(dy, cache)
        np.testing.assert_array_equal(y, y_f)
        np.testing.assert_array_equal(dx, dx_f)
        np.testing.assert_array_equal(layer.grads["gamma"], dgamma_f)
        np.testing.assert_array_equal(layer.grads["beta"], dbeta_f)
        mean = mean * 0.9 + cache.mean * (1.0 - 0.9)
        var = var * 0.9 + cache.var * (1.0 - 0.9)
        np.testing.assert_array_equal(layer.moving_mean, mean)
        np.testing.assert_array_equal(layer.moving_variance, var)
        # input_gradient=False gives the same parameter gradients
        layer(x, training=True)
        layer.backward(dy, input_gradient=False)
        np.testing.assert_array_equal(layer.grads["gamma"], dgamma_f)
        mean = mean * 0.9 + cache.mean * (1.0 - 0.9)
        var = var * 0.9 + cache.var * (1.0 - 0.9)
    assert layer.weight_names() == [
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
    ]


def test_old_import_paths_name_the_same_objects():
    from companion import layers, nn
    from companion.nn import normalization

    assert layers.BatchNorm is normalization.BatchNorm is companion.BatchNorm
    assert nn.BatchNorm is companion.BatchNorm
    assert (
        layers.keep_moving_statistics is normalization.keep_moving_statistics
    )
    assert (
        companion.LayerNorm is LayerNorm and companion.GroupNorm is GroupNorm
    )
    for name in (
        "layernorm_forward",
        "layernorm_backward",
        "groupnorm_forward",
        "groupnorm_backward",
        "merge_moments",
    ):
        assert getattr(F, name) is getattr(companion, name)
        assert name in F.__all__


# ------------------------------------------------------------ layer norm
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((12, 6), -1),
        ((4, 3, 5, 6), -1),
        ((4, 3, 5, 6), (1, 2, 3)),
        ((4, 6, 3, 5), 1),
        ((4, 3, 5, 6), [-1, 1]),
    ],
)
def test_layernorm_forward_matches_the_reference(shape, axis):
    x, _ = rng_data(shape)
    axes = tuple(sorted(a % len(shape) for a in np.atleast_1d(axis)))
    pshape = tuple(shape[a] for a in axes)
    rng = np.random.default_rng(2)
    gamma, beta = rng.normal(size=pshape), rng.normal(size=pshape)
    bshape = [shape[i] if i in axes else 1 for i in range(len(shape))]
    expected = standardized(x, axes) * gamma.reshape(bshape) + beta.reshape(
        bshape
    )
    y, cache = F.layernorm_forward(x, gamma, beta, axis=axis)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert cache.count == int(np.prod(pshape))


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((12, 6), -1), ((3, 4, 5), (1, 2)), ((3, 4, 2, 5), 1)],
)
def test_layernorm_gradients_match_finite_differences(shape, axis):
    x, dy = rng_data(shape, seed=3)
    axes = tuple(sorted(a % len(shape) for a in np.atleast_1d(axis)))
    pshape = tuple(shape[a] for a in axes)
    rng = np.random.default_rng(4)
    gamma, beta = rng.normal(1.0, 0.5, size=pshape), rng.normal(size=pshape)
    _, cache = F.layernorm_forward(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = F.layernorm_backward(dy, cache)

    def f(xx, gg=gamma, bb=beta):
        return F.layernorm_forward(xx, gg, bb, axis=axis)[0]

    assert rel_error(dx, numerical_gradient(f, x, dy)) < GRAD_TOL
    num_g = numerical_gradient(lambda g: f(x, gg=g), gamma, dy)
    num_b = numerical_gradient(lambda b: f(x, bb=b), beta, dy)
    assert rel_error(dgamma, num_g) < GRAD_TOL
    assert rel_error(dbeta, num_b) < GRAD_TOL
    assert dgamma.shape == dbeta.shape == pshape


def test_layernorm_output_does_not_depend_on_the_rest_of_the_batch():
    x, _ = rng_data((8, 5))
    gamma, beta = np.ones(5), np.zeros(5)
    whole, _ = F.layernorm_forward(x, gamma, beta)
    for i in range(8):
        alone, _ = F.layernorm_forward(x[i : i + 1], gamma, beta)
        np.testing.assert_array_equal(alone[0], whole[i])


# ------------------------------------------------------------ group norm
def groupnorm_reference(x, gamma, beta, groups, axis):
    """Channels on ``axis`` in contiguous groups; per example and group,
    statistics over the group's channels and every position."""
    moved = np.moveaxis(x, axis, -1)  # (N, ..., C)
    n, channels = moved.shape[0], moved.shape[-1]
    out = np.empty_like(moved)
    size = channels // groups
    for i in range(n):
        for g in range(groups):
            block = moved[i, ..., g * size : (g + 1) * size]
            out[i, ..., g * size : (g + 1) * size] = (
                block - block.mean()
            ) / np.sqrt(block.var() + EPS)
    return np.moveaxis(out * gamma + beta, -1, axis)


@pytest.mark.parametrize(
    ("shape", "axis", "groups"),
    [
        (shape, axis, groups)
        for shape, axis in LAYOUTS
        for groups in (1, 2, 3, 6)
        if len(shape) > 2 or groups < 6  # (12, 6), 6 groups: refused
    ],
)
def test_groupnorm_forward_matches_the_reference(shape, axis, groups):
    x, _ = rng_data(shape)
    rng = np.random.default_rng(5)
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    y, cache = F.groupnorm_forward(x, gamma, beta, groups=groups, axis=axis)
    expected = groupnorm_reference(x, gamma, beta, groups, axis)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert cache.count == x[0].size // groups


@pytest.mark.parametrize("groups", [1, 3, 6])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[1:])
def test_groupnorm_gradients_match_finite_differences(shape, axis, groups):
    x, dy = rng_data(shape, seed=6)
    rng = np.random.default_rng(7)
    gamma, beta = rng.normal(1.0, 0.5, size=6), rng.normal(size=6)
    _, cache = F.groupnorm_forward(x, gamma, beta, groups=groups, axis=axis)
    dx, dgamma, dbeta = F.groupnorm_backward(dy, cache)

    def f(xx, gg=gamma, bb=beta):
        return F.groupnorm_forward(xx, gg, bb, groups=groups, axis=axis)[0]

    assert rel_error(dx, numerical_gradient(f, x, dy)) < GRAD_TOL
    num_g = numerical_gradient(lambda g: f(x, gg=g), gamma, dy)
    num_b = numerical_gradient(lambda b: f(x, bb=b), beta, dy)
    assert rel_error(dgamma, num_g) < GRAD_TOL
    assert rel_error(dbeta, num_b) < GRAD_TOL


def test_groupnorm_special_cases_are_layer_and_instance_norm():
    """groups=1: layer norm over (H, W, C) with per-channel parameters;
    groups=C: instance norm (each channel of each example over H, W)."""
    x, _ = rng_data((4, 3, 5, 6))
    rng = np.random.default_rng(8)
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    one, _ = F.groupnorm_forward(x, gamma, beta, groups=1)
    layer, _ = F.layernorm_forward(
        x,
        np.broadcast_to(gamma, (3, 5, 6)),
        np.broadcast_to(beta, (3, 5, 6)),
        axis=(1, 2, 3),
    )
    np.testing.assert_allclose(one, layer, rtol=1e-13, atol=1e-13)
    instance, _ = F.groupnorm_forward(x, gamma, beta, groups=6)
    expected = standardized(x, (1, 2)) * gamma + beta
    np.testing.assert_allclose(instance, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("function", "kwargs"),
    [
        (F.layernorm_forward, {}),
        (F.groupnorm_forward, {"groups": 2}),
    ],
)
def test_low_precision_is_computed_in_float32(function, kwargs):
    import ml_dtypes

    x, _ = rng_data((6, 4))
    for dtype in (np.float16, ml_dtypes.bfloat16):
        y, cache = function(
            x.astype(dtype),
            np.ones(4, np.float32),
            np.zeros(4, np.float32),
            **kwargs,
        )
        assert y.dtype == dtype and cache.x_hat.dtype == np.float32
        exact, _ = function(
            x.astype(dtype).astype(np.float32),
            np.ones(4),
            np.zeros(4),
            **kwargs,
        )
        np.testing.assert_array_equal(y, exact.astype(dtype))
    y64, _ = function(
        np.arange(24).reshape(6, 4), np.ones(4), np.zeros(4), **kwargs
    )
    assert y64.dtype == np.float64


# ------------------------------------------------- ghost batches and renorm
def ghost_reference(x, gamma, beta, size, axis):
    """tf-keras's ghost batches: examples j, j + N/V, j + 2N/V, ..."""
    n = x.shape[0]
    step = n // size
    out = np.empty_like(x)
    moved_axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    for j in range(step):
        rows = np.arange(j, n, step)
        out[rows] = standardized(x[rows], moved_axes)
    bshape = [1] * x.ndim
    bshape[axis] = -1
    return out * gamma.reshape(bshape) + beta.reshape(bshape)


@pytest.mark.parametrize("size", [2, 3, 12])
@pytest.mark.parametrize(
    ("shape", "axis"), [((12, 6), -1), ((12, 6, 2, 2), 1)]
)
def test_ghost_batchnorm_matches_the_reference(shape, axis, size):
    x, dy = rng_data(shape, seed=9)
    rng = np.random.default_rng(10)
    gamma, beta = rng.normal(1.0, 0.5, size=6), rng.normal(size=6)
    y, cache = F.ghost_batchnorm_forward(
        x, gamma, beta, virtual_batch_size=size, axis=axis
    )
    np.testing.assert_allclose(
        y, ghost_reference(x, gamma, beta, size, axis), rtol=1e-12, atol=1e-12
    )
    # the moving averages are fed the mean of the ghost batches' statistics
    moved = np.moveaxis(x, axis, -1).reshape(size, 12 // size, -1, 6)
    np.testing.assert_allclose(
        cache.mean, moved.mean(axis=(0, 2)).mean(axis=0), rtol=1e-13
    )
    np.testing.assert_allclose(
        cache.var, moved.var(axis=(0, 2)).mean(axis=0), rtol=1e-13
    )
    dx, dgamma, dbeta = F.ghost_batchnorm_backward(dy, cache)

    def f(xx, gg=gamma, bb=beta):
        return F.ghost_batchnorm_forward(
            xx, gg, bb, virtual_batch_size=size, axis=axis
        )[0]

    assert rel_error(dx, numerical_gradient(f, x, dy)) < GRAD_TOL
    assert (
        rel_error(dgamma, numerical_gradient(lambda g: f(x, gg=g), gamma, dy))
        < GRAD_TOL
    )
    assert (
        rel_error(dbeta, numerical_gradient(lambda b: f(x, bb=b), beta, dy))
        < GRAD_TOL
    )


def renorm_reference(mean, var, renorm_mean, renorm_stddev, clip, eps=EPS):
    sigma = np.maximum(renorm_stddev, np.sqrt(eps))
    r = np.sqrt(var + eps) / sigma
    d = (mean - renorm_mean) / sigma
    r = np.clip(r, clip.get("rmin", 0.0), clip.get("rmax", np.inf))
    d = np.clip(d, -clip.get("dmax", np.inf), clip.get("dmax", np.inf))
    return r, d


@pytest.mark.parametrize("size", [None, 3])
@pytest.mark.parametrize(
    "clip", [{}, {"rmax": 1.2, "rmin": 0.9, "dmax": 0.2}, {"dmax": 0.0}]
)
@pytest.mark.parametrize(
    ("shape", "axis"), [((12, 6), -1), ((12, 6, 2, 2), 1)]
)
def test_batch_renorm_forward_and_gradients(shape, axis, clip, size):
    """y = gamma (r x_hat + d) + beta with (r, d) from the renorm
    statistics; the gradient treats r and d as constants (stop_gradient)."""
    x, dy = rng_data(shape, seed=11)
    rng = np.random.default_rng(12)
    gamma, beta = rng.normal(1.0, 0.5, size=6), rng.normal(size=6)
    renorm_mean = rng.normal(size=6)
    renorm_stddev = rng.uniform(0.5, 3.0, size=6)
    renorm_stddev[0] = 1e-4  # below sqrt(epsilon): floored
    y, cache = F.batch_renorm_forward(
        x,
        gamma,
        beta,
        renorm_mean,
        renorm_stddev,
        renorm_clipping=clip,
        virtual_batch_size=size,
        axis=axis,
    )
    moved = np.moveaxis(x, axis, -1).reshape(shape[0], -1, 6)
    if size is None:
        mean, var = moved.mean(axis=(0, 1)), moved.var(axis=(0, 1))
        x_hat = ghost_reference(x, np.ones(6), np.zeros(6), shape[0], axis)
    else:
        ghosts = moved.reshape(size, shape[0] // size, -1, 6)
        mean = ghosts.mean(axis=(0, 2)).mean(axis=0)
        var = ghosts.var(axis=(0, 2)).mean(axis=0)
        x_hat = ghost_reference(x, np.ones(6), np.zeros(6), size, axis)
    r, d = renorm_reference(mean, var, renorm_mean, renorm_stddev, clip)
    np.testing.assert_allclose(cache.r.reshape(-1), r, rtol=1e-12)
    np.testing.assert_allclose(cache.d.reshape(-1), d, rtol=1e-12, atol=1e-15)
    bshape = [1] * x.ndim
    bshape[axis] = 6

    def frozen(xx, gg=gamma, bb=beta):
        """The forward pass with this call's r and d held fixed."""
        xh = ghost_reference(xx, np.ones(6), np.zeros(6), size or 12, axis)
        return gg.reshape(bshape) * (
            r.reshape(bshape) * xh + d.reshape(bshape)
        ) + bb.reshape(bshape)

    np.testing.assert_allclose(y, frozen(x), rtol=1e-12, atol=1e-12)
    assert x_hat.shape == y.shape
    dx, dgamma, dbeta = F.batch_renorm_backward(dy, cache)
    assert rel_error(dx, numerical_gradient(frozen, x, dy)) < GRAD_TOL
    num_g = numerical_gradient(lambda g: frozen(x, gg=g), gamma, dy)
    num_b = numerical_gradient(lambda b: frozen(x, bb=b), beta, dy)
    assert rel_error(dgamma, num_g) < GRAD_TOL
    assert rel_error(dbeta, num_b) < GRAD_TOL


def test_renorm_with_the_batch_statistics_is_batch_norm():
    """r = 1 and d = 0 when the renorm statistics are the batch's (up to
    epsilon): renorm changes nothing then."""
    x, _ = rng_data((16, 4))
    gamma, beta = np.full(4, 2.0), np.full(4, 0.5)
    y_bn, cache_bn = F.batchnorm_forward(x, gamma, beta)
    y, cache = F.batch_renorm_forward(
        x, gamma, beta, cache_bn.mean, np.sqrt(cache_bn.var + EPS)
    )
    np.testing.assert_allclose(cache.r, 1.0, rtol=1e-14)
    np.testing.assert_allclose(cache.d, 0.0, atol=1e-14)
    np.testing.assert_allclose(y, y_bn, rtol=1e-13, atol=1e-13)


# -------------------------------------------------------------- the layers
def test_renorm_layer_updates_every_statistic_as_keras_does():
    momentum, fast = 0.9, 0.5
    clip = {"rmax": 1.5, "rmin": 0.5, "dmax": 1.0}
    layer = BatchNorm(
        momentum=momentum,
        renorm=True,
        renorm_clipping=clip,
        renorm_momentum=fast,
    )
    rng = np.random.default_rng(13)
    stats = {
        "moving_mean": np.zeros(3),
        "moving_stddev": np.ones(3),
        "renorm_mean": np.zeros(3),
        "renorm_stddev": np.ones(3),
    }
    for step in range(4):
        x = rng.normal(3.0 * step, 1.0 + step, size=(8, 3))
        r, d = renorm_reference(
            x.mean(0),
            x.var(0),
            stats["renorm_mean"],
            stats["renorm_stddev"],
            clip,
        )
        y = layer(x, training=True)
        np.testing.assert_allclose(
            y, r * standardized(x, (0,)) + d, rtol=1e-12, atol=1e-12
        )
        std = np.sqrt(x.var(0) + EPS)
        for name, rho, value in (
            ("moving_mean", momentum, x.mean(0)),
            ("moving_stddev", momentum, std),
            ("renorm_mean", fast, x.mean(0)),
            ("renorm_stddev", fast, std),
        ):
            stats[name] = stats[name] * rho + value * (1 - rho)
            np.testing.assert_allclose(getattr(layer, name), stats[name])
        np.testing.assert_allclose(
            layer.moving_variance,
            np.maximum(stats["moving_stddev"] ** 2 - EPS, 0.0),
        )
    assert layer.weight_names()[4:] == [
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
    ]
    assert layer.trainable_names() == ["gamma", "beta"]
    assert sorted(layer.params) == ["beta", "gamma"]
    # inference ignores renorm: the moving statistics, as plain batch norm
    plain = BatchNorm()
    plain.set_weights(layer.get_weights()[:4])
    x = rng.normal(size=(5, 3))
    np.testing.assert_array_equal(layer(x), plain(x))


def test_ghost_layer_updates_with_the_mean_of_the_ghost_statistics():
    layer = BatchNorm(momentum=0.5, virtual_batch_size=4)
    x, dy = rng_data((12, 3), seed=14)
    y = layer(x, training=True)
    np.testing.assert_allclose(
        y, ghost_reference(x, np.ones(3), np.zeros(3), 4, -1), rtol=1e-12
    )
    ghosts = x.reshape(4, 3, 3)  # (V, N/V, C): ghost j = rows j, j+3, ...
    np.testing.assert_allclose(
        layer.moving_mean, 0.5 * ghosts.mean(axis=0).mean(axis=0)
    )
    np.testing.assert_allclose(
        layer.moving_variance, 0.5 + 0.5 * ghosts.var(axis=0).mean(axis=0)
    )
    dx = layer.backward(dy)
    _, cache = F.ghost_batchnorm_forward(
        x, np.ones(3), np.zeros(3), virtual_batch_size=4
    )
    np.testing.assert_allclose(dx, F.ghost_batchnorm_backward(dy, cache)[0])
    # one ghost batch of the whole batch: plain batch norm
    whole = BatchNorm(virtual_batch_size=12)
    np.testing.assert_array_equal(
        whole(x, training=True), BatchNorm()(x, training=True)
    )
    # inference: the moving statistics, whatever the batch size
    assert layer(x[:5]).shape == (5, 3)


def test_fully_clipped_renorm_trains_exactly_as_batch_norm():
    """rmin = rmax = 1, dmax = 0 leave r = 1, d = 0: the output and the
    gradients are batch norm's, bit for bit."""
    clip = {"rmin": 1, "rmax": 1, "dmax": 0}
    layer = BatchNorm(renorm=True, renorm_clipping=clip)
    plain = BatchNorm()
    rng = np.random.default_rng(15)
    for _ in range(3):
        x = rng.normal(5.0, 3.0, size=(6, 4))
        dy = rng.normal(size=(6, 4))
        np.testing.assert_array_equal(
            layer(x, training=True), plain(x, training=True)
        )
        np.testing.assert_array_equal(layer.backward(dy), plain.backward(dy))
        for name in ("gamma", "beta"):
            np.testing.assert_array_equal(layer.grads[name], plain.grads[name])
        np.testing.assert_array_equal(layer.moving_mean, plain.moving_mean)


SATURATED = {"rmin": 1.3, "rmax": 1.3, "dmax": 0.1}


@pytest.mark.parametrize(
    "make",
    [
        lambda: LayerNorm(),
        lambda: LayerNorm(axis=(1, 2)),
        lambda: GroupNorm(groups=3),
        lambda: GroupNorm(groups=2, axis=1),
        lambda: LayerNorm(center=False),
        lambda: GroupNorm(groups=1, scale=False),
        lambda: BatchNorm(virtual_batch_size=3),
        lambda: BatchNorm(renorm=True, renorm_clipping=SATURATED),
        lambda: BatchNorm(
            axis=1,
            renorm=True,
            renorm_clipping=SATURATED,
            virtual_batch_size=2,
        ),
    ],
)
def test_layer_gradients_match_finite_differences(make):
    """Layer backward against central differences of the layer's forward.

    Renorm holds r and d constant in its gradient; clipped to a point
    (rmin = rmax) and saturated (|d| > dmax, the renorm mean far from the
    batch's) they are constant near x, so differences of the layer's own
    forward pass check it, with r = 1.3 and d = -0.1."""
    x, dy = rng_data((6, 4, 3), seed=16)
    layer = make()
    layer(x, training=True)
    rng = np.random.default_rng(17)
    for name in layer.trainable_names():
        array = getattr(layer, name)
        array[...] = rng.normal(1.0, 0.3, size=array.shape)
    if isinstance(layer, BatchNorm) and layer.renorm:
        layer.renorm_mean[...] = 100.0
    layer(x, training=True)
    dx = layer.backward(dy)
    grads = dict(layer.grads)
    if isinstance(layer, BatchNorm) and layer.renorm:
        np.testing.assert_array_equal(layer._cache.r, 1.3)
        np.testing.assert_array_equal(layer._cache.d, -0.1)
        layer.renorm_momentum = layer.momentum = 1.0  # stop updating

    def f(xx):
        return layer(xx, training=True)

    assert rel_error(dx, numerical_gradient(f, x, dy)) < GRAD_TOL
    for name, grad in grads.items():
        array = getattr(layer, name)

        def g(value, array=array):
            saved = array.copy()
            array[...] = value
            try:
                return layer(x, training=True)
            finally:
                array[...] = saved

        numerical = numerical_gradient(g, array.copy(), dy)
        assert rel_error(grad, numerical) < GRAD_TOL


def test_per_example_layers_build_train_and_ignore_the_training_flag():
    layer = LayerNorm()
    x, dy = rng_data((5, 4), seed=18)
    y_train = layer(x, training=True)
    np.testing.assert_array_equal(layer(x, training=False), y_train)
    assert layer.weight_names() == ["gamma", "beta"]
    assert layer.gamma.shape == (4,) and layer.gamma.dtype == np.float64
    layer.backward(dy)
    assert sorted(layer.grads) == ["beta", "gamma"]
    one = layer(x[:1], training=True)  # a batch of one is fine
    np.testing.assert_array_equal(one, y_train[:1])
    group = GroupNorm(groups=2, center=False)
    group(np.zeros((2, 3, 4), np.float32))
    assert group.weight_names() == ["gamma"] and group.beta is None
    assert group.gamma.dtype == np.float32
    assert group.get_config() == {
        "groups": 2,
        "axis": -1,
        "epsilon": 1e-3,
        "center": False,
        "scale": True,
    }
    model = Sequential([GroupNorm(groups=2), LayerNorm()])
    model(x, training=True)
    model.backward(dy)
    assert sorted(model.grads) == ["0.beta", "0.gamma", "1.beta", "1.gamma"]


def test_keep_moving_statistics_restores_the_renorm_statistics():
    layer = BatchNorm(renorm=True)
    x, _ = rng_data((8, 3))
    layer(x, training=True)
    before = layer.get_weights()
    with keep_moving_statistics([layer]):
        layer(x + 5.0, training=True)
        assert not np.array_equal(layer.renorm_mean, before[5])
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_round_trips_and_only_shows_the_options_that_are_set():
    plain = BatchNorm()
    assert sorted(plain.get_config()) == [
        "axis",
        "center",
        "epsilon",
        "momentum",
        "scale",
    ]
    layer = BatchNorm(
        renorm=True,
        renorm_clipping={"rmax": 3},
        renorm_momentum=0.9,
        virtual_batch_size=4,
    )
    config = layer.get_config()
    assert config["renorm_clipping"] == {"rmax": 3.0}
    again = BatchNorm(**config)
    assert again.get_config() == config
    assert "renorm=True" in repr(again) and "virtual_batch_size=4" in repr(
        again
    )


# -------------------------------------------------------------- bad input
def state(layer):
    return (
        layer.built,
        [w.copy() for w in layer.get_weights()] if layer.built else None,
        layer._cache,
    )


def assert_same_state(before, after):
    assert before[0] == after[0] and before[2] is after[2]
    if before[1] is not None:
        for a, b in zip(before[1], after[1], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("make", "x", "message"),
    [
        (
            lambda: GroupNorm(groups=4),
            np.ones((2, 6)),
            "does not divide the 6",
        ),
        (lambda: GroupNorm(groups=2, axis=0), np.ones((2, 6)), "batch axis"),
        (lambda: GroupNorm(groups=3), np.ones((2, 3)), "1 value per group"),
        (lambda: GroupNorm(groups=3), np.ones(6), "rank >= 2"),
        (lambda: LayerNorm(axis=0), np.ones((2, 6)), "batch axis"),
        (lambda: LayerNorm(axis=[1, -1]), np.ones((2, 6)), "each axis once"),
        (lambda: LayerNorm(axis=2), np.ones((2, 6)), "out of range"),
        (lambda: LayerNorm(), np.ones((2, 1)), "1 value per example"),
        (
            lambda: BatchNorm(virtual_batch_size=4),
            np.ones((6, 3)),
            "virtual_batch_size=4 does not divide the batch of 6",
        ),
        (
            lambda: BatchNorm(virtual_batch_size=1),
            np.ones((6, 3)),
            "ghost batch",
        ),
    ],
)
def test_bad_input_to_a_new_layer_is_refused_and_builds_nothing(
    make, x, message
):
    layer = make()
    with pytest.raises(ValueError, match=message):
        layer(x, training=True)
    assert not layer.built and layer._cache is None


@pytest.mark.parametrize(
    ("make", "bad"),
    [
        (lambda: GroupNorm(groups=3), np.ones((4, 4))),
        (lambda: GroupNorm(groups=3), np.ones((4, 9))),
        (lambda: LayerNorm(), np.ones((4, 5))),
        (lambda: GroupNorm(groups=2, axis=1), np.ones((4, 5))),
    ],
)
def test_bad_input_to_a_built_layer_changes_nothing(make, bad):
    layer = make()
    x, dy = rng_data((4, 6), seed=19)
    layer(x, training=True)
    layer.backward(dy)
    before = state(layer)
    grads = dict(layer.grads)
    with pytest.raises(ValueError):
        layer(bad, training=True)
    assert_same_state(before, state(layer))
    assert layer.grads == grads


def test_a_ghost_batch_that_does_not_divide_leaves_the_layer_unchanged():
    layer = BatchNorm(virtual_batch_size=4, renorm=True)
    x, dy = rng_data((8, 3))
    layer(x, training=True)
    layer.backward(dy)
    before = state(layer)
    with pytest.raises(ValueError, match="does not divide the batch of 10"):
        layer(np.ones((10, 3)), training=True)
    assert_same_state(before, state(layer))
    layer(np.ones((10, 3)))  # inference: no ghost batches, any size


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"renorm_clipping": {"rmax": 2}}, ValueError, "needs renorm=True"),
        (
            {"renorm": True, "renorm_clipping": {"r_max": 2}},
            ValueError,
            "unknown keys",
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 1}},
            ValueError,
            "rmin <= rmax",
        ),
        (
            {"renorm": True, "renorm_clipping": {"dmax": -1}},
            ValueError,
            "must be >= 0",
        ),
        (
            {"renorm": True, "renorm_clipping": {"dmax": "1"}},
            TypeError,
            "must be a float",
        ),
        ({"renorm": True, "renorm_clipping": [1]}, TypeError, "a dict"),
        ({"renorm": 1}, TypeError, "renorm must be a bool"),
        ({"renorm": True, "renorm_momentum": 2}, ValueError, "momentum"),
        ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size=0"),
        ({"virtual_batch_size": 2.0}, TypeError, "virtual_batch_size"),
        ({"virtual_batch_size": 2, "axis": 0}, ValueError, "batch axis"),
    ],
)
def test_bad_batchnorm_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        BatchNorm(**kwargs)


def test_bad_functional_input_is_refused():
    x = np.ones((4, 6))
    one, zero = np.ones(6), np.zeros(6)
    with pytest.raises(ValueError, match="groups=4 does not divide"):
        F.groupnorm_forward(x, one, zero, groups=4)
    with pytest.raises(TypeError, match="groups must be an int"):
        F.groupnorm_forward(x, one, zero, groups=2.0)
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\)"):
        F.layernorm_forward(x, np.ones(5), zero)
    with pytest.raises(ValueError, match="gamma must be finite"):
        F.layernorm_forward(x, np.full(6, np.nan), zero)
    y, _ = F.layernorm_forward(x, np.full(6, np.nan), zero, check_finite=False)
    assert np.isnan(y).all()
    with pytest.raises(ValueError, match="empty"):
        F.layernorm_forward(np.ones((0, 6)), one, zero)
    with pytest.raises(ValueError, match="rank >= 2"):
        F.layernorm_forward(np.ones(6), one, zero)
    _, cache = F.groupnorm_forward(
        np.random.default_rng(0).normal(size=(4, 6)), one, zero, groups=2
    )
    with pytest.raises(TypeError, match="returned by layernorm_forward"):
        F.layernorm_backward(np.ones((4, 6)), cache)
    with pytest.raises(ValueError, match="shape of the forward output"):
        F.groupnorm_backward(np.ones((4, 5)), cache)
    with pytest.raises(ValueError, match="virtual_batch_size=3 does not"):
        F.ghost_batchnorm_forward(x, one, zero, virtual_batch_size=3)
    with pytest.raises(TypeError, match="virtual_batch_size must be an int"):
        F.ghost_batchnorm_forward(x, one, zero, virtual_batch_size=None)
    with pytest.raises(ValueError, match="renorm_stddev must have shape"):
        F.batch_renorm_forward(x, one, zero, zero, np.ones(5))
    with pytest.raises(TypeError, match="RenormCache"):
        F.batch_renorm_backward(np.ones((4, 6)), cache)


def test_renorm_and_ghost_layers_round_trip_through_a_state_file(tmp_path):
    layer = BatchNorm(
        momentum=0.5,
        renorm=True,
        renorm_clipping={"rmax": 2.0, "dmax": float("inf")},
        renorm_momentum=0.75,
        virtual_batch_size=2,
    )
    x, _ = rng_data((8, 3))
    layer(x, training=True)
    path = layer.save(tmp_path / "renorm")
    again = BatchNorm.from_file(path)
    assert again.get_config() == layer.get_config()
    assert again.weight_names() == layer.weight_names()
    for a, b in zip(again.get_weights(), layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        again(x, training=True), layer(x, training=True)
    )
    # a layer with other options refuses the file and stays as it was
    plain = BatchNorm(momentum=0.5)
    plain(x, training=True)
    before = [w.copy() for w in plain.get_weights()]
    with pytest.raises(ValueError, match="renorm=True"):
        plain.load(path)
    for a, b in zip(plain.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="renorm=None"):
        layer.load(plain.save(tmp_path / "plain"))


def test_a_state_file_with_a_bad_option_is_refused(tmp_path):
    import json

    layer = BatchNorm(virtual_batch_size=2)
    layer(np.ones((4, 2)), training=True)
    path = layer.save(tmp_path / "ghost")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    for bad, message in (
        ({"virtual_batch_size": 0}, "virtual_batch_size=0"),
        ({"renorm_clipping": {"r": 1}}, "unknown keys"),
        ({"surprise": 1}, "optionally"),
    ):
        config = {**json.loads(str(arrays["config"])), **bad}
        np.savez(
            tmp_path / "bad.npz",
            **{**arrays, "config": np.array(json.dumps(config))},
        )
        with pytest.raises(ValueError, match=message):
            BatchNorm.from_file(tmp_path / "bad.npz")
