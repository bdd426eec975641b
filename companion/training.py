"""Training loop, evaluation and model builders for the experiments of Parts II and III.

Everything is numpy (:mod:`companion.nn`), seeded, and returns plain data
(dicts of lists and floats) that chapters plot and assert on and that
:mod:`companion.experiments` writes to JSON.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from companion._validation import describe
from companion.data import batches
from companion.layers import BatchNorm
from companion.nn import SGD, Dense, Flatten, ReLU, Sequential, Sigmoid, softmax_cross_entropy
from companion.nn.init import positive_int

__all__ = ["accuracy", "mlp", "progress", "train"]

ACTIVATIONS: dict[str, Callable[[], Any]] = {"relu": ReLU, "sigmoid": Sigmoid}
PLACEMENTS = ("none", "before", "after")


def progress(iterable: Iterable, total: int | None = None, desc: str = "") -> Iterator:
    """Wrap a long loop in a tqdm progress bar when a person is watching.

    The bar is off when the environment variable ``COMPANION_NO_PROGRESS`` is
    ``1`` (the Makefile and the test suite set it, so stored notebook outputs
    stay identical between runs) or when tqdm is not installed.
    """
    if os.environ.get("COMPANION_NO_PROGRESS") == "1":
        return iter(iterable)
    try:
        from tqdm.std import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the [book] extra
        return iter(iterable)
    return iter(tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False))


def mlp(
    hidden: Sequence[int],
    *,
    classes: int = 10,
    activation: str = "relu",
    batch_norm: str = "none",
    momentum: float = 0.99,
    seed: int = 0,
) -> Sequential:
    """A fully connected classifier: Flatten, ``hidden`` layers, then a ``classes``-way linear output.

    Parameters
    ----------
    hidden : sequence of int
        Widths of the hidden layers.
    activation : "relu" or "sigmoid"
    batch_norm : "none", "before" or "after"
        Where a :class:`~companion.layers.BatchNorm` goes in each hidden
        layer: ``"before"`` the nonlinearity (Dense -> BN -> f, the paper's
        choice; the Dense then has no bias, which BN would cancel) or
        ``"after"`` it (Dense -> f -> BN).  Chapter 13 compares the two.
    momentum : float
        Momentum of the BatchNorm layers' moving averages.
    seed : int
        Seeds the Glorot-uniform initialization (layer i uses ``seed * 1000 + i``).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; received {describe(activation)}")
    if batch_norm not in PLACEMENTS:
        raise ValueError(f"batch_norm must be one of {list(PLACEMENTS)}; received {describe(batch_norm)}")
    widths = [positive_int(width, "hidden width") for width in hidden]
    layers: list[Any] = [Flatten()]
    for index, width in enumerate(widths):
        layers.append(Dense(width, use_bias=batch_norm != "before", seed=seed * 1000 + index))
        if batch_norm == "before":
            layers.append(BatchNorm(momentum=momentum))
        layers.append(ACTIVATIONS[activation]())
        if batch_norm == "after":
            layers.append(BatchNorm(momentum=momentum))
    layers.append(Dense(positive_int(classes, "classes"), seed=seed * 1000 + len(widths)))
    return Sequential(layers)


def accuracy(model: Sequential, x: np.ndarray, y: np.ndarray, *, training: bool = False, chunk: int = 1000) -> float:
    """Fraction of ``x`` classified as ``y`` (inference mode unless ``training=True``).

    With ``training=True`` every chunk is normalized with its own batch
    statistics, and the moving statistics are left as they were.
    """
    correct = 0
    saved = _moving_statistics(model) if training else None
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk], training=training)
        correct += int(np.sum(logits.argmax(axis=1) == y[start : start + chunk]))
    if saved is not None:
        _restore_moving_statistics(model, saved)
    return correct / len(x)


def _moving_statistics(model: Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(l.moving_mean.copy(), l.moving_variance.copy()) for l in model if isinstance(l, BatchNorm) and l.built]


def _restore_moving_statistics(model: Sequential, saved: list[tuple[np.ndarray, np.ndarray]]) -> None:
    layers = [l for l in model if isinstance(l, BatchNorm) and l.built]
    for layer, (mean, variance) in zip(layers, saved):
        layer.moving_mean[...] = mean
        layer.moving_variance[...] = variance


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
    """Train ``model`` with SGD on shuffled mini-batches; evaluate every ``eval_every`` steps.

    Training stops early, with ``diverged=True``, when the loss becomes
    non-finite or exceeds 1e3 (cross-entropy at chance level is ln 10 = 2.3).

    Parameters
    ----------
    on_step : callable(step, model), optional
        Called after every update (step counts from 1), e.g. to record
        activations or gradient norms.

    Returns
    -------
    dict
        ``steps`` (evaluation points, starting at 0), ``test_accuracy`` and
        ``train_loss`` (the mean loss of the mini-batches since the previous
        evaluation; NaN at step 0) at those points, ``losses`` (every
        mini-batch's loss), ``diverged`` and ``final_test_accuracy``.
    """
    steps = positive_int(steps, "steps")
    eval_every = positive_int(eval_every, "eval_every")
    optimizer = SGD(learning_rate=learning_rate, momentum=momentum)
    history: dict[str, Any] = {"steps": [0], "test_accuracy": [accuracy(model, x_test, y_test)], "train_loss": [math.nan], "losses": []}
    stream = batches(x_train, y_train, batch_size, seed=seed, epochs=None, drop_last=True)
    diverged = False
    for step in progress(range(1, steps + 1), total=steps, desc=desc):
        xb, yb = next(stream)
        with np.errstate(over="ignore", invalid="ignore"):
            loss, dlogits = softmax_cross_entropy(model(xb, training=True), yb)
            if not math.isfinite(loss) or loss > 1e3:
                diverged = True
                break
            model.backward(dlogits)
            optimizer.step(model)
        history["losses"].append(loss)
        if on_step is not None:
            on_step(step, model)
        if step % eval_every == 0 or step == steps:
            history["steps"].append(step)
            history["test_accuracy"].append(accuracy(model, x_test, y_test))
            recent = history["losses"][-(step - history["steps"][-2]) :]
            history["train_loss"].append(float(np.mean(recent)))
    history["diverged"] = diverged
    history["final_test_accuracy"] = history["test_accuracy"][-1] if not diverged else math.nan
    return history
