"""Model builder, training loop and evaluation for the experiments of Parts II-
IV.

Everything is numpy (:mod:`companion.nn`), seeded by the package's one
convention (:mod:`companion.seeding`), and returns plain data (dicts of
lists and floats) that chapters plot and assert on and that
:mod:`companion.experiments` writes to JSON.  :func:`evaluate` is the one
place that decides whether a prediction is correct.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from companion._validation import check_int, describe
from companion.data import batches
from companion.layers import BatchNorm, keep_moving_statistics
from companion.nn import (
    SGD,
    Dense,
    Flatten,
    ReLU,
    Sequential,
    Sigmoid,
    softmax_cross_entropy,
)
from companion.seeding import BATCHES, KERNELS, derive_seed

__all__ = [
    "DIVERGENCE_LOSS",
    "Evaluation",
    "accuracy",
    "correct_predictions",
    "evaluate",
    "mlp",
    "progress",
    "train",
]

ACTIVATIONS: dict[str, Callable[[], Any]] = {"relu": ReLU, "sigmoid": Sigmoid}
PLACEMENTS = ("none", "before", "after")
DIVERGENCE_LOSS = 1e3
"""A training loss above this (or not finite) stops a run as diverged
(cross-entropy at chance level is ln 10 = 2.3)."""


def progress(
    iterable: Iterable[Any], total: int | None = None, desc: str = ""
) -> Iterator[Any]:
    """Wrap a long loop in a tqdm progress bar when a person is watching.

    The bar is off when the environment variable ``COMPANION_NO_PROGRESS``
    is ``1`` (the Makefile and the test suite set it, so stored notebook
    outputs stay identical between runs) or when tqdm is not installed.
    """
    if os.environ.get("COMPANION_NO_PROGRESS") == "1":
        return iter(iterable)
    try:
        from tqdm.std import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with [book]
        return iter(iterable)
    bar = tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
    return iter(bar)


def mlp(
    hidden: Sequence[int],
    *,
    classes: int = 10,
    activation: str = "relu",
    batch_norm: str = "none",
    momentum: float = 0.99,
    seed: int = 0,
) -> Sequential:
    """A fully connected classifier: Flatten, ``hidden`` layers, a linear
    output.

    Parameters
    ----------
    hidden : sequence of int
        Widths of the hidden layers.
    activation : "relu" or "sigmoid"
    batch_norm : "none", "before" or "after"
        Where a :class:`~companion.layers.BatchNorm` goes in each hidden
        layer: ``"before"`` the nonlinearity (Dense -> BN -> f, the
        paper's choice; the Dense then has no bias, which BN would cancel)
        or ``"after"`` it (Dense -> f -> BN).  Chapter 13 compares the two.
    momentum : float
        Momentum of the BatchNorm layers' moving averages.
    seed : int >= 0
        Dense layer ``i`` draws its Glorot-uniform kernel from the stream
        ``(seed, KERNELS, i)`` of :mod:`companion.seeding`, so the kernels
        do not depend on ``batch_norm`` or ``activation``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}; "
            f"received {describe(activation)}"
        )
    if batch_norm not in PLACEMENTS:
        raise ValueError(
            f"batch_norm must be one of {list(PLACEMENTS)}; "
            f"received {describe(batch_norm)}"
        )
    widths = [check_int(width, "hidden width", low=1) for width in hidden]
    classes = check_int(classes, "classes", low=1)
    layers: list[Any] = [Flatten()]
    for index, width in enumerate(widths):
        layers.append(
            Dense(
                width,
                use_bias=batch_norm != "before",
                seed=derive_seed(seed, KERNELS, index),
            )
        )
        if batch_norm == "before":
            layers.append(BatchNorm(momentum=momentum))
        layers.append(ACTIVATIONS[activation]())
        if batch_norm == "after":
            layers.append(BatchNorm(momentum=momentum))
    output_seed = derive_seed(seed, KERNELS, len(widths))
    layers.append(Dense(classes, seed=output_seed))
    return Sequential(layers)


def correct_predictions(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per example, whether the largest logit is the label's (a bool array).

    The one definition of a correct prediction in the package.  A row of
    NaN logits (a diverged network) predicts class 0, as ``argmax`` does.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            "logits must have shape (N, classes) and labels shape (N,); "
            f"received {logits.shape} and {labels.shape}"
        )
    return np.asarray(logits.argmax(axis=1) == labels)


class Evaluation(NamedTuple):
    """What :func:`evaluate` measures on a data set."""

    loss: float
    """Mean softmax cross-entropy (nats)."""
    accuracy: float
    """Fraction of correct predictions."""
    correct: np.ndarray
    """Per example, whether it was classified correctly (bool)."""


def evaluate(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    training: bool = False,
    chunk: int = 1000,
) -> Evaluation:
    """Loss, accuracy and per-example correctness of ``model`` on ``(x, y)``.

    Inference mode by default.  With ``training=True`` every chunk of
    ``chunk`` examples is normalized with its own batch statistics, and
    the moving statistics are left as they were
    (:func:`~companion.layers.keep_moving_statistics`).
    """
    chunk = check_int(chunk, "chunk", low=1)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(
            "x and y must be non-empty with the same length; received "
            f"{len(x)} and {len(y)}"
        )
    total, flags = 0.0, []
    with keep_moving_statistics(model), np.errstate(all="ignore"):
        for start in range(0, len(x), chunk):
            yb = y[start : start + chunk]
            logits = model(x[start : start + chunk], training=training)
            loss, _ = softmax_cross_entropy(logits, yb)
            total += loss * len(yb)
            flags.append(correct_predictions(logits, yb))
    correct = np.concatenate(flags)
    return Evaluation(total / len(x), float(correct.mean()), correct)


def accuracy(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    training: bool = False,
    chunk: int = 1000,
) -> float:
    """Fraction of ``x`` classified as ``y``: :func:`evaluate`'s accuracy."""
    return evaluate(model, x, y, training=training, chunk=chunk).accuracy


def train(
    model: Sequential,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    steps: int,
    batch_size: int = 60,
    learning_rate: float = 0.1,
    momentum: float = 0.0,
    seed: int = 0,
    eval_every: int = 100,
    on_step: Callable[[int, Sequential], None] | None = None,
    desc: str = "",
) -> dict[str, Any]:
    """Train ``model`` with SGD on shuffled mini-batches; evaluate as it goes.

    The mini-batches come from the stream ``(seed, BATCHES)`` of
    :mod:`companion.seeding`.  Training stops early, with
    ``diverged=True``, when the loss becomes non-finite or exceeds
    :data:`DIVERGENCE_LOSS`.

    Parameters
    ----------
    on_step : callable(step, model), optional
        Called after every update (step counts from 1), e.g. to record
        activations or gradient norms.

    Returns
    -------
    dict
        ``steps`` (evaluation points, starting at 0), ``test_accuracy``
        and ``train_loss`` (the mean loss of the mini-batches since the
        previous evaluation; NaN at step 0) at those points, ``losses``
        (every mini-batch's loss), ``diverged``, ``final_test_accuracy``
        (NaN if diverged) and ``final_test_correct`` (per test image,
        whether the final model classifies it correctly; None if
        diverged).
    """
    steps = check_int(steps, "steps", low=1)
    eval_every = check_int(eval_every, "eval_every", low=1)
    optimizer = SGD(learning_rate=learning_rate, momentum=momentum)
    first = evaluate(model, x_test, y_test)
    history: dict[str, Any] = {
        "steps": [0],
        "test_accuracy": [first.accuracy],
        "train_loss": [math.nan],
        "losses": [],
    }
    stream = batches(
        x_train,
        y_train,
        batch_size,
        seed=derive_seed(seed, BATCHES),
        epochs=None,
        drop_last=True,
    )
    diverged = False
    last = first
    for step in progress(range(1, steps + 1), total=steps, desc=desc):
        xb, yb = next(stream)
        with np.errstate(over="ignore", invalid="ignore"):
            loss, dlogits = softmax_cross_entropy(model(xb, training=True), yb)
            if not math.isfinite(loss) or loss > DIVERGENCE_LOSS:
                diverged = True
                break
            model.backward(dlogits, input_gradient=False)
            optimizer.step(model)
        history["losses"].append(loss)
        if on_step is not None:
            on_step(step, model)
        if step % eval_every == 0 or step == steps:
            last = evaluate(model, x_test, y_test)
            history["steps"].append(step)
            history["test_accuracy"].append(last.accuracy)
            recent = history["losses"][-(step - history["steps"][-2]) :]
            history["train_loss"].append(float(np.mean(recent)))
    history["diverged"] = diverged
    history["final_test_accuracy"] = math.nan if diverged else last.accuracy
    history["final_test_correct"] = None if diverged else last.correct
    return history
