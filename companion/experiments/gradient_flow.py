r"""Gradient flow: does batch norm let deeper networks train?  (Chapter 08.)

The claim, as tutorials state it: batch normalization improves the flow of
gradients through a deep network, so deeper networks train.  The set-up:
fully connected networks of ``depth`` hidden layers of ``width`` units on the
MNIST subset (:func:`companion.experiments.common.mnist`), Keras's default
Glorot-uniform initialization (what tutorials use), ReLU or sigmoid, each
with no batch norm or with batch norm before every nonlinearity
(``batch_norm="before"``, the paper's placement).  Everything else is held
fixed: plain SGD (so a layer's update is exactly ``learning_rate`` times the
gradient measured here), learning rate, batch size, number of steps, and the
seed, which fixes the kernels (identical with and without BN) and the order
of the mini-batches.

Measured, per run:

* the Frobenius norm :math:`\lVert \partial L/\partial W_l \rVert` of every
  Dense kernel's gradient (hidden layers 1..depth, then the output layer) on
  the first mini-batch (the initial weights) and on the last one;
* :math:`\log_{10}` of the ratio of the first to the last hidden layer's norm;
* test accuracy during and after training, and the deepest network that
  reaches ``trained_threshold``.

The headline compares the final test accuracy of the deepest ReLU network
with and without BN (see :func:`verdict` for the rule).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from companion.experiments.common import mnist, one_blas_thread, summarize
from companion.nn import Dense, Sequential
from companion.training import mlp, train

__all__ = [
    "CONFIG_CI",
    "CONFIG_FULL",
    "CONFIG_TEST",
    "DESCRIPTION",
    "deepest_trained",
    "kernel_gradient_norms",
    "one_blas_thread",
    "run",
    "train_once",
    "verdict",
]

DESCRIPTION = (
    "Batch norm improves gradient flow so deeper networks train: per-layer gradient norms "
    "and test accuracy versus depth of Glorot-initialized MLPs, with and without BN"
)

PLACEMENTS = ("none", "before")
CHANCE = 0.1
"""Accuracy of guessing among 10 balanced classes; a diverged run counts as this in the verdict."""

CONFIG_TEST: dict[str, Any] = {
    "width": 16,
    "depths": [1, 3],
    "activations": ["relu", "sigmoid"],
    "steps": 12,
    "batch_size": 60,
    "learning_rate": 0.1,
    "momentum": 0.0,
    "eval_every": 6,
    "trained_threshold": 0.5,
    "headline_activation": "relu",
    "margin": 0.05,
}
CONFIG_CI: dict[str, Any] = {
    **CONFIG_TEST,
    "width": 100,
    "depths": [2, 5, 10, 20],
    "steps": 500,
    "eval_every": 50,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "depths": [2, 5, 10, 20, 30, 50],
    "steps": 2000,
    "eval_every": 100,
}




def kernel_gradient_norms(model: Sequential) -> list[float]:
    r""":math:`\lVert \partial L/\partial W_l \rVert_F` of every Dense kernel, input side first.

    Reads the ``grads`` the last ``model.backward`` left in the layers.  The
    norm is computed in float64: the gradients of a deep sigmoid network are
    representable in float32 (entries of 1e-33 at 50 layers), but the sum of
    their squares is not.
    """
    return [
        float(np.linalg.norm(layer.grads["kernel"].astype(np.float64)))
        for layer in model
        if isinstance(layer, Dense)
    ]


def train_once(
    depth: int, activation: str, batch_norm: str, seed: int, config: dict[str, Any]
) -> dict[str, Any]:
    """Build and train one network; return its accuracy curve and gradient norms.

    Returns
    -------
    dict
        ``final_test_accuracy`` (NaN if the run diverged), ``diverged``,
        ``eval_steps``, ``test_accuracy`` (at ``eval_steps``),
        ``grad_norm_init`` (kernel-gradient norms on the first mini-batch,
        i.e. at the initial weights), ``grad_norm_final`` (on the last
        mini-batch; NaNs if the run diverged) and the ``log10_ratio_*`` of
        the first to the last hidden layer's norm for both.
    """
    data = mnist()
    model = mlp([config["width"]] * depth, activation=activation, batch_norm=batch_norm, seed=seed)
    steps = config["steps"]
    recorded: dict[int, list[float]] = {}

    def on_step(step: int, net: Sequential) -> None:
        if step in (1, steps):
            recorded[step] = kernel_gradient_norms(net)

    history = train(
        model, *data,
        steps=steps,
        batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        momentum=config["momentum"],
        seed=seed,
        eval_every=config["eval_every"],
        on_step=on_step,
        desc=f"{activation} depth {depth} BN={batch_norm} seed {seed}",
    )
    nan_norms = [math.nan] * (depth + 1)
    init = recorded.get(1, nan_norms)
    final = recorded.get(steps, nan_norms) if not history["diverged"] else nan_norms
    return {
        "final_test_accuracy": history["final_test_accuracy"],
        "diverged": history["diverged"],
        "eval_steps": history["steps"],
        "test_accuracy": history["test_accuracy"],
        "grad_norm_init": init,
        "grad_norm_final": final,
        "log10_ratio_init": _log10_ratio(init),
        "log10_ratio_final": _log10_ratio(final),
    }


def _log10_ratio(norms: Sequence[float]) -> float:
    """log10(first hidden layer's norm / last hidden layer's norm); the output layer is norms[-1]."""
    first, last = norms[0], norms[-2]
    if not (first > 0 and last > 0):  # NaN (diverged) or an exactly zero gradient
        return math.nan
    return float(math.log10(first / last))


def deepest_trained(depths: Sequence[int], accuracies: Sequence[float], threshold: float) -> int:
    """The largest depth whose accuracy reaches ``threshold`` (0 if none; NaN never does)."""
    reached = [d for d, a in zip(depths, accuracies) if not math.isnan(a) and a >= threshold]
    return max(reached, default=0)


def _as_chance(values: Sequence[float | None]) -> np.ndarray:
    """Accuracies as floats, with NaN and None (NaN read back from JSON) replaced by chance."""
    return np.array([CHANCE if v is None or math.isnan(v) else float(v) for v in values])


def verdict(with_bn: Sequence[float], without_bn: Sequence[float], margin: float) -> str:
    """The headline's rule, applied to per-seed accuracies paired by seed (NaN or None counts as chance, 0.1).

    * "supported": with BN beats without BN by more than ``margin`` on every seed;
    * "contradicted": without BN beats with BN by more than ``margin`` on every seed;
    * "not supported at this scale": otherwise, if the mean difference is at most ``margin``;
    * "mixed": otherwise (a mean difference above ``margin`` that not every seed shows).
    """
    if len(with_bn) != len(without_bn) or len(with_bn) == 0:
        raise ValueError(
            f"with_bn and without_bn must be non-empty and paired by seed; received lengths "
            f"{len(with_bn)} and {len(without_bn)}"
        )
    diff = _as_chance(with_bn) - _as_chance(without_bn)
    if np.all(diff > margin):
        return "supported"
    if np.all(diff < -margin):
        return "contradicted"
    if abs(float(diff.mean())) <= margin:
        return "not supported at this scale"
    return "mixed"


def run(config: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Train every (activation, depth, placement, seed) of ``config``; summarize and judge.

    Returns
    -------
    dict
        ``runs[activation][placement]``: a list over ``config["depths"]`` of
        dicts with ``depth`` and, per seed, the fields of :func:`train_once`;
        ``deepest_trained[activation][placement]``: per seed, the deepest
        network reaching ``trained_threshold``; ``headline``.
    """
    depths = list(config["depths"])
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with one_blas_thread():
        for activation in config["activations"]:
            runs[activation] = {}
            for placement in PLACEMENTS:
                rows = []
                for depth in depths:
                    per_seed = [train_once(depth, activation, placement, seed, config) for seed in seeds]
                    rows.append({"depth": depth, **{k: [r[k] for r in per_seed] for k in per_seed[0]}})
                runs[activation][placement] = rows
    trained = {
        activation: {
            placement: [
                deepest_trained(depths, [row["final_test_accuracy"][i] for row in rows], config["trained_threshold"])
                for i in range(len(seeds))
            ]
            for placement, rows in by_placement.items()
        }
        for activation, by_placement in runs.items()
    }
    return {"runs": runs, "deepest_trained": trained, "headline": _headline(config, runs)}


def _headline(config: dict[str, Any], runs: dict[str, Any]) -> dict[str, Any]:
    activation = config["headline_activation"]
    depth = max(config["depths"])
    margin = config["margin"]
    with_bn = runs[activation]["before"][-1]["final_test_accuracy"]
    without_bn = runs[activation]["none"][-1]["final_test_accuracy"]
    effect = 100.0 * float(np.mean(_as_chance(with_bn)) - np.mean(_as_chance(without_bn)))
    return {
        "claim": "Batch norm improves gradient flow, so deeper networks train",
        "metric": (
            f"test accuracy (%) of a {depth}-hidden-layer {activation} MLP (width {config['width']}, "
            f"Glorot init) after {config['steps']} plain-SGD steps (learning rate {config['learning_rate']}, "
            f"batch {config['batch_size']})"
        ),
        "with_bn": summarize([100.0 * v for v in with_bn]),
        "without_bn": summarize([100.0 * v for v in without_bn]),
        "effect": effect,
        "effect_definition": (
            "mean test accuracy with BN minus without BN, in percentage points (a diverged run counts as 10 %)"
        ),
        "verdict": verdict(with_bn, without_bn, margin),
        "verdict_rule": (
            f"paired by seed, a diverged run counting as chance (10 %): 'supported' if the accuracy with BN "
            f"exceeds the accuracy without BN by more than {100 * margin:g} percentage points on every seed; "
            f"'contradicted' if it is lower by more than {100 * margin:g} points on every seed; otherwise "
            f"'not supported at this scale' if the mean difference is at most {100 * margin:g} points, "
            "else 'mixed'"
        ),
    }
