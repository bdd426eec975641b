r"""Claim (3): batch normalization reduces the dependence on weight initialization.

Set-up (the weight-scale experiment of CS231n's batch-norm assignment, on MNIST
and with plain SGD): a 784-100-100-100-100-10 ReLU MLP
(:func:`companion.training.mlp`) is built with and without batch norm (``"before"``
the ReLU); then every Dense kernel, the output layer's included, is overwritten
with :math:`W = s\,Z`, :math:`Z_{ij} \sim N(0, 1)`, for weight scales
:math:`s` on a log grid from :math:`10^{-3}` to :math:`10`.  For one seed
the same :math:`Z` and the same mini-batch order are used at every scale and in
both variants, so the weight scale is the only thing that changes along the
grid.  Every network is trained with the same SGD (learning rate, steps,
batch size).  Recorded per scale and seed: final test accuracy, final
training loss, whether training diverged, the initial loss, and how far the
kernels moved relative to their initial size.  With ``control=True`` a third
variant, ``"with_bn_default_output"``, scales only the hidden kernels and keeps
the output layer at its Glorot initialization, to separate the output layer's
scale from the hidden layers' effective learning rate.

Headline: the *working range* -- the number of grid scales at which the
final test accuracy reaches ``threshold``, times the grid step, in decades of
weight scale -- with and without batch norm.  Chapter 10, "Less dependence on
initialization", runs it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from companion.experiments.common import mnist, one_blas_thread, paired_margin_verdict, summarize
from companion.nn import Dense, Sequential
from companion.training import mlp, train

DESCRIPTION = "Batch norm widens the range of weight-initialization scales at which an MLP trains on MNIST"

CONFIG_TEST: dict[str, Any] = {
    "hidden": [16, 16],
    "log10_scale_min": -3.0,
    "log10_scale_max": 1.0,
    "n_scales": 3,
    "steps": 8,
    "batch_size": 60,
    "learning_rate": 0.1,
    "eval_every": 4,
    "threshold": 0.8,
    "margin_decades": 1.0,
    "control": True,
}
CONFIG_CI: dict[str, Any] = {
    "hidden": [100, 100, 100, 100],
    "log10_scale_min": -3.0,
    "log10_scale_max": 1.0,
    "n_scales": 9,
    "steps": 400,
    "batch_size": 60,
    "learning_rate": 0.1,
    "eval_every": 100,
    "threshold": 0.8,
    "margin_decades": 1.0,
    "control": False,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "n_scales": 17,
    "steps": 3000,
    "eval_every": 250,
    "control": True,
}

CONTROL = "with_bn_default_output"
"""Control variant: batch norm, hidden kernels drawn at scale s, output layer left at its Glorot init."""
BATCH_NORM = {"without_bn": "none", "with_bn": "before", CONTROL: "before"}
"""Each variant's ``batch_norm`` argument of :func:`companion.training.mlp`."""


def verdict_rule(threshold: float, margin: float) -> str:
    """The verdict rule, in words, with its two numbers filled in (fixed before any result was seen)."""
    return (
        f"A weight scale 'works' for a network when its final test accuracy is >= {threshold:g} (a diverged "
        f"run fails). Per seed, working range = number of working grid scales x grid step (decades), and "
        f"d = working range with BN - working range without BN. 'supported' if d >= {margin:g} decade on "
        f"every seed; 'contradicted' if d <= -{margin:g} decade on every seed; otherwise 'mixed' if some "
        f"seed has d >= {margin:g} decade and 'not supported at this scale' if none has."
    )


def weight_scales(config: dict[str, Any]) -> list[float]:
    """The grid ``logspace(log10_scale_min, log10_scale_max, n_scales)`` as floats."""
    return [float(s) for s in np.logspace(config["log10_scale_min"], config["log10_scale_max"], config["n_scales"])]


def grid_step_decades(config: dict[str, Any]) -> float:
    """Distance between neighbouring grid scales, in decades (powers of ten)."""
    return (config["log10_scale_max"] - config["log10_scale_min"]) / max(config["n_scales"] - 1, 1)


def dense_layers(model: Sequential) -> list[Dense]:
    """The model's Dense layers, input side first."""
    return [layer for layer in model if isinstance(layer, Dense)]


def draw_kernels(model: Sequential, scale: float, seed: int, *, skip_output: bool = False) -> None:
    r"""Overwrite the Dense kernels of a built ``model`` in place with :math:`s\,Z`, :math:`Z \sim N(0, 1)`.

    Layer ``i`` draws its :math:`Z` from ``default_rng(seed * 1000 + i)``, so
    for one seed every scale gets the same directions and differs only in
    size.  ``skip_output=True`` leaves the last Dense layer as it was.
    """
    layers = dense_layers(model)
    if skip_output:
        layers = layers[:-1]
    for index, layer in enumerate(layers):
        z = np.random.default_rng(seed * 1000 + index).standard_normal(layer.kernel.shape)
        layer.kernel[...] = scale * z


def working_range(accuracies: Sequence[float], threshold: float, step: float) -> float:
    """Grid scales whose accuracy is >= ``threshold`` (NaN = diverged = fails), times ``step`` decades."""
    return sum(1 for a in accuracies if not math.isnan(a) and a >= threshold) * step


def verdict(with_bn: Sequence[float], without_bn: Sequence[float], margin: float) -> str:
    """Apply :func:`verdict_rule` to per-seed working ranges (decades)."""
    return paired_margin_verdict([b - n for b, n in zip(with_bn, without_bn)], margin)




def _relative_change(before: list[np.ndarray], after: list[np.ndarray]) -> list[float]:
    return [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for b, a in zip(before, after)]


def eval_steps(config: dict[str, Any]) -> list[int]:
    """The steps at which :func:`companion.training.train` evaluates: 0, every ``eval_every``, the last."""
    return sorted({*range(0, config["steps"] + 1, config["eval_every"]), config["steps"]})


def train_one(config: dict[str, Any], variant: str, scale: float, seed: int) -> dict[str, Any]:
    """Build, initialize at ``scale`` and train one network; return its record.

    Quantities of a diverged run are NaN, except ``initial_loss`` (the first
    mini-batch's loss; ``inf`` when even that was non-finite or above 1e3).
    """
    data = mnist()
    model = mlp(config["hidden"], batch_norm=BATCH_NORM[variant], seed=seed)
    model.build((None, 28, 28, 1))
    draw_kernels(model, scale, seed, skip_output=variant == CONTROL)
    initial = [layer.kernel.copy() for layer in dense_layers(model)]
    history = train(
        model, data.x_train, data.y_train, data.x_test, data.y_test,
        steps=config["steps"], batch_size=config["batch_size"], learning_rate=config["learning_rate"],
        seed=seed, eval_every=config["eval_every"],
    )
    diverged = bool(history["diverged"])
    change = _relative_change(initial, [layer.kernel for layer in dense_layers(model)])
    n_eval = len(eval_steps(config))
    pad = [math.nan] * (n_eval - len(history["test_accuracy"]))
    return {
        "final_test_accuracy": math.nan if diverged else float(history["final_test_accuracy"]),
        "final_train_loss": math.nan if diverged else float(history["train_loss"][-1]),
        "diverged": diverged,
        "initial_loss": float(history["losses"][0]) if history["losses"] else math.inf,
        "hidden_change": math.nan if diverged else float(np.mean(change[:-1])),
        "output_change": math.nan if diverged else change[-1],
        "test_accuracy_curve": [float(a) for a in history["test_accuracy"]] + pad,
        "train_loss_curve": [float(a) for a in history["train_loss"]] + pad,
    }


def run(config: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Train every (variant, weight scale, seed); return per-run records and the headline.

    Every per-run quantity is a list over seeds of lists over scales.
    """
    scales = weight_scales(config)
    step = grid_step_decades(config)
    variants = ["without_bn", "with_bn"] + ([CONTROL] if config["control"] else [])
    keys = ("final_test_accuracy", "final_train_loss", "diverged", "initial_loss", "hidden_change",
            "output_change", "test_accuracy_curve", "train_loss_curve")
    out: dict[str, Any] = {}
    with one_blas_thread():
        for variant in variants:
            records = [[train_one(config, variant, s, seed) for s in scales] for seed in seeds]
            out[variant] = {key: [[r[key] for r in row] for row in records] for key in keys}
            out[variant]["working_range"] = [
                working_range(row, config["threshold"], step) for row in out[variant]["final_test_accuracy"]
            ]
    with_bn, without_bn = out["with_bn"]["working_range"], out["without_bn"]["working_range"]
    headline = {
        "claim": "Batch normalization reduces the dependence on weight initialization",
        "metric": (
            f"working range: decades of initial weight scale s (grid 10^{config['log10_scale_min']:g}.."
            f"10^{config['log10_scale_max']:g}, step {step:g} decade) at which a "
            f"{'-'.join(['784', *map(str, config['hidden']), '10'])} ReLU MLP reaches >= "
            f"{config['threshold']:.0%} test accuracy after {config['steps']} SGD steps"
        ),
        "with_bn": summarize(with_bn),
        "without_bn": summarize(without_bn),
        "effect": float(np.mean(with_bn) - np.mean(without_bn)),
        "effect_definition": "mean working range with BN minus mean working range without BN (decades)",
        "verdict": verdict(with_bn, without_bn, config["margin_decades"]),
        "verdict_rule": verdict_rule(config["threshold"], config["margin_decades"]),
    }
    return {
        "weight_scales": scales,
        "grid_step_decades": step,
        "eval_steps": eval_steps(config),
        "variants": variants,
        **out,
        "headline": headline,
    }
