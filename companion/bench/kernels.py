"""The batch norm kernels the benchmark times, built for one case.

Three kernels, each with the least memory traffic it could have, counted
in passes over the tensor (one pass = reading or writing x.nbytes):

* ``train`` -- training-mode forward and backward: the forward reads x
  for the statistics and again to normalize, and writes y (3 passes); the
  backward reads dy and x for the two sums, reads them again and writes
  dx (5 passes): 8 passes;
* ``forward`` -- the training-mode forward alone: 3 passes;
* ``inference`` -- the fixed affine map: read x, write y: 2 passes.

``copy`` (``np.copyto`` into a buffer: read and write, 2 passes) is the
roofline: a kernel's fraction of it is
``passes * t_copy / (2 * t_kernel)``.

The implementations: ``reference`` (:func:`companion.batchnorm_forward`,
:func:`companion.batchnorm_backward`, :func:`companion.batchnorm_inference`,
the code chapters 2-4 derive), ``staged`` (the backward pass node by node,
:func:`companion.batchnorm_backward_staged`), ``blocked``
(:mod:`companion._fast_bn`, the blocked path for large channels), ``layer``
(:class:`companion.BatchNorm`, what a network calls), ``tf_fused``
(``tf.compat.v1.nn.fused_batch_norm`` in a ``tf.function``, gradients by
``tf.GradientTape``; float32 only: the kernel has no float64 version) and
``keras`` (``keras.layers.BatchNormalization`` in a ``tf.function``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from companion import _fast_bn
from companion.functional import (
    batchnorm_backward,
    batchnorm_backward_staged,
    batchnorm_forward,
    batchnorm_inference,
)
from companion.layers import BatchNorm

__all__ = [
    "FLOPS",
    "IMPLEMENTATIONS",
    "KERNELS",
    "MATMUL_SIZE",
    "Case",
    "matmul_kernel",
    "numpy_kernels",
    "tensorflow_kernels",
]

KERNELS = {"train": 8, "forward": 3, "inference": 2}
"""Each kernel and its least memory traffic, in passes over the tensor."""
COPY_PASSES = 2
FLOPS = {"train": 14, "forward": 7, "inference": 2}
"""Arithmetic per value: the forward's sum, centering, square, sum,
scaling by 1/sigma, by gamma and the shift (7); the backward's two sums
(one of products) and dx's subtract, multiply, subtract, multiply (7);
inference's folded a x + b (2)."""
IMPLEMENTATIONS = (
    "reference",
    "staged",
    "blocked",
    "layer",
    "tf_fused",
    "keras",
)
LAYOUTS = ("ND", "NHWC", "NCHW")
EPSILON = 1e-3

Kernel = Callable[[], Any]


@dataclasses.dataclass(frozen=True)
class Case:
    """A tensor to normalize: layout, shape and dtype."""

    layout: str
    """``"ND"`` ((N, D), features last), ``"NHWC"`` or ``"NCHW"``."""
    shape: tuple[int, ...]
    dtype: str
    """``"float32"`` or ``"float64"``."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"layout must be one of {LAYOUTS}; received {self.layout!r}"
            )
        rank = 2 if self.layout == "ND" else 4
        if len(self.shape) != rank or min(self.shape, default=0) < 1:
            raise ValueError(
                f"a {self.layout} shape has {rank} positive sizes; "
                f"received {self.shape}"
            )
        if self.dtype not in ("float32", "float64"):
            raise ValueError(
                "dtype must be 'float32' or 'float64'; received "
                f"{self.dtype!r}"
            )

    @property
    def axis(self) -> int:
        """The channel axis (Keras's meaning)."""
        return 1 if self.layout == "NCHW" else -1

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def label(self) -> str:
        """E.g. ``"NHWC 64×32×32×64"``."""
        return f"{self.layout} " + "×".join(map(str, self.shape))


def _arrays(case: Case, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(case.dtype)
    c = case.channels
    return {
        "x": rng.normal(0.5, 2.0, size=case.shape).astype(dtype),
        "dy": rng.normal(size=case.shape).astype(dtype),
        "gamma": rng.normal(1.0, 0.2, size=c).astype(dtype),
        "beta": rng.normal(0.0, 0.2, size=c).astype(dtype),
        "mean": rng.normal(0.5, 0.1, size=c).astype(dtype),
        "var": rng.uniform(3.0, 5.0, size=c).astype(dtype),
    }


MATMUL_SIZE = 1024
"""The compute roof: a float matrix product of this size (2 n^3 flops),
numpy's BLAS on its default threads."""


def matmul_kernel(dtype: str, size: int = MATMUL_SIZE) -> Kernel:
    """``a @ b`` of two ``size`` x ``size`` matrices into a buffer."""
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(size, size)).astype(dtype) for _ in range(2))
    out = np.empty_like(a)
    return lambda: np.matmul(a, b, out=out)


def numpy_kernels(case: Case, seed: int = 0) -> dict[tuple[str, str], Kernel]:
    """The companion's kernels and the copy: ``{(kernel, impl): call}``."""
    a = _arrays(case, seed)
    x, dy, gamma, beta = a["x"], a["dy"], a["gamma"], a["beta"]
    axis = case.axis
    kept = axis % x.ndim
    reduce_axes = tuple(i for i in range(x.ndim) if i != kept)
    shape = tuple(x.shape[i] if i == kept else 1 for i in range(x.ndim))
    layer = BatchNorm(axis=axis, epsilon=EPSILON)
    layer.build(x.shape, x.dtype)
    layer.set_weights([gamma, beta, a["mean"], a["var"]])
    buffer = np.empty_like(x)

    def reference_train() -> None:
        _, cache = batchnorm_forward(x, gamma, beta, axis=axis)
        batchnorm_backward(dy, cache)

    def staged_train() -> None:
        _, cache = batchnorm_forward(x, gamma, beta, axis=axis)
        batchnorm_backward_staged(dy, cache)

    def blocked_forward() -> Any:
        return _fast_bn.training_forward(
            x, gamma, beta, kept, reduce_axes, shape, EPSILON
        )

    def blocked_train() -> None:
        _, cache = blocked_forward()
        _fast_bn.training_backward(dy, cache)

    def layer_train() -> None:
        layer(x, training=True)
        layer.backward(dy)

    return {
        ("copy", "numpy"): lambda: np.copyto(buffer, x),
        ("train", "reference"): reference_train,
        ("train", "staged"): staged_train,
        ("train", "blocked"): blocked_train,
        ("train", "layer"): layer_train,
        ("forward", "reference"): lambda: batchnorm_forward(
            x, gamma, beta, axis=axis
        ),
        ("forward", "blocked"): blocked_forward,
        ("forward", "layer"): lambda: layer(x, training=True),
        ("inference", "reference"): lambda: batchnorm_inference(
            x, gamma, beta, a["mean"], a["var"], axis=axis
        ),
        ("inference", "layer"): lambda: layer(x, training=False),
    }


def tensorflow_kernels(
    case: Case, seed: int = 0
) -> dict[tuple[str, str], Kernel]:
    """TensorFlow's fused kernel (float32) and Keras's layer, compiled.

    Needs ``batchnorm-companion[tf]``.
    """
    from companion.tf_env import import_tensorflow

    tf = import_tensorflow()
    import keras

    a = _arrays(case, seed)
    x, dy = tf.constant(a["x"]), tf.constant(a["dy"])
    kernels: dict[tuple[str, str], Kernel] = {}
    if case.dtype == "float32":
        kernels.update(_fused(tf, case, a, x, dy))
    layer = keras.layers.BatchNormalization(
        axis=case.axis, epsilon=EPSILON, dtype=case.dtype
    )
    layer.build(case.shape)
    layer.set_weights([a["gamma"], a["beta"], a["mean"], a["var"]])
    variables = list(layer.trainable_variables)

    @tf.function
    def keras_train(x: Any, dy: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x, *variables], output_gradients=dy)

    @tf.function
    def keras_call(x: Any, training: bool) -> Any:
        return layer(x, training=training)

    kernels[("train", "keras")] = lambda: keras_train(x, dy)
    kernels[("forward", "keras")] = lambda: keras_call(x, True)
    kernels[("inference", "keras")] = lambda: keras_call(x, False)
    return kernels


def _fused(
    tf: Any, case: Case, a: dict[str, np.ndarray], x: Any, dy: Any
) -> dict[tuple[str, str], Kernel]:
    """``tf.compat.v1.nn.fused_batch_norm``: 4-D only, so (N, D) runs as
    (N, 1, 1, D) NHWC (a reshape, no copy)."""
    fmt = "NCHW" if case.layout == "NCHW" else "NHWC"
    four_d = case.shape if len(case.shape) == 4 else (case.shape[0], 1, 1, -1)
    scale = tf.Variable(a["gamma"])
    offset = tf.Variable(a["beta"])
    mean, var = tf.constant(a["mean"]), tf.constant(a["var"])
    fused = tf.compat.v1.nn.fused_batch_norm

    @tf.function
    def train(x: Any, dy: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, _, _ = fused(
                tf.reshape(x, four_d),
                scale,
                offset,
                epsilon=EPSILON,
                data_format=fmt,
                is_training=True,
            )
        return tape.gradient(
            y, [x, scale, offset], output_gradients=tf.reshape(dy, four_d)
        )

    @tf.function
    def forward(x: Any) -> Any:
        return fused(
            tf.reshape(x, four_d),
            scale,
            offset,
            epsilon=EPSILON,
            data_format=fmt,
            is_training=True,
        )[0]

    @tf.function
    def inference(x: Any) -> Any:
        return fused(
            tf.reshape(x, four_d),
            scale,
            offset,
            mean=mean,
            variance=var,
            epsilon=EPSILON,
            data_format=fmt,
            is_training=False,
        )[0]

    return {
        ("train", "tf_fused"): lambda: train(x, dy),
        ("forward", "tf_fused"): lambda: forward(x),
        ("inference", "tf_fused"): lambda: inference(x),
    }
