r"""Claim (4): batch normalization regularizes, through the noise of its batch statistics.

Ioffe & Szegedy (2015) write that batch norm "also acts as a regularizer, in
some cases eliminating the need for Dropout" (abstract): with it "the
training network no longer producing deterministic values for a given
training example", an effect they found "advantageous to the generalization
of the network" (section 3.4).  Chapter 11, "A regularizer?", runs this
module.

Set-up: a ReLU MLP (784-256-256-10 at full scale) that can fit the 4,000
MNIST training digits perfectly is trained with plain SGD for a fixed number
of epochs, from the same Glorot kernels and on the same mini-batches for a
given seed, in eight runs:

* ``none``, ``bn``, ``dropout``, ``bn_dropout`` at the paper's batch size 60
  (learning rate 0.1): with or without batch norm (``"before"`` the ReLU) and
  with or without inverted dropout after every hidden ReLU (:class:`Dropout`,
  written here because the package has none);
* ``none_small``, ``bn_small``, ``none_large``, ``bn_large``: the same
  without/with batch norm at a 4x smaller and a 4x larger batch, with the
  learning rate scaled in proportion to the batch size (the linear scaling
  rule) and the same number of epochs, so that SGD's own noise scale
  :math:`\eta/B` and the distance travelled (:math:`\eta \times` steps) are
  the same and the size of the batch statistics' noise is what changes.

Every ``eval_every_epochs`` the full training and test sets are evaluated in
inference mode (moving statistics, dropout off): cross-entropy and accuracy.
The batch-norm runs without dropout are also evaluated with *batch*
statistics of their training batch size.  Headline: test accuracy with batch
norm minus without, at the same budget, and how much batch norm shrinks the
loss gap (test loss minus training loss).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from companion._validation import describe
from companion.base import Layer
from companion.experiments.common import mnist, one_blas_thread, summarize
from companion.layers import BatchNorm
from companion.nn import ReLU, Sequential, softmax_cross_entropy
from companion.training import mlp, train

DESCRIPTION = "Batch norm regularizes: higher test accuracy and a smaller train-test gap than without it (and dropout)"

CONFIG_TEST: dict[str, Any] = {
    "hidden": [16, 16],
    "n_train": 480,
    "epochs": 2,
    "eval_every_epochs": 1,
    "batch_size": 60,
    "small_batch": 15,
    "large_batch": 240,
    "learning_rate": 0.1,
    "dropout_rate": 0.5,
    "bn_momentum": 0.99,
    "matched_train_loss": 0.05,
    "margin_accuracy": 0.005,
    "margin_gap": 0.10,
}
CONFIG_CI: dict[str, Any] = {
    **CONFIG_TEST,
    "hidden": [128, 128],
    "n_train": 4000,
    "epochs": 20,
    "eval_every_epochs": 2,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "hidden": [256, 256],
    "epochs": 60,
    "eval_every_epochs": 3,
}

RUNS: dict[str, tuple[str, bool, str]] = {
    "none": ("none", False, "batch_size"),
    "bn": ("before", False, "batch_size"),
    "dropout": ("none", True, "batch_size"),
    "bn_dropout": ("before", True, "batch_size"),
    "none_small": ("none", False, "small_batch"),
    "bn_small": ("before", False, "small_batch"),
    "none_large": ("none", False, "large_batch"),
    "bn_large": ("before", False, "large_batch"),
}
"""Run name -> (``batch_norm`` argument of :func:`companion.training.mlp`, dropout?, config key of the batch size)."""

PER_RUN = (
    "final_train_loss", "final_train_accuracy", "final_test_loss", "final_test_accuracy",
    "loss_gap", "accuracy_gap", "diverged",
    "matched_epoch", "matched_test_loss", "matched_test_accuracy",
    "batchstat_train_loss", "batchstat_train_accuracy", "batchstat_test_loss", "batchstat_test_accuracy",
    "train_loss_curve", "train_accuracy_curve", "test_loss_curve", "test_accuracy_curve", "minibatch_loss_curve",
)
"""The per-run records, each stored as a list over seeds."""


# --------------------------------------------------------------------------- dropout
class _DropoutCache(NamedTuple):
    mask: np.ndarray | None
    """The scaled keep-mask (0 or 1/(1-rate)) of the last training call; None in inference mode."""
    output_shape: tuple[int, ...]


class Dropout(Layer):
    r"""Inverted dropout: :math:`y = x \odot m`, :math:`m_i = [u_i \ge p] / (1 - p)`, :math:`u_i \sim U(0, 1)`.

    In training mode every element is kept with probability :math:`1 - p`
    and scaled by :math:`1/(1-p)`, so :math:`E[y] = x`; in inference mode the
    layer is the identity.  Backward: :math:`dx = dy \odot m` (the identity
    after an inference call).  A fresh mask is drawn from the layer's own
    ``np.random.default_rng(seed)`` at every training call unless
    ``fixed_mask`` is set (a 0/1 keep-array the shape of the input, for
    gradient checks).  Chapter 11 compares it with batch norm.

    Parameters
    ----------
    rate : float in [0, 1)
        The probability :math:`p` of dropping an element.
    seed : int or None
    """

    def __init__(self, rate: float, seed: int | None = None) -> None:
        super().__init__()
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not 0 <= rate < 1:
            raise ValueError(f"rate must be a float in [0, 1); received {describe(rate)}")
        self.rate = float(rate)
        self.seed = seed
        self.fixed_mask: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"Dropout(rate={self.rate:g})"

    def _forward(self, x: np.ndarray, training: bool) -> tuple[np.ndarray, _DropoutCache]:
        if not training or self.rate == 0.0:
            return x, _DropoutCache(None, x.shape)
        if self.fixed_mask is not None:
            keep = np.asarray(self.fixed_mask, dtype=bool)
            if keep.shape != x.shape:
                raise ValueError(f"fixed_mask has shape {keep.shape}; expected the input's shape {x.shape}")
        else:
            keep = self._rng.random(x.shape) >= self.rate
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.rate))
        return x * mask, _DropoutCache(mask, x.shape)

    def _backward(self, dy: np.ndarray, cache: _DropoutCache) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return (dy if cache.mask is None else dy * cache.mask), {}


# --------------------------------------------------------------------------- models and evaluation
def build_model(config: dict[str, Any], run: str, seed: int) -> Sequential:
    """The network of ``run``: :func:`companion.training.mlp`, plus a :class:`Dropout` after every hidden ReLU."""
    batch_norm, dropout, _ = RUNS[run]
    base = mlp(config["hidden"], batch_norm=batch_norm, momentum=config["bn_momentum"], seed=seed)
    if not dropout:
        return base
    layers: list[Layer] = []
    for layer in base:
        layers.append(layer)
        if isinstance(layer, ReLU):
            layers.append(Dropout(config["dropout_rate"], seed=seed * 1000 + 500 + len(layers)))
    return Sequential(layers)


def batch_size_and_learning_rate(config: dict[str, Any], run: str) -> tuple[int, float]:
    """The run's batch size and its learning rate, ``learning_rate * B / batch_size`` (linear scaling)."""
    batch = int(config[RUNS[run][2]])
    return batch, config["learning_rate"] * batch / config["batch_size"]


def evaluate(
    model: Sequential, x: np.ndarray, y: np.ndarray, *, batch_statistics: bool = False, chunk: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy of ``model`` on ``(x, y)``, in chunks of ``chunk`` examples.

    Inference mode (moving statistics, dropout off) unless
    ``batch_statistics``: then every :class:`~companion.layers.BatchNorm`
    normalizes each chunk with that chunk's own mean and variance (its
    training-mode computation; dropout stays off) and the moving statistics
    are restored afterwards.
    """
    bn_layers = [layer for layer in model if isinstance(layer, BatchNorm)]
    saved = [(layer.moving_mean.copy(), layer.moving_variance.copy()) for layer in bn_layers if layer.built]
    total, correct = 0.0, 0
    for start in range(0, len(x), chunk):
        h = x[start : start + chunk]
        for layer in model:
            h = layer(h, training=bool(batch_statistics and isinstance(layer, BatchNorm)))
        loss, _ = softmax_cross_entropy(h, y[start : start + chunk])
        total += loss * len(h)
        correct += int(np.sum(h.argmax(axis=1) == y[start : start + chunk]))
    for layer, (mean, variance) in zip(bn_layers, saved):
        layer.moving_mean[...] = mean
        layer.moving_variance[...] = variance
    return total / len(x), correct / len(x)


def at_train_loss(train_loss: Sequence[float], values: Sequence[float], level: float) -> float:
    """``values`` interpolated (linearly in log training loss) where ``train_loss`` first reaches ``level``.

    NaN when the curve never gets to ``level``; the first value when it starts there.
    """
    for k, loss in enumerate(train_loss):
        if math.isnan(loss):
            return math.nan
        if loss <= level:
            if k == 0:
                return float(values[0])
            hi, lo = math.log(train_loss[k - 1]), math.log(loss)
            t = (hi - math.log(level)) / (hi - lo)
            return float(values[k - 1] + t * (values[k] - values[k - 1]))
    return math.nan




def eval_epochs(config: dict[str, Any]) -> list[int]:
    """The epochs after which the full sets are evaluated: 0, every ``eval_every_epochs``, the last."""
    return sorted({*range(0, config["epochs"] + 1, config["eval_every_epochs"]), config["epochs"]})


def train_one(config: dict[str, Any], run: str, seed: int) -> dict[str, Any]:
    """Build and train the network of ``run`` for ``config["epochs"]`` epochs; return its record (:data:`PER_RUN`)."""
    data = mnist()
    n = config["n_train"]
    x_train, y_train = data.x_train[:n], data.y_train[:n]
    batch, lr = batch_size_and_learning_rate(config, run)
    per_epoch = n // batch
    model = build_model(config, run, seed)
    model.build((None, 28, 28, 1))
    checkpoints = {epoch * per_epoch: epoch for epoch in eval_epochs(config)}
    curves: dict[str, list[float]] = {k: [] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")}

    def record(step: int, model: Sequential) -> None:
        if step in checkpoints:
            for split, (xs, ys) in (("train", (x_train, y_train)), ("test", (data.x_test, data.y_test))):
                loss, acc = evaluate(model, xs, ys)
                curves[f"{split}_loss"].append(loss)
                curves[f"{split}_accuracy"].append(acc)

    record(0, model)
    history = train(
        model, x_train, y_train, data.x_test, data.y_test,
        steps=config["epochs"] * per_epoch, batch_size=batch, learning_rate=lr, seed=seed,
        eval_every=config["epochs"] * per_epoch, on_step=record,
    )
    diverged = bool(history["diverged"])
    n_eval = len(checkpoints)
    for key in curves:
        curves[key] += [math.nan] * (n_eval - len(curves[key]))
    losses = np.asarray(history["losses"], dtype=np.float64)
    steps = sorted(checkpoints)
    minibatch = [math.nan] + [
        float(losses[a:b].mean()) if len(losses) >= b else math.nan for a, b in zip(steps[:-1], steps[1:])
    ]
    final = {key: curves[key][-1] for key in curves}
    level = config["matched_train_loss"]
    batch_norm, dropout, _ = RUNS[run]
    batchstat = {"train_loss": math.nan, "train_accuracy": math.nan, "test_loss": math.nan, "test_accuracy": math.nan}
    if batch_norm != "none" and not dropout and not diverged:
        for split, (xs, ys) in (("train", (x_train, y_train)), ("test", (data.x_test, data.y_test))):
            batchstat[f"{split}_loss"], batchstat[f"{split}_accuracy"] = evaluate(
                model, xs, ys, batch_statistics=True, chunk=batch
            )
    return {
        "final_train_loss": final["train_loss"],
        "final_train_accuracy": final["train_accuracy"],
        "final_test_loss": final["test_loss"],
        "final_test_accuracy": final["test_accuracy"],
        "loss_gap": final["test_loss"] - final["train_loss"],
        "accuracy_gap": final["train_accuracy"] - final["test_accuracy"],
        "diverged": diverged,
        "matched_epoch": at_train_loss(curves["train_loss"], eval_epochs(config), level),
        "matched_test_loss": at_train_loss(curves["train_loss"], curves["test_loss"], level),
        "matched_test_accuracy": at_train_loss(curves["train_loss"], curves["test_accuracy"], level),
        **{f"batchstat_{key}": value for key, value in batchstat.items()},
        **{f"{key}_curve": value for key, value in curves.items()},
        "minibatch_loss_curve": minibatch,
    }


# --------------------------------------------------------------------------- the verdict
def verdict_rule(margin_accuracy: float, margin_gap: float) -> str:
    """The verdict rule in words, with its numbers (fixed before any result was seen)."""
    return (
        f"Per seed, at the same budget (batch 60, same epochs): d = test accuracy with BN - without BN, and "
        f"R = 1 - (loss gap with BN) / (loss gap without BN), the loss gap being test loss - training loss "
        f"(inference mode, full sets). A seed supports the claim if d >= {margin_accuracy * 100:g} points and "
        f"R >= {margin_gap:.0%}; it contradicts it if R <= -{margin_gap:.0%} and d < {margin_accuracy * 100:g} "
        f"points (BN widens the gap and buys no test accuracy). 'supported' if every seed supports; "
        f"'contradicted' if every seed contradicts; otherwise 'mixed' if some seed supports, and "
        f"'not supported at this scale' if none does."
    )


def verdict(accuracy_differences: Sequence[float], gap_reductions: Sequence[float], margin_accuracy: float,
            margin_gap: float) -> str:
    """Apply :func:`verdict_rule` to the per-seed d and R (NaN, from a diverged run, supports nothing)."""
    tol = 1e-12
    supports = [d >= margin_accuracy - tol and r >= margin_gap - tol for d, r in zip(accuracy_differences, gap_reductions)]
    contradicts = [r <= -margin_gap + tol and d < margin_accuracy - tol for d, r in zip(accuracy_differences, gap_reductions)]
    if all(supports):
        return "supported"
    if all(contradicts):
        return "contradicted"
    if any(supports):
        return "mixed"
    return "not supported at this scale"


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [float(x - y) for x, y in zip(a, b)]


def _reductions(with_gap: Sequence[float], without_gap: Sequence[float]) -> list[float]:
    return [float(1.0 - w / n) if n > 0 else math.nan for w, n in zip(with_gap, without_gap)]


def run(config: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Train every run of :data:`RUNS` on every seed; return per-run records, comparisons and the headline.

    ``results["runs"][run][key]`` is a list over seeds for every key of
    :data:`PER_RUN`.  ``comparisons`` holds per-seed differences: batch
    norm's effect at each batch size and dropout's effect with and without
    batch norm.
    """
    with one_blas_thread():
        runs = {}
        for name in RUNS:
            records = [train_one(config, name, seed) for seed in seeds]
            runs[name] = {key: [r[key] for r in records] for key in PER_RUN}
    acc = {name: runs[name]["final_test_accuracy"] for name in RUNS}
    gap = {name: runs[name]["loss_gap"] for name in RUNS}
    comparisons: dict[str, Any] = {}
    for suffix, key in (("", "batch_size"), ("_small", "small_batch"), ("_large", "large_batch")):
        comparisons[f"bn_accuracy_gain{suffix}"] = _differences(acc[f"bn{suffix}"], acc[f"none{suffix}"])
        comparisons[f"bn_gap_reduction{suffix}"] = _reductions(gap[f"bn{suffix}"], gap[f"none{suffix}"])
    comparisons["dropout_accuracy_gain_without_bn"] = _differences(acc["dropout"], acc["none"])
    comparisons["dropout_accuracy_gain_with_bn"] = _differences(acc["bn_dropout"], acc["bn"])
    comparisons["dropout_gap_reduction_without_bn"] = _reductions(gap["dropout"], gap["none"])
    comparisons["dropout_gap_reduction_with_bn"] = _reductions(gap["bn_dropout"], gap["bn"])
    d, r = comparisons["bn_accuracy_gain"], comparisons["bn_gap_reduction"]
    architecture = "-".join(["784", *map(str, config["hidden"]), "10"])
    headline = {
        "claim": "Batch normalization regularizes (reduces the need for dropout)",
        "metric": (
            f"final test accuracy (fraction of the 1,000 test digits, inference mode) of a {architecture} ReLU "
            f"MLP after {config['epochs']} epochs of plain SGD (batch {config['batch_size']}, learning rate "
            f"{config['learning_rate']:g}) on {config['n_train']:,} MNIST digits"
        ),
        "with_bn": summarize(acc["bn"]),
        "without_bn": summarize(acc["none"]),
        "accuracy_difference": d,
        "gap_reduction": r,
        "effect": _finite_mean(d),
        "effect_definition": "mean over seeds of d = test accuracy with BN - without BN (fraction; x100 for points)",
        "verdict": verdict(d, r, config["margin_accuracy"], config["margin_gap"]),
        "verdict_rule": verdict_rule(config["margin_accuracy"], config["margin_gap"]),
    }
    return {
        "eval_epochs": eval_epochs(config),
        "runs_spec": {name: {"batch_norm": bn, "dropout": do, "batch_size": batch_size_and_learning_rate(config, name)[0],
                             "learning_rate": batch_size_and_learning_rate(config, name)[1]}
                      for name, (bn, do, _) in RUNS.items()},
        "runs": runs,
        "comparisons": comparisons,
        "headline": headline,
    }
