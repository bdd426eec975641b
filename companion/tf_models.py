r"""The source text's CNN three ways: a TF1 graph, Keras 3 and numpy.

Chapter 6, *The TensorFlow example three ways*, runs one network written as

a. the source text's TensorFlow 1 graph (:func:`build_tf1_graph`:
   ``tf.compat.v1.layers`` and ``tf.compat.v1.train.MomentumOptimizer``);
b. today's Keras 3 (:func:`build_keras_model`);
c. the companion's numpy layers (:func:`build_numpy_model`),

with the same layer order and weight layouts, so that weights copy one to
one (:func:`get_weights`, :func:`set_weights`, :func:`copy_weights`), and so
do the optimizer's momentum slots (:func:`get_slots`, :func:`set_slots`);
:func:`logits`, :func:`correct`, :func:`accuracy`, :func:`train_step` and
:func:`sgd_step` run any of the three.  Chapter 7 trains the Keras
variants.  On 28 x 28 x 1 images::

    conv1 5x5 same -> [conv1_bn] -> ReLU -> pool1 2x2/2        28 -> 14
    conv2 5x5 same -> [conv2_bn] -> ReLU -> pool2 2x2/2        14 -> 7
    conv3 5x5 same, 32 filters -> conv3_bn -> ReLU -> pool3    7 -> 3
    flatten (288) -> dense (ReLU) -> logits (10)

Batch norm (``axis=-1, momentum=0.9, epsilon=0.001``) follows conv3 only
(``bn_after="conv3"``, as in the source text), every conv (``"all"``,
before the ReLU) or none (``"none"``).  Every conv and dense layer has a
bias, as in the source.  SGD with momentum takes the same steps in all
three (chapter 6):

.. math::

    v \leftarrow \mu v - \eta g,\quad w \leftarrow w + v
    \qquad\text{(Keras, numpy)}

is ``MomentumOptimizer``'s :math:`a \leftarrow \mu a + g,\ w \leftarrow w
- \eta a` with :math:`v = -\eta a`.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from companion._validation import check_int, describe
from companion.layers import BatchNorm, keep_moving_statistics
from companion.nn import (
    SGD,
    Conv2D,
    Dense,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    softmax_cross_entropy,
)
from companion.seeding import KERNELS, derive_seed
from companion.tf_env import import_tensorflow
from companion.training import correct_predictions

__all__ = [
    "BN_PLACEMENTS",
    "Step",
    "TF1Graph",
    "accuracy",
    "build_keras_model",
    "build_numpy_model",
    "build_tf1_graph",
    "copy_weights",
    "correct",
    "get_slots",
    "get_weights",
    "layer_names",
    "logits",
    "relu_outputs",
    "set_slots",
    "set_weights",
    "sgd_step",
    "train_step",
    "weight_names",
]

BN_PLACEMENTS = ("conv3", "all", "none")
"""Values of ``bn_after``: after conv3 only (the source text), after every
conv, nowhere."""
INPUT_SHAPE = (28, 28, 1)
KERNEL_SIZE = 5
CONV3_FILTERS = 32
NUM_CLASSES = 10
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3

Conv = tuple[str, int, bool]  # (name, filters, batch norm after it?)


def _architecture(
    conv1_filters: Any,
    conv2_filters: Any,
    dense_units: Any,
    bn_after: Any,
    seed: Any,
) -> tuple[list[Conv], int]:
    """Check the builders' arguments; return the convs and dense_units."""
    if bn_after not in BN_PLACEMENTS:
        raise ValueError(
            f"bn_after must be one of {BN_PLACEMENTS}; "
            f"received {describe(bn_after)}"
        )
    if seed is not None:
        check_int(seed, "seed", low=0)
    filters = (
        check_int(conv1_filters, "conv1_filters", low=1),
        check_int(conv2_filters, "conv2_filters", low=1),
        CONV3_FILTERS,
    )
    with_bn = (bn_after == "all", bn_after == "all", bn_after != "none")
    convs = [
        (f"conv{i + 1}", f, bn)
        for i, (f, bn) in enumerate(zip(filters, with_bn, strict=True))
    ]
    return convs, check_int(dense_units, "dense_units", low=1)


def _layer_seed(seed: int | None, index: int) -> int | None:
    """The initializer seed of conv/dense layer ``index`` (0 to 4).

    ``companion.seeding``'s stream ``(seed, KERNELS, index)``: the same for
    every placement of batch norm, and never shared between two seeds
    (``seed + index`` would give seed 0's layer 1 to seed 1's layer 0).
    """
    return None if seed is None else derive_seed(seed, KERNELS, index)


# ---------------------------------------------------------------- builders
def build_numpy_model(
    *,
    conv1_filters: int = 8,
    conv2_filters: int = 16,
    dense_units: int = 64,
    bn_after: str = "conv3",
    seed: int | None = 0,
) -> Sequential:
    """The network as a built ``companion.nn.Sequential`` (c).

    Parameters
    ----------
    conv1_filters, conv2_filters, dense_units : int >= 1
        Widths of conv1, conv2 and the hidden dense layer.  The defaults
        (8, 16, 64) are small so that the numpy version trains fast on a
        2-core CPU (about 50 ms per step on a batch of 32); conv3 keeps the
        source text's 32 filters, so 3 x 3 x 32 = 288 features reach the
        dense layer.
    bn_after : {"conv3", "all", "none"}
        Where batch norm goes (see the module docstring).
    seed : int >= 0 or None
        The kernel of conv/dense layer ``i`` (0 to 4) is drawn (Glorot
        uniform) with the seed ``derive_seed(seed, KERNELS, i)`` of
        :mod:`companion.seeding`.

    Returns
    -------
    Sequential
        Built for (N, 28, 28, 1) float32 inputs; ReLUs are separate layers,
        so ``model.layers`` matches ``keras_model.layers`` one to one.
    """
    convs, dense_units = _architecture(
        conv1_filters, conv2_filters, dense_units, bn_after, seed
    )
    layers: list[Any] = []
    for i, (_, filters, with_bn) in enumerate(convs):
        layers.append(
            Conv2D(
                filters,
                KERNEL_SIZE,
                padding="same",
                seed=_layer_seed(seed, i),
            )
        )
        if with_bn:
            layers.append(
                BatchNorm(axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
            )
        layers += [ReLU(), MaxPool2D(2, strides=2)]
    layers += [
        Flatten(),
        Dense(dense_units, seed=_layer_seed(seed, 3)),
        ReLU(),
        Dense(NUM_CLASSES, seed=_layer_seed(seed, 4)),
    ]
    model = Sequential(layers)
    model.build((1, *INPUT_SHAPE))
    return model


def build_keras_model(
    *,
    conv1_filters: int = 8,
    conv2_filters: int = 16,
    dense_units: int = 64,
    bn_after: str = "conv3",
    seed: int | None = 0,
) -> Any:
    """The network as a Keras 3 ``keras.Sequential`` (b).

    Arguments as :func:`build_numpy_model` (Keras's Glorot-uniform
    initializer with the same per-layer seeds draws other numbers than
    numpy's).  Uses ``import keras`` (Keras 3), also in a process where
    ``TF_USE_LEGACY_KERAS=1`` made ``tf.keras`` the legacy Keras 2.
    """
    convs, dense_units = _architecture(
        conv1_filters, conv2_filters, dense_units, bn_after, seed
    )
    import_tensorflow()
    import keras

    def glorot(index: int) -> Any:
        return keras.initializers.GlorotUniform(seed=_layer_seed(seed, index))

    layers: list[Any] = [keras.Input(INPUT_SHAPE)]
    for i, (name, filters, with_bn) in enumerate(convs):
        layers.append(
            keras.layers.Conv2D(
                filters,
                KERNEL_SIZE,
                padding="same",
                kernel_initializer=glorot(i),
                name=name,
            )
        )
        if with_bn:
            name = f"{name}_bn"
            layers.append(
                keras.layers.BatchNormalization(
                    axis=-1,
                    momentum=BN_MOMENTUM,
                    epsilon=BN_EPSILON,
                    center=True,
                    scale=True,
                    name=name,
                )
            )
        layers += [
            keras.layers.ReLU(name=f"{name}_relu"),
            keras.layers.MaxPooling2D(2, strides=2, name=f"pool{i + 1}"),
        ]
    layers += [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(
            dense_units, kernel_initializer=glorot(3), name="dense"
        ),
        keras.layers.ReLU(name="dense_relu"),
        keras.layers.Dense(
            NUM_CLASSES, kernel_initializer=glorot(4), name="logits"
        ),
    ]
    return keras.Sequential(layers, name=f"cnn_bn_{bn_after}")


@dataclasses.dataclass
class TF1Graph:
    """The TF1 network of :func:`build_tf1_graph`: graph, session, tensors.

    Attributes
    ----------
    graph, session
        The ``tf.Graph`` and a ``tf.compat.v1.Session`` on it, variables
        initialized.
    x, labels, is_training
        Placeholders: images (N, 28, 28, 1) float32, labels (N,) int64,
        and a bool (default False) that selects batch or moving statistics.
    logits, loss, train_op
        Outputs (N, 10), mean softmax cross-entropy, one momentum-SGD step.
    tensors
        Every layer's output by name: ``"conv1"``, ``"conv3_bn"``, ...
    variables
        The model's variables in Keras's ``get_weights()`` order (no
        optimizer slots).
    trainable, gradients, slots
        The trainable variables (Keras's ``trainable_variables`` order),
        the gradient of ``loss`` for each, and ``MomentumOptimizer``'s
        accumulator :math:`a` for each.
    update_ops
        The moving-average updates in ``GraphKeys.UPDATE_OPS``.
    with_update_ops
        Whether ``train_op`` runs ``update_ops`` (False: the classic bug).
    fused
        The ``fused`` argument of ``batch_normalization`` (None: the fused
        kernel for these NHWC inputs).
    learning_rate, momentum
        Of the ``MomentumOptimizer``.
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
    trainable: list[Any]
    gradients: list[Any]
    slots: list[Any]
    update_ops: list[Any]
    with_update_ops: bool
    fused: bool | None
    learning_rate: float
    momentum: float
    _assign: dict[str, tuple[list[Any], Any]] = dataclasses.field(repr=False)

    def close(self) -> None:
        """Release the session's resources."""
        self.session.close()

    def _run_assign(self, which: str, values: Sequence[Any]) -> None:
        inputs, op = self._assign[which]
        self.session.run(op, dict(zip(inputs, values, strict=True)))


def _assign_group(tf: Any, variables: list[Any]) -> tuple[list[Any], Any]:
    """Placeholders and one op that assigns them to ``variables``."""
    v1 = tf.compat.v1
    inputs = [v1.placeholder(v.dtype.base_dtype, v.shape) for v in variables]
    op = tf.group(
        *[v.assign(p) for v, p in zip(variables, inputs, strict=True)]
    )
    return inputs, op


def build_tf1_graph(
    *,
    conv1_filters: int = 8,
    conv2_filters: int = 16,
    dense_units: int = 64,
    bn_after: str = "conv3",
    seed: int | None = 0,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    with_update_ops: bool = True,
    fused: bool | None = None,
) -> TF1Graph:
    """The source text's TensorFlow 1 graph (a), in its own ``tf.Graph``.

    Built with ``tf.compat.v1.layers`` as in the source text
    (``batch_normalization(..., training=is_training, name='conv3_bn')``;
    chapter 6 runs the source's own lines and checks that they build this
    graph), a mean softmax cross-entropy and
    ``tf.compat.v1.train.MomentumOptimizer``.  Eager mode and Keras 3 keep
    working in the same process.  Network arguments as
    :func:`build_numpy_model`; every layer's kernel initializer is seeded
    (tf_keras's default initializers ignore the graph-level seed, so an
    unseeded graph differs from run to run).

    ``tf.compat.v1.layers`` exists only with legacy Keras: call
    ``companion.tf_env.import_tensorflow(legacy_keras=True)`` as the
    **first** TensorFlow import of the process (first cell of the
    notebook), with the ``tf-keras`` package installed.

    Parameters
    ----------
    learning_rate, momentum : float
        Of the ``MomentumOptimizer`` in ``train_op``.  The source text
        shows no optimizer; 0.05 and 0.9 are this book's choice.
    with_update_ops : bool
        True wraps ``train_op`` in ``tf.control_dependencies(UPDATE_OPS)``,
        so every step also updates the moving statistics.  False is the
        classic bug: they stay at 0 and 1 and inference mode fails.
    fused : bool or None
        Passed to ``batch_normalization``.  None (the source text's call)
        picks the fused kernel for these NHWC inputs, which updates the
        moving variance with the *unbiased* batch variance (factor
        m/(m-1), m = N*H*W, as the paper's inference does); ``False`` uses
        the biased one, as Keras 3 and ``companion.BatchNorm`` do.  Both
        normalize with the biased variance.

    Raises
    ------
    RuntimeError
        TensorFlow was imported without ``TF_USE_LEGACY_KERAS=1``, or
        ``tf-keras`` is missing.  The arguments are checked first
        (``ValueError``/``TypeError``, as :func:`build_numpy_model` and
        ``companion.nn.SGD``).
    """
    convs, dense_units = _architecture(
        conv1_filters, conv2_filters, dense_units, bn_after, seed
    )
    SGD(learning_rate, momentum)  # the numpy optimizer's checks and messages
    if not isinstance(with_update_ops, bool):
        raise TypeError(
            "with_update_ops must be a bool; "
            f"received {describe(with_update_ops)}"
        )
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(
            f"fused must be a bool or None; received {describe(fused)}"
        )
    tf = import_tensorflow(legacy_keras=True)  # RuntimeError if TF came first
    v1 = tf.compat.v1  # logger at ERROR: no deprecation notices
    try:
        v1.layers.conv2d  # noqa: B018 - loads tf_keras's legacy layers
    except (
        AttributeError
    ) as error:  # "`conv2d` is not available with Keras 3."
        raise RuntimeError(
            f"tf.compat.v1.layers is not available ({error}): this process "
            "loaded TensorFlow's Keras as Keras 3 before "
            "TF_USE_LEGACY_KERAS=1 was set, or tf-keras is not installed; "
            "restart and call "
            "companion.tf_env.import_tensorflow(legacy_keras=True) first"
        ) from error
    graph = tf.Graph()
    with graph.as_default(), warnings.catch_warnings():
        # tf_keras's legacy layer functions warn "`tf.layers.conv2d` is
        # deprecated ..." (UserWarning) at each call; this module uses the
        # source text's API on purpose.
        warnings.filterwarnings(
            "ignore",
            message=r"`tf\.layers\.\w+` is deprecated",
            category=UserWarning,
        )

        def glorot(index: int) -> Any:  # tf_keras ignores the graph seed
            layer_seed = _layer_seed(seed, index)
            if layer_seed is None:
                return None
            return v1.glorot_uniform_initializer(seed=layer_seed)

        x = v1.placeholder(tf.float32, [None, *INPUT_SHAPE], name="x")
        labels = v1.placeholder(tf.int64, [None], name="labels")
        is_training = v1.placeholder_with_default(
            False, [], name="is_training"
        )
        tensors: dict[str, Any] = {}
        h = x
        for i, (name, filters, with_bn) in enumerate(convs):
            h = tensors[name] = v1.layers.conv2d(
                inputs=h,
                filters=filters,
                kernel_size=[KERNEL_SIZE, KERNEL_SIZE],
                padding="same",
                activation=None if with_bn else tf.nn.relu,
                kernel_initializer=glorot(i),
                name=name,
            )
            if with_bn:
                h = tensors[f"{name}_bn"] = v1.layers.batch_normalization(
                    inputs=h,
                    axis=-1,
                    momentum=BN_MOMENTUM,
                    epsilon=BN_EPSILON,
                    center=True,
                    scale=True,
                    training=is_training,
                    name=f"{name}_bn",
                    fused=fused,
                )
                h = tensors[f"{name}_bn_relu"] = tf.nn.relu(h)
            else:  # conv2d applied the ReLU: its output is the ReLU's
                tensors[f"{name}_relu"] = h
            h = tensors[f"pool{i + 1}"] = v1.layers.max_pooling2d(
                inputs=h, pool_size=[2, 2], strides=2
            )
        h = tensors["flatten"] = v1.layers.flatten(h)
        h = tensors["dense"] = v1.layers.dense(
            h,
            dense_units,
            activation=tf.nn.relu,
            kernel_initializer=glorot(3),
            name="dense",
        )
        tensors["dense_relu"] = h
        out = tensors["logits"] = v1.layers.dense(
            h, NUM_CLASSES, kernel_initializer=glorot(4), name="logits"
        )
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=labels, logits=out
            )
        )
        variables = v1.global_variables()  # creation order = Keras order
        trainable = v1.trainable_variables()
        update_ops = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        optimizer = v1.train.MomentumOptimizer(learning_rate, momentum)
        # optimizer.minimize(loss), in its two halves, to keep the gradients
        grads_and_vars = optimizer.compute_gradients(loss, trainable)
        if with_update_ops:
            with tf.control_dependencies(update_ops):
                train_op = optimizer.apply_gradients(grads_and_vars)
        else:  # the classic bug: the moving statistics never update
            train_op = optimizer.apply_gradients(grads_and_vars)
        slots = [optimizer.get_slot(v, "momentum") for v in trainable]
        assign = {
            "weights": _assign_group(tf, variables),
            "slots": _assign_group(tf, slots),
        }
        init = v1.global_variables_initializer()
    session = v1.Session(graph=graph)
    session.run(init)
    return TF1Graph(
        graph=graph,
        session=session,
        x=x,
        labels=labels,
        is_training=is_training,
        logits=out,
        loss=loss,
        train_op=train_op,
        tensors=tensors,
        variables=variables,
        trainable=trainable,
        gradients=[g for g, _ in grads_and_vars],
        slots=slots,
        update_ops=update_ops,
        with_update_ops=with_update_ops,
        fused=fused,
        learning_rate=float(learning_rate),
        momentum=float(momentum),
        _assign=assign,
    )


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
        "model must be a TF1Graph, a keras.Model or a "
        "companion.nn.Sequential (from the build_* functions of "
        f"companion.tf_models); received {describe(model)}"
    )


def _images(x: Any) -> np.ndarray:
    array = np.asarray(x)
    if (
        array.ndim != 4
        or array.shape[1:] != INPUT_SHAPE
        or array.dtype.kind not in "fiu"
    ):
        raise ValueError(
            "x must be a numeric batch of shape (N, 28, 28, 1); "
            f"received {describe(array)}"
        )
    return array.astype(np.float32, copy=False)


def _labels(y: Any, n: int) -> np.ndarray:
    array = np.asarray(y)
    if array.dtype.kind not in "iu" or array.shape != (n,):
        raise ValueError(
            f"y must be {n} integer labels, shape ({n},); "
            f"received {describe(array)}"
        )
    return array.astype(np.int64, copy=False)


def _check_training(training: Any) -> bool:
    if not isinstance(training, bool):
        raise TypeError(
            f"training must be a bool; received {describe(training)}"
        )
    return training


def get_weights(model: Any) -> list[np.ndarray]:
    """The model's arrays in Keras's ``get_weights()`` order (a, b, c)."""
    if _kind(model) == "tf1":
        return [np.array(w) for w in model.session.run(model.variables)]
    return [np.array(w) for w in model.get_weights()]


def _check_arrays(
    values: Sequence[Any], shapes: list[tuple[int, ...]], what: str
) -> list[Any]:
    values = list(values)
    if len(values) != len(shapes):
        raise ValueError(
            f"{what} must be a list of {len(shapes)} arrays in Keras order; "
            f"received {len(values)}"
        )
    for i, (value, shape) in enumerate(zip(values, shapes, strict=True)):
        if np.shape(value) != shape:
            raise ValueError(
                f"{what}[{i}] has shape {np.shape(value)}; expected {shape}"
            )
    return values


def set_weights(model: Any, weights: Sequence[Any]) -> None:
    """Assign a list in Keras's order (:func:`get_weights` of any model).

    Raises
    ------
    ValueError
        Wrong number of arrays or a wrong shape; nothing is assigned then.
    """
    if _kind(model) != "tf1":
        model.set_weights(list(weights))  # Keras and Sequential check it
        return
    weights = list(weights)
    if len(weights) != len(model.variables):
        raise ValueError(
            f"weights must be a list of {len(model.variables)} arrays in "
            f"Keras order; received {len(weights)}"
        )
    for variable, value in zip(model.variables, weights, strict=True):
        if np.shape(value) != tuple(variable.shape):
            raise ValueError(
                f"weights for {variable.name} have shape {np.shape(value)}; "
                f"expected {tuple(variable.shape)}"
            )
    model._run_assign("weights", weights)


def copy_weights(source: Any, target: Any) -> None:
    """``set_weights(target, get_weights(source))``: any model into another."""
    set_weights(target, get_weights(source))


def logits(model: Any, x: Any, training: bool = False) -> np.ndarray:
    """The logits (N, 10) for images ``x`` (N, 28, 28, 1); model unchanged.

    ``training=True`` normalizes with the batch's statistics, ``False``
    with the moving statistics.  The moving statistics are left as they
    were: Keras and the numpy layers would update them in a training-mode
    call, and this helper puts them back, also when the call raises
    (``companion.layers.keep_moving_statistics`` for numpy models); the
    TF1 graph only updates them through ``train_op``.
    """
    training = _check_training(training)
    x, kind = _images(x), _kind(model)
    if kind == "tf1":
        return np.asarray(
            model.session.run(
                model.logits, {model.x: x, model.is_training: training}
            )
        )
    if kind == "numpy":
        with keep_moving_statistics(model):
            return np.asarray(model(x, training=training))
    saved = [v.numpy() for v in model.non_trainable_variables]
    try:
        return np.array(model(x, training=training))
    finally:
        for variable, value in zip(
            model.non_trainable_variables, saved, strict=True
        ):
            variable.assign(value)


def layer_names(model: Any) -> list[str]:
    """The Keras names of the model's layers, in order (any of a, b, c).

    ``["conv1", "conv1_relu", "pool1", ..., "dense", "dense_relu",
    "logits"]``, with ``"conv3_bn"`` (and so on) where batch norm is; the
    numpy layers get the names of the Keras layers they match one to one.
    """
    kind = _kind(model)
    if kind == "keras":
        return [layer.name for layer in model.layers]
    if kind == "tf1":
        return list(model.tensors)  # the same names (chapter 6 checks)
    names, previous, convs, dense = [], "", 0, 0
    for layer in model.layers:
        if isinstance(layer, Conv2D):
            convs += 1
            name = f"conv{convs}"
        elif isinstance(layer, BatchNorm):
            name = f"conv{convs}_bn"
        elif isinstance(layer, Dense):
            dense += 1
            name = "dense" if dense == 1 else "logits"
        elif isinstance(layer, ReLU):
            name = f"{previous}_relu"
        elif isinstance(layer, MaxPool2D):
            name = f"pool{convs}"
        else:
            name = "flatten"
        names.append(name)
        previous = name
    return names


def weight_names(model: Any) -> list[str]:
    """``"layer/weight"`` for every array of :func:`get_weights`, in order.

    E.g. ``"conv3/kernel"``, ``"conv3_bn/moving_variance"``: Keras's
    variable paths, the TF1 variable names without ``":0"``.
    """
    kind = _kind(model)
    if kind == "tf1":
        return [v.name.removesuffix(":0") for v in model.variables]
    if kind == "keras":
        return [
            f"{layer.name}/{w.name}"
            for layer in model.layers
            for w in layer.weights
        ]
    return [
        f"{name}/{weight}"
        for name, layer in zip(layer_names(model), model.layers, strict=True)
        for weight in layer.weight_names()
    ]


def relu_outputs(
    model: Any, x: Any, training: bool = True
) -> dict[str, np.ndarray]:
    """Every ReLU's output for images ``x``, by Keras layer name.

    ``"conv1_relu"``, ``"conv2_relu"``, ``"conv3_bn_relu"``,
    ``"dense_relu"`` for the source text's placement (``"conv3_bn_relu"``
    -style names after every batch norm).  Which units are active
    (``> 0``) are the ReLU decisions; chapter 6 compares them between the
    three models.  The moving statistics are left as they were.
    """
    training = _check_training(training)
    x, kind = _images(x), _kind(model)
    if kind == "tf1":
        names = [n for n in model.tensors if n.endswith("_relu")]
        values = model.session.run(
            [model.tensors[n] for n in names],
            {model.x: x, model.is_training: training},
        )
        return dict(zip(names, map(np.asarray, values), strict=True))
    out: dict[str, np.ndarray] = {}
    if kind == "numpy":
        with keep_moving_statistics(model):
            h = x
            for name, layer in zip(
                layer_names(model), model.layers, strict=True
            ):
                h = layer(h, training=training)
                if isinstance(layer, ReLU):
                    out[name] = np.asarray(h)
        return out
    saved = [v.numpy() for v in model.non_trainable_variables]
    try:
        h = x
        for layer in model.layers:
            h = layer(h, training=training)
            if layer.name.endswith("_relu"):
                out[layer.name] = np.array(h)
    finally:
        for variable, value in zip(
            model.non_trainable_variables, saved, strict=True
        ):
            variable.assign(value)
    return out


def correct(
    model: Any,
    x: Any,
    y: Any,
    training: bool = False,
    batch_size: int = 500,
) -> np.ndarray:
    """Per image, whether the model classifies it correctly (bool, (N,)).

    Evaluated in chunks of ``batch_size`` through :func:`logits`, a
    prediction counted by ``companion.training.correct_predictions`` (the
    package's one definition: largest logit = label; NaN logits predict
    class 0).  With ``training=True`` each chunk is normalized with its
    own batch statistics (the "training-mode accuracy" of chapter 6).
    """
    training = _check_training(training)
    x = _images(x)
    y = _labels(y, x.shape[0])
    batch_size = check_int(batch_size, "batch_size", low=1)
    flags = [
        correct_predictions(
            logits(model, x[start : start + batch_size], training),
            y[start : start + batch_size],
        )
        for start in range(0, x.shape[0], batch_size)
    ]
    return np.concatenate(flags) if flags else np.zeros(0, bool)


def accuracy(
    model: Any,
    x: Any,
    y: Any,
    training: bool = False,
    batch_size: int = 500,
) -> float:
    """The fraction of ``x`` classified as ``y``: the mean of :func:`correct`.

    Raises
    ------
    ValueError
        An empty ``x`` (no accuracy to report), or bad shapes.
    """
    flags = correct(model, x, y, training, batch_size)
    if flags.size == 0:
        raise ValueError("x must hold at least one image; received 0")
    return float(flags.mean())


# ------------------------------------------------------------- optimizers
def _numpy_gradients(model: Sequential) -> list[np.ndarray]:
    """Copies of the gradients of ``model.params``, in the same order."""
    grads = model.grads
    return [grads[name].copy() for name in model.params]


def _check_optimizer(kind: str, optimizer: Any) -> None:
    if kind == "tf1":
        if optimizer is not None:
            raise ValueError(
                "optimizer must be None for a TF1Graph: its "
                "MomentumOptimizer is part of the graph "
                "(build_tf1_graph(learning_rate=..., momentum=...)); "
                f"received {describe(optimizer)}"
            )
    elif kind == "numpy":
        if not isinstance(optimizer, SGD):
            raise TypeError(
                "optimizer must be a companion.nn.SGD for a numpy model; "
                f"received {describe(optimizer)}"
            )
    else:
        import keras

        if not isinstance(optimizer, keras.optimizers.SGD):
            raise TypeError(
                "optimizer must be a Keras optimizer (keras.optimizers.SGD) "
                f"for a Keras model; received {describe(optimizer)}"
            )


def _keras_momentums(model: Any, optimizer: Any) -> list[Any]:
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    if not optimizer.momentums:
        raise ValueError(
            "optimizer must have momentum > 0 (it keeps no slots "
            f"otherwise); received {describe(optimizer)}"
        )
    return [
        optimizer.momentums[optimizer._get_variable_index(v)]
        for v in model.trainable_variables
    ]


def get_slots(model: Any, optimizer: Any = None) -> list[np.ndarray]:
    r"""The optimizer's momentum slots, as Keras's velocities :math:`v`.

    One array per trainable array, in Keras's ``trainable_variables``
    order.  For a TF1 graph (``optimizer`` None) the accumulators
    :math:`a` of ``MomentumOptimizer`` are converted to :math:`v = -\eta
    a`; for the numpy model, arrays ``optimizer`` has not stepped yet are
    zeros.
    """
    kind = _kind(model)
    _check_optimizer(kind, optimizer)
    if kind == "tf1":
        slots = model.session.run(model.slots)
        lr = np.float32(model.learning_rate)
        return [(-lr * np.asarray(a)).astype(np.float32) for a in slots]
    if kind == "numpy":
        return list(optimizer.get_slots(model))
    return [np.array(m.numpy()) for m in _keras_momentums(model, optimizer)]


def set_slots(model: Any, optimizer: Any, slots: Sequence[Any]) -> None:
    """Set the momentum slots from Keras-convention velocities.

    ``slots`` as returned by :func:`get_slots` of any of the three models.
    For a TF1 graph pass ``optimizer=None``; the accumulators become
    :math:`a = -v/\\eta`.

    Raises
    ------
    ValueError
        Wrong number of arrays or a wrong shape; nothing is set then.
    """
    kind = _kind(model)
    _check_optimizer(kind, optimizer)
    if kind == "tf1":
        shapes = [tuple(v.shape) for v in model.trainable]
        values = _check_arrays(slots, shapes, "slots")
        lr = np.float32(model.learning_rate)
        model._run_assign(
            "slots",
            [
                (-np.asarray(v, np.float32) / lr).astype(np.float32)
                for v in values
            ],
        )
    elif kind == "numpy":
        optimizer.set_slots(model, slots)  # checks count and shapes first
    else:
        momentums = _keras_momentums(model, optimizer)
        shapes = [tuple(m.shape) for m in momentums]
        values = _check_arrays(slots, shapes, "slots")
        for m, v in zip(momentums, values, strict=True):
            m.assign(np.asarray(v, np.float32))


class Step(NamedTuple):
    """What :func:`sgd_step` returns."""

    loss: float
    """The batch's mean cross-entropy before the step."""
    gradients: list[np.ndarray]
    """The gradient of ``loss`` for every trainable array, in Keras's
    ``trainable_variables`` order."""


def sgd_step(model: Any, x: Any, y: Any, optimizer: Any = None) -> Step:
    """One SGD step on the batch ``(x, y)``: the loss and the gradients.

    * TF1: ``session.run(train_op)`` with ``is_training=True`` (the
      optimizer is in the graph; ``optimizer`` must be None);
    * Keras 3: a compiled ``tf.GradientTape`` step with ``optimizer``, a
      ``keras.optimizers.SGD(lr, momentum=mu)`` (same steps as
      ``MomentumOptimizer``);
    * numpy: ``model(x, training=True)``,
      ``companion.nn.softmax_cross_entropy``, ``model.backward``,
      ``optimizer.step(model)`` with a ``companion.nn.SGD``.

    All three also update the moving statistics (TF1 only
    ``with_update_ops``).
    """
    x, kind = _images(x), _kind(model)
    y = _labels(y, x.shape[0])
    _check_optimizer(kind, optimizer)
    if kind == "tf1":
        feed = {model.x: x, model.labels: y, model.is_training: True}
        _, loss, grads = model.session.run(
            [model.train_op, model.loss, model.gradients], feed
        )
        return Step(float(loss), [np.asarray(g) for g in grads])
    if kind == "numpy":
        loss, dlogits = softmax_cross_entropy(model(x, training=True), y)
        model.backward(dlogits)
        grads = _numpy_gradients(model)
        optimizer.step(model)
        return Step(float(loss), grads)
    loss, grads = _keras_step(model, optimizer)(x, y)
    return Step(float(loss), [np.array(g) for g in grads])


_KERAS_STEPS: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = (
    weakref.WeakKeyDictionary()
)


def _keras_step(model: Any, optimizer: Any) -> Any:
    """The compiled (``tf.function``) step of ``model`` with ``optimizer``.

    Traced once per model and optimizer: a ``tf.GradientTape`` forward
    pass in training mode, the mean cross-entropy, the gradients and
    ``optimizer.apply_gradients``.  Returns (loss, gradients).
    """
    cached = _KERAS_STEPS.get(model)
    if cached is not None and cached[0]() is optimizer:
        return cached[1]
    tf = import_tensorflow()
    import keras

    if not optimizer.built:
        optimizer.build(model.trainable_variables)

    @tf.function(reduce_retracing=True)
    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = keras.ops.mean(
                keras.losses.sparse_categorical_crossentropy(
                    y, out, from_logits=True
                )
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(
            zip(grads, model.trainable_variables, strict=True)
        )
        return loss, grads

    _KERAS_STEPS[model] = (weakref.ref(optimizer), step)
    return step


def train_step(model: Any, x: Any, y: Any, optimizer: Any = None) -> float:
    """One SGD step (:func:`sgd_step`); returns the batch's loss before it."""
    return sgd_step(model, x, y, optimizer).loss
