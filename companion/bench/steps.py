"""One training step of the book's networks: the companion against Keras.

* ``mlp_bn`` -- the experiments' MLP, 784-100-100-100-10 with batch norm
  before each ReLU (:func:`companion.training.mlp`), batch 60, plain SGD
  (learning rate 0.1), as Part III trains it;
* ``mlp`` -- the same MLP without batch norm;
* ``cnn`` -- the source text's CNN (:mod:`companion.tf_models`: three 5x5
  convolutions, batch norm after conv3, a dense layer), batch 64, SGD with
  momentum 0.9.

A companion step is what :func:`companion.training.train` does per
mini-batch: the training-mode forward pass, the softmax cross-entropy, the
backward pass (no gradient for the images) and the SGD update.
``companion`` runs it with numpy's default BLAS threads, ``companion_1t``
with one BLAS thread, as the experiments run (Part III runs two
experiments side by side; a batch of 60 is too small for two threads to
help).  ``keras`` is ``model.train_on_batch`` of the same network,
compiled (a ``tf.function`` step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from companion.nn import SGD, softmax_cross_entropy
from companion.training import mlp

__all__ = ["STEPS", "STEP_IMPLEMENTATIONS", "step_kernels"]

STEPS = {
    "mlp_bn": "MLP 784-100-100-100-10, BN before ReLU, batch 60",
    "mlp": "MLP 784-100-100-100-10, no BN, batch 60",
    "cnn": "CNN of the source text (BN after conv3), batch 64",
}
STEP_IMPLEMENTATIONS = ("companion", "companion_1t", "keras")
_HIDDEN = (100, 100, 100)


def _batch(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (64, 28, 28, 1) if name == "cnn" else (60, 784)
    x = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
    return x, rng.integers(0, 10, size=shape[0])


def _one_blas_thread() -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A context factory that limits numpy's BLAS to one thread."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is in [data]
        return contextlib.nullcontext
    controller = ThreadpoolController()

    @contextlib.contextmanager
    def limited() -> Iterator[None]:
        with controller.limit(limits=1, user_api="blas"):
            yield

    return limited


def _keras_mlp(batch_norm: bool) -> Any:
    import keras

    layers: list[Any] = [keras.Input((784,))]
    for width in _HIDDEN:
        layers.append(keras.layers.Dense(width, use_bias=not batch_norm))
        if batch_norm:
            layers.append(keras.layers.BatchNormalization(momentum=0.99))
        layers.append(keras.layers.ReLU())
    layers.append(keras.layers.Dense(10))
    return keras.Sequential(layers)


def step_kernels(name: str, seed: int = 0) -> dict[str, Any]:
    """``{implementation: kernel}`` for the step ``name`` (see STEPS).

    Needs ``batchnorm-companion[tf]``.
    """
    if name not in STEPS:
        raise ValueError(
            f"name must be one of {sorted(STEPS)}; received {name!r}"
        )
    from companion import tf_models
    from companion.tf_env import import_tensorflow

    import_tensorflow()
    import keras

    x, y = _batch(name, seed)
    if name == "cnn":
        model = tf_models.build_numpy_model(seed=seed)
        keras_model = tf_models.build_keras_model(seed=seed)
        learning_rate, momentum = 0.01, 0.9
    else:
        batch_norm = "before" if name == "mlp_bn" else "none"
        model = mlp(_HIDDEN, batch_norm=batch_norm, seed=seed)
        keras_model = _keras_mlp(name == "mlp_bn")
        learning_rate, momentum = 0.1, 0.0
    optimizer = SGD(learning_rate=learning_rate, momentum=momentum)
    keras_model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def companion_step() -> None:
        _, dlogits = softmax_cross_entropy(model(x, training=True), y)
        model.backward(dlogits, input_gradient=False)
        optimizer.step(model)

    return {
        "companion": companion_step,
        "companion_1t": (companion_step, _one_blas_thread()),
        "keras": lambda: keras_model.train_on_batch(x, y),
    }
