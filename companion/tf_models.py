r"""The source text's CNN three ways: a TF1 graph, a Keras 3 model, a numpy model.

Chapter 6, *The TensorFlow example three ways*, runs one network written as

a. the source text's TensorFlow 1 graph (:func:`build_tf1_graph`:
   ``tf.compat.v1.layers`` and ``tf.compat.v1.train.MomentumOptimizer``);
b. today's Keras 3 (:func:`build_keras_model`);
c. the companion's numpy layers (:func:`build_numpy_model`),

with the same layer order and weight layouts, so that weights copy one to one
(:func:`get_weights`, :func:`set_weights`, :func:`copy_weights`) and
:func:`logits`, :func:`train_step` and :func:`accuracy` run any of the three.
Chapter 7 trains the ``bn_after`` variants.  On 28 x 28 x 1 images::

    conv1 5x5 same -> [conv1_bn] -> ReLU -> pool1 2x2/2        28 -> 14
    conv2 5x5 same -> [conv2_bn] -> ReLU -> pool2 2x2/2        14 -> 7
    conv3 5x5 same, 32 filters -> conv3_bn -> ReLU -> pool3    7 -> 3 (valid)
    flatten (288) -> dense (ReLU) -> logits (10)

Batch norm (``axis=-1, momentum=0.9, epsilon=0.001``) follows conv3 only
(``bn_after="conv3"``, as in the source text), every conv (``"all"``, before
the ReLU) or none (``"none"``).  Every conv and dense layer has a bias, as in
the source.  SGD with momentum takes the same steps in all three:
``v = mu v - lr g; w += v`` (Keras, numpy) is ``a = mu a + g; w -= lr a``
(``MomentumOptimizer``) with ``v = -lr a``.
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
import warnings
from typing import Any, Sequence

import numpy as np

from companion._validation import describe
from companion.layers import BatchNorm
from companion.nn import SGD, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
from companion.nn import softmax_cross_entropy
from companion.nn.init import positive_int
from companion.tf_env import import_tensorflow

__all__ = [
    "BN_PLACEMENTS", "TF1Graph", "accuracy", "build_keras_model", "build_numpy_model", "build_tf1_graph",
    "copy_weights", "get_weights", "logits", "set_weights", "train_step",
]

BN_PLACEMENTS = ("conv3", "all", "none")
"""Values of ``bn_after``: after conv3 only (the source text), after every conv, nowhere."""
INPUT_SHAPE = (28, 28, 1)
KERNEL_SIZE = 5
CONV3_FILTERS = 32
NUM_CLASSES = 10
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3


def _architecture(
    conv1_filters: Any, conv2_filters: Any, dense_units: Any, bn_after: Any, seed: Any
) -> tuple[list[tuple[str, int, bool]], int]:
    """Check the builders' arguments; return [(conv name, filters, batch norm after?)], dense_units."""
    if bn_after not in BN_PLACEMENTS:
        raise ValueError(f"bn_after must be one of {BN_PLACEMENTS}; received {describe(bn_after)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise TypeError(f"seed must be an int >= 0 or None; received {describe(seed)}")
    filters = (positive_int(conv1_filters, "conv1_filters"), positive_int(conv2_filters, "conv2_filters"),
               CONV3_FILTERS)
    with_bn = (bn_after == "all", bn_after == "all", bn_after != "none")
    convs = [(f"conv{i + 1}", f, bn) for i, (f, bn) in enumerate(zip(filters, with_bn))]
    return convs, positive_int(dense_units, "dense_units")


def _layer_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else seed + index


# ---------------------------------------------------------------- builders
def build_numpy_model(
    *, conv1_filters: int = 8, conv2_filters: int = 16, dense_units: int = 64,
    bn_after: str = "conv3", seed: int | None = 0,
) -> Sequential:
    """The network as a built ``companion.nn.Sequential`` (c).

    Parameters
    ----------
    conv1_filters, conv2_filters, dense_units : int >= 1
        Widths of conv1, conv2 and the hidden dense layer.  The defaults (8,
        16, 64) are small so that the numpy version trains fast on a 2-core
        CPU (about 50 ms per step on a batch of 32); conv3 keeps the source
        text's 32 filters, so the 3 x 3 x 32 = 288 features reach the dense layer.
    bn_after : {"conv3", "all", "none"}
        Where batch norm goes (see the module docstring).
    seed : int >= 0 or None
        Layer ``i``'s kernel is drawn with seed ``seed + i`` (Glorot uniform).

    Returns
    -------
    Sequential
        Built for (N, 28, 28, 1) float32 inputs; ReLUs are separate layers, so
        ``model.layers`` matches ``keras_model.layers`` one to one.
    """
    convs, dense_units = _architecture(conv1_filters, conv2_filters, dense_units, bn_after, seed)
    layers: list = []
    for i, (_, filters, with_bn) in enumerate(convs):
        layers.append(Conv2D(filters, KERNEL_SIZE, padding="same", seed=_layer_seed(seed, i)))
        if with_bn:
            layers.append(BatchNorm(axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON))
        layers += [ReLU(), MaxPool2D(2, strides=2)]
    layers += [Flatten(), Dense(dense_units, seed=_layer_seed(seed, 3)), ReLU(),
               Dense(NUM_CLASSES, seed=_layer_seed(seed, 4))]
    model = Sequential(layers)
    model.build((None, *INPUT_SHAPE))
    return model


def build_keras_model(
    *, conv1_filters: int = 8, conv2_filters: int = 16, dense_units: int = 64,
    bn_after: str = "conv3", seed: int | None = 0,
) -> Any:
    """The network as a Keras 3 ``keras.Sequential`` (b); arguments as :func:`build_numpy_model`.

    Uses ``import keras`` (Keras 3), also in a process where
    ``TF_USE_LEGACY_KERAS=1`` made ``tf.keras`` the legacy Keras 2.
    """
    convs, dense_units = _architecture(conv1_filters, conv2_filters, dense_units, bn_after, seed)
    import_tensorflow()
    import keras

    def glorot(index: int) -> Any:
        return keras.initializers.GlorotUniform(seed=_layer_seed(seed, index))

    layers: list = [keras.Input(INPUT_SHAPE)]
    for i, (name, filters, with_bn) in enumerate(convs):
        layers.append(keras.layers.Conv2D(filters, KERNEL_SIZE, padding="same", kernel_initializer=glorot(i),
                                          name=name))
        if with_bn:
            name = f"{name}_bn"
            layers.append(keras.layers.BatchNormalization(
                axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, center=True, scale=True, name=name))
        layers += [keras.layers.ReLU(name=f"{name}_relu"),
                   keras.layers.MaxPooling2D(2, strides=2, name=f"pool{i + 1}")]
    layers += [keras.layers.Flatten(name="flatten"),
               keras.layers.Dense(dense_units, kernel_initializer=glorot(3), name="dense"),
               keras.layers.ReLU(name="dense_relu"),
               keras.layers.Dense(NUM_CLASSES, kernel_initializer=glorot(4), name="logits")]
    return keras.Sequential(layers, name=f"cnn_bn_{bn_after}")


@dataclasses.dataclass
class TF1Graph:
    """The TF1 network of :func:`build_tf1_graph`: graph, session, tensors and variables.

    Attributes
    ----------
    graph, session
        The ``tf.Graph`` and a ``tf.compat.v1.Session`` on it, variables initialized.
    x, labels, is_training
        Placeholders: images (N, 28, 28, 1) float32, labels (N,) int64, and a
        bool (default False) that selects batch or moving statistics.
    logits, loss, train_op
        Outputs (N, 10), mean softmax cross-entropy, one momentum-SGD step.
    tensors
        Every layer's output by name: ``"conv1"``, ``"conv3_bn"``, ``"pool3"``, ...
    variables
        The model's variables in Keras's ``get_weights()`` order (no optimizer slots).
    update_ops
        The moving-average updates in ``GraphKeys.UPDATE_OPS``.
    with_update_ops
        Whether ``train_op`` runs ``update_ops`` (False: the classic bug).
    """

    graph: Any
    session: Any
    x: Any
    labels: Any
    is_training: Any
    logits: Any
    loss: Any
    train_op: Any
    tensors: dict[str, Any]
    variables: list[Any]
    update_ops: list[Any]
    with_update_ops: bool
    _assign_inputs: list[Any] = dataclasses.field(repr=False)
    _assign_op: Any = dataclasses.field(repr=False)

    def close(self) -> None:
        """Release the session's resources."""
        self.session.close()


def build_tf1_graph(
    *, conv1_filters: int = 8, conv2_filters: int = 16, dense_units: int = 64,
    bn_after: str = "conv3", seed: int | None = 0,
    learning_rate: float = 0.05, momentum: float = 0.9, with_update_ops: bool = True,
    fused: bool | None = None,
) -> TF1Graph:
    """The source text's TensorFlow 1 graph (a), in its own ``tf.Graph``.

    Built with ``tf.compat.v1.layers`` exactly as in the source text
    (``batch_normalization(..., training=is_training, name='conv3_bn')``), a
    mean softmax cross-entropy and ``tf.compat.v1.train.MomentumOptimizer``.
    Eager mode and Keras 3 keep working in the same process.  Network
    arguments as :func:`build_numpy_model`; layer ``i``'s kernel initializer
    gets seed ``seed + i`` (tf_keras's default initializers ignore the
    graph-level seed, so an unseeded graph differs from run to run).

    ``tf.compat.v1.layers`` exists only with legacy Keras: call
    ``companion.tf_env.import_tensorflow(legacy_keras=True)`` as the **first**
    TensorFlow import of the process (first cell of the notebook), with the
    ``tf-keras`` package installed.

    Parameters
    ----------
    learning_rate, momentum : float
        Of the ``MomentumOptimizer`` in ``train_op``.
    with_update_ops : bool
        True wraps ``train_op`` in ``tf.control_dependencies(UPDATE_OPS)``, so
        every step also updates the moving statistics.  False is the classic
        bug: they stay at 0 and 1 and inference mode fails.
    fused : bool or None
        Passed to ``batch_normalization``.  None (the source text's call)
        picks the fused kernel for these NHWC inputs, which updates the
        moving variance with the *unbiased* batch variance (factor m/(m-1),
        m = N*H*W, as the paper's inference does); ``False`` uses the biased
        one, as Keras 3 and ``companion.BatchNorm`` do.  Both normalize with
        the biased variance.

    Raises
    ------
    RuntimeError
        TensorFlow was imported without ``TF_USE_LEGACY_KERAS=1``, or
        ``tf-keras`` is missing.  The arguments are checked first
        (``ValueError``/``TypeError``, as :func:`build_numpy_model` and
        ``companion.nn.SGD``).
    """
    convs, dense_units = _architecture(conv1_filters, conv2_filters, dense_units, bn_after, seed)
    SGD(learning_rate, momentum)  # the same checks and messages as the numpy optimizer
    if not isinstance(with_update_ops, bool):
        raise TypeError(f"with_update_ops must be a bool; received {describe(with_update_ops)}")
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool or None; received {describe(fused)}")
    tf = import_tensorflow(legacy_keras=True)  # RuntimeError if TF came first without it
    v1 = tf.compat.v1  # its logger is at ERROR: no deprecation notices (checked at INFO: none either)
    try:
        v1.layers.conv2d  # noqa: B018 - loads tf_keras's legacy layers
    except AttributeError as error:  # "`conv2d` is not available with Keras 3."
        raise RuntimeError(
            f"tf.compat.v1.layers is not available ({error}): this process loaded TensorFlow's Keras "
            "as Keras 3 before TF_USE_LEGACY_KERAS=1 was set, or tf-keras is not installed; restart "
            "and call companion.tf_env.import_tensorflow(legacy_keras=True) first"
        ) from error
    graph = tf.Graph()
    with graph.as_default(), warnings.catch_warnings():
        # tf_keras's legacy layer functions warn "`tf.layers.conv2d` is deprecated ..."
        # (UserWarning) at each call; this module uses the source text's API on purpose.
        warnings.filterwarnings("ignore", message=r"`tf\.layers\.\w+` is deprecated", category=UserWarning)

        def glorot(index: int) -> Any:  # tf_keras ignores the graph seed: seed each layer
            return None if seed is None else v1.glorot_uniform_initializer(seed=seed + index)

        x = v1.placeholder(tf.float32, [None, *INPUT_SHAPE], name="x")
        labels = v1.placeholder(tf.int64, [None], name="labels")
        is_training = v1.placeholder_with_default(False, [], name="is_training")
        tensors: dict[str, Any] = {}
        h = x
        for i, (name, filters, with_bn) in enumerate(convs):
            h = tensors[name] = v1.layers.conv2d(
                inputs=h, filters=filters, kernel_size=[KERNEL_SIZE, KERNEL_SIZE], padding="same",
                activation=None if with_bn else tf.nn.relu, kernel_initializer=glorot(i), name=name)
            if with_bn:
                h = tensors[f"{name}_bn"] = v1.layers.batch_normalization(
                    inputs=h, axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, center=True,
                    scale=True, training=is_training, name=f"{name}_bn", fused=fused)
                h = tensors[f"{name}_bn_relu"] = tf.nn.relu(h)
            h = tensors[f"pool{i + 1}"] = v1.layers.max_pooling2d(inputs=h, pool_size=[2, 2], strides=2)
        h = tensors["flatten"] = v1.layers.flatten(h)
        h = tensors["dense"] = v1.layers.dense(h, dense_units, activation=tf.nn.relu,
                                               kernel_initializer=glorot(3), name="dense")
        out = tensors["logits"] = v1.layers.dense(h, NUM_CLASSES, kernel_initializer=glorot(4), name="logits")
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=out))
        variables = v1.global_variables()  # creation order = Keras order; optimizer slots come later
        update_ops = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        optimizer = v1.train.MomentumOptimizer(learning_rate, momentum)
        if with_update_ops:
            with tf.control_dependencies(update_ops):
                train_op = optimizer.minimize(loss)
        else:
            train_op = optimizer.minimize(loss)  # the classic bug: moving statistics never update
        inputs = [v1.placeholder(v.dtype.base_dtype, v.shape) for v in variables]
        assign_op = tf.group(*[v.assign(value) for v, value in zip(variables, inputs)])
        init = v1.global_variables_initializer()
    session = v1.Session(graph=graph)
    session.run(init)
    return TF1Graph(graph, session, x, labels, is_training, out, loss, train_op, tensors, variables,
                    update_ops, with_update_ops, inputs, assign_op)


# ------------------------------------------------ one API for the three models
def _kind(model: Any) -> str:
    if isinstance(model, TF1Graph):
        return "tf1"
    if isinstance(model, Sequential):
        return "numpy"
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.Model):
        return "keras"
    raise TypeError(
        "model must be a TF1Graph, a keras.Model or a companion.nn.Sequential (from the build_* "
        f"functions of companion.tf_models); received {describe(model)}"
    )


def _images(x: Any) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim != 4 or array.shape[1:] != INPUT_SHAPE or array.dtype.kind not in "fiu":
        raise ValueError(
            f"x must be a numeric batch of shape (N, 28, 28, 1); received {describe(array)}")
    return array.astype(np.float32, copy=False)


def _labels(y: Any, n: int) -> np.ndarray:
    array = np.asarray(y)
    if array.dtype.kind not in "iu" or array.shape != (n,):
        raise ValueError(f"y must be {n} integer labels, shape ({n},); received {describe(array)}")
    return array.astype(np.int64, copy=False)


def get_weights(model: Any) -> list[np.ndarray]:
    """The model's arrays in Keras's ``get_weights()`` order (the same list for a, b and c)."""
    if _kind(model) == "tf1":
        return [np.array(w) for w in model.session.run(model.variables)]
    return [np.array(w) for w in model.get_weights()]


def set_weights(model: Any, weights: Sequence[Any]) -> None:
    """Assign a list in Keras's order (from :func:`get_weights` of any of the three models).

    Raises
    ------
    ValueError
        Wrong number of arrays or a wrong shape; nothing is assigned then.
    """
    if _kind(model) != "tf1":
        model.set_weights(list(weights))  # Keras and Sequential check the list themselves
        return
    weights = list(weights)
    if len(weights) != len(model.variables):
        raise ValueError(f"weights must be a list of {len(model.variables)} arrays in Keras order; "
                         f"received {len(weights)}")
    for variable, value in zip(model.variables, weights):
        if np.shape(value) != tuple(variable.shape):
            raise ValueError(f"weights for {variable.name} have shape {np.shape(value)}; "
                             f"expected {tuple(variable.shape)}")
    model.session.run(model._assign_op, dict(zip(model._assign_inputs, weights)))


def copy_weights(source: Any, target: Any) -> None:
    """``set_weights(target, get_weights(source))``: any of a, b, c into any other."""
    set_weights(target, get_weights(source))


def logits(model: Any, x: Any, training: bool = False) -> np.ndarray:
    """The model's logits (N, 10) for images ``x`` (N, 28, 28, 1), without changing the model.

    ``training=True`` normalizes with the batch's statistics, ``False`` with the
    moving statistics.  The moving statistics are left as they were (Keras and
    the numpy layers would update them in a training-mode call; this helper
    restores them, and the TF1 graph only updates them through ``train_op``).
    """
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool; received {describe(training)}")
    x, kind = _images(x), _kind(model)
    if kind == "tf1":
        return model.session.run(model.logits, {model.x: x, model.is_training: training})
    if kind == "numpy":
        norms = [layer for layer in model if isinstance(layer, BatchNorm)]
        saved = [(layer.moving_mean.copy(), layer.moving_variance.copy()) for layer in norms]
        out = model(x, training=training)
        for layer, (mean, var) in zip(norms, saved):
            layer.moving_mean[...], layer.moving_variance[...] = mean, var
        return out
    saved = [v.numpy() for v in model.non_trainable_variables]
    out = np.array(model(x, training=training))
    for variable, value in zip(model.non_trainable_variables, saved):
        variable.assign(value)
    return out


def accuracy(model: Any, x: Any, y: Any, training: bool = False, batch_size: int = 500) -> float:
    """Fraction of ``argmax(logits) == y``, evaluated in chunks of ``batch_size``.

    With ``training=True`` each chunk is normalized with its own batch
    statistics (the "training-mode accuracy" of chapters 6 and 7).
    """
    x = _images(x)
    y = _labels(y, x.shape[0])
    batch_size = positive_int(batch_size, "batch_size")
    hits = 0
    for start in range(0, x.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        hits += int((logits(model, x[chunk], training).argmax(axis=1) == y[chunk]).sum())
    return hits / max(x.shape[0], 1)


def train_step(model: Any, x: Any, y: Any, optimizer: Any = None) -> float:
    """One SGD step on the batch ``(x, y)``; returns the batch's loss before the step.

    * TF1: ``session.run(train_op)`` with ``is_training=True`` (the optimizer
      is in the graph; ``optimizer`` must be None);
    * Keras 3: a ``tf.GradientTape`` step with ``optimizer``, e.g.
      ``keras.optimizers.SGD(lr, momentum=mu)`` (same steps as ``MomentumOptimizer``);
    * numpy: ``model(x, training=True)``, ``companion.nn.softmax_cross_entropy``,
      ``model.backward``, ``optimizer.step(model)`` with a ``companion.nn.SGD``.

    All three also update the moving statistics (TF1 only ``with_update_ops``).
    """
    x, kind = _images(x), _kind(model)
    y = _labels(y, x.shape[0])
    if kind == "tf1":
        if optimizer is not None:
            raise ValueError(
                "optimizer must be None for a TF1Graph: its MomentumOptimizer is part of the graph "
                f"(build_tf1_graph(learning_rate=..., momentum=...)); received {describe(optimizer)}")
        feed = {model.x: x, model.labels: y, model.is_training: True}
        return float(model.session.run([model.train_op, model.loss], feed)[1])
    if kind == "numpy":
        if not isinstance(optimizer, SGD):
            raise TypeError(
                f"optimizer must be a companion.nn.SGD for a numpy model; received {describe(optimizer)}")
        loss, dlogits = softmax_cross_entropy(model(x, training=True), y)
        model.backward(dlogits)
        optimizer.step(model)
        return loss
    import keras

    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            f"optimizer must be a Keras optimizer (keras.optimizers.SGD) for a Keras model; "
            f"received {describe(optimizer)}")
    tf = import_tensorflow()
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return float(loss)
