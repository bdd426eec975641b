r"""Claim (5): batch normalization makes saturating nonlinearities (the sigmoid) usable.

Two parts, both on the MNIST subset (4,000 training and 1,000 test digits),
plain SGD with the same learning rate for both variants, mini-batches of 60.

*The paper's MNIST experiment* (Ioffe & Szegedy 2015, section 4.1 and
Figure 1): a 784-100-100-100-10 network with sigmoid hidden units
(:func:`companion.training.mlp` with ``activation="sigmoid"``), without batch
norm and with batch norm between every hidden Dense layer and its sigmoid
(``batch_norm="before"``).  The paper initializes the weights to "small
random Gaussian values"; every kernel here is overwritten with
:math:`W \sim N(0, s^2)` (:func:`gaussian_kernels`), biases start at 0.
Recorded every ``record_every`` steps: test accuracy, the {15, 50, 85}th
percentiles of the input of one fixed sigmoid of the last hidden layer (unit
``unit``) over a fixed evaluation batch (:func:`sigmoid_inputs`), the range of
the median of every unit of that layer, and the fraction of saturated inputs
(:math:`|x| > 4`) in every hidden layer.  With ``control=True`` (full scale)
the same two networks are also trained from the package's Glorot-uniform
kernels, to see how much of the result the small initialization causes.

*A deep sigmoid network*: ``deep_hidden`` sigmoid layers (8 of 100 units), with
the package's default Glorot-uniform initialization, with and without batch
norm; it "trains" if its final test accuracy reaches ``deep_threshold``.

Headline: the paper network's final test accuracy with batch norm minus
without, per seed, with a margin fixed before any run (:func:`verdict`).
Chapter 12, "Saturating nonlinearities and the paper's MNIST experiment",
runs it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from companion.experiments.common import mnist, one_blas_thread, paired_margin_verdict, summarize
from companion.layers import BatchNorm
from companion.nn import Dense, Sequential, Sigmoid
from companion.training import accuracy, mlp, train

DESCRIPTION = "Batch norm makes sigmoid networks trainable: the paper's MNIST experiment (Figure 1) and a deep sigmoid MLP"

CONFIG_TEST: dict[str, Any] = {
    "hidden": [16, 16, 16],
    "init_std": 0.01,
    "steps": 20,
    "batch_size": 60,
    "learning_rate": 0.1,
    "record_every": 10,
    "unit": 0,
    "eval_size": 200,
    "saturation": 4.0,
    "margin": 0.02,
    "deep_hidden": [16, 16, 16, 16],
    "deep_steps": 20,
    "deep_eval_every": 10,
    "deep_threshold": 0.5,
    "control": True,
}
CONFIG_CI: dict[str, Any] = {
    "hidden": [100, 100, 100],
    "init_std": 0.01,
    "steps": 3000,
    "batch_size": 60,
    "learning_rate": 0.1,
    "record_every": 50,
    "unit": 0,
    "eval_size": 1000,
    "saturation": 4.0,
    "margin": 0.02,
    "deep_hidden": [100] * 8,
    "deep_steps": 1000,
    "deep_eval_every": 100,
    "deep_threshold": 0.5,
    "control": False,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "steps": 50000,
    "record_every": 500,
    "deep_steps": 10000,
    "deep_eval_every": 500,
    "control": True,
}

PERCENTILES = (15, 50, 85)
"""The percentiles of Figure 1 (b, c)."""
VARIANTS = {"without_bn": "none", "with_bn": "before"}
"""Each variant's ``batch_norm`` argument of :func:`companion.training.mlp`."""
CONTROLS = {"without_bn_glorot": "none", "with_bn_glorot": "before"}
"""Control variants of the paper network: the package's Glorot-uniform kernels instead of N(0, s^2)."""


# --------------------------------------------------------------------------- rules
def verdict_rule(margin: float) -> str:
    """The headline's verdict rule, in words, with its margin filled in (fixed before any run)."""
    return (
        f"Per seed, d = final test accuracy of the paper's sigmoid network with BN minus without BN (same "
        f"init, mini-batches and learning rate). 'supported' if d >= {margin:g} on every seed; 'contradicted' "
        f"if d <= -{margin:g} on every seed; otherwise 'mixed' if some seed has d >= {margin:g}, and 'not "
        f"supported at this scale' if none has."
    )


def verdict(with_bn: Sequence[float], without_bn: Sequence[float], margin: float) -> str:
    """Apply :func:`verdict_rule` to per-seed final test accuracies (NaN, a diverged run, counts as 0)."""
    return paired_margin_verdict([_or_zero(b) - _or_zero(n) for b, n in zip(with_bn, without_bn)], margin)


def deep_verdict_rule(threshold: float) -> str:
    """The deep network's rule, in words (fixed before any run)."""
    return (
        f"A deep sigmoid network 'trains' if its final test accuracy is >= {threshold:g} (chance is 0.1). "
        f"'supported' if it trains with BN on every seed and without BN on none; 'not supported at this "
        f"scale' if it trains without BN on every seed; 'contradicted' if it trains without BN on every seed "
        f"and with BN on none; otherwise 'mixed'."
    )


def deep_verdict(with_bn: Sequence[float], without_bn: Sequence[float], threshold: float) -> str:
    """Apply :func:`deep_verdict_rule` to per-seed final test accuracies (NaN fails)."""
    ok_bn = [_or_zero(a) >= threshold for a in with_bn]
    ok_plain = [_or_zero(a) >= threshold for a in without_bn]
    if all(ok_plain) and not any(ok_bn):
        return "contradicted"
    if all(ok_plain):
        return "not supported at this scale"
    if all(ok_bn) and not any(ok_plain):
        return "supported"
    return "mixed"


def _or_zero(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else float(value)


# --------------------------------------------------------------------------- helpers


def gaussian_kernels(model: Sequential, std: float, seed: int) -> None:
    r"""Overwrite every Dense kernel of a built ``model`` in place with draws from :math:`N(0, \mathrm{std}^2)`.

    Dense layer ``i`` (input side first) draws from ``default_rng(seed * 1000 + i)``, so the two
    variants of a seed start from the same kernels.  Biases are left at 0.
    """
    for index, layer in enumerate(layer for layer in model if isinstance(layer, Dense)):
        draw = np.random.default_rng(seed * 1000 + index).standard_normal(layer.kernel.shape)
        layer.kernel[...] = std * draw


def sigmoid_inputs(model: Sequential, x: np.ndarray) -> list[np.ndarray]:
    r"""The input of every Sigmoid layer of ``model`` for the batch ``x``, input side first.

    Without batch norm that is the Dense layer's pre-activation :math:`Wu + b`;
    with batch norm it is the BatchNorm output :math:`\gamma \hat x + \beta`
    that feeds the sigmoid, normalized with the statistics of ``x`` itself (as
    in a training step).  The BatchNorm layers' moving statistics are restored
    afterwards, so the call changes nothing in the model.
    """
    saved = [(l.moving_mean.copy(), l.moving_variance.copy()) for l in model if isinstance(l, BatchNorm) and l.built]
    inputs = []
    h = x
    for layer in model:
        if isinstance(layer, Sigmoid):
            inputs.append(h)
        h = layer(h, training=True)
    for layer, (mean, variance) in zip([l for l in model if isinstance(l, BatchNorm) and l.built], saved):
        layer.moving_mean[...] = mean
        layer.moving_variance[...] = variance
    return inputs


def record_steps(steps: int, every: int) -> list[int]:
    """0, every ``every`` steps, and the last step: where the paper network is evaluated and recorded."""
    return sorted({*range(0, steps + 1, every), steps})


# --------------------------------------------------------------------------- runs
def train_paper(config: dict[str, Any], variant: str, seed: int) -> dict[str, Any]:
    """Train the paper's network once; record accuracy, percentiles of one sigmoid input, saturation.

    ``variant`` is a key of :data:`VARIANTS` (kernels from :math:`N(0, s^2)`) or of :data:`CONTROLS`
    (the Glorot-uniform kernels :func:`companion.training.mlp` draws).
    """
    data = mnist()
    x_eval = data.x_test[: config["eval_size"]]
    model = mlp(config["hidden"], activation="sigmoid", batch_norm={**VARIANTS, **CONTROLS}[variant], seed=seed)
    model.build((None, 28, 28, 1))
    if variant in VARIANTS:
        gaussian_kernels(model, config["init_std"], seed)
    unit, limit = config["unit"], config["saturation"]
    percentiles: list[list[float]] = []
    medians: list[np.ndarray] = []           # every unit of the last hidden layer, per record
    saturated: list[list[float]] = []        # fraction of |input| > limit, per hidden layer, per record

    def record(step: int, net: Sequential) -> None:
        if step % config["record_every"] and step != config["steps"]:
            return
        inputs = [z.astype(np.float64) for z in sigmoid_inputs(net, x_eval)]
        last = inputs[-1]
        percentiles.append([float(v) for v in np.percentile(last[:, unit], PERCENTILES)])
        medians.append(np.median(last, axis=0))
        saturated.append([float(np.mean(np.abs(z) > limit)) for z in inputs])

    record(0, model)
    history = train(
        model, data.x_train, data.y_train, data.x_test, data.y_test,
        steps=config["steps"], batch_size=config["batch_size"], learning_rate=config["learning_rate"],
        seed=seed, eval_every=config["record_every"], on_step=record,
    )
    diverged = bool(history["diverged"])
    n = len(record_steps(config["steps"], config["record_every"]))
    pad = [math.nan] * (n - len(history["test_accuracy"]))
    median_range = np.ptp(np.array(medians), axis=0)     # per unit: max - min of its median over training
    return {
        "test_accuracy_curve": [float(a) for a in history["test_accuracy"]] + pad,
        "train_loss_curve": [float(a) for a in history["train_loss"]] + pad,
        "percentiles": percentiles + [[math.nan] * 3] * (n - len(percentiles)),
        "saturated_fraction": saturated + [[math.nan] * len(config["hidden"])] * (n - len(saturated)),
        "median_range_unit": float(median_range[unit]),
        "median_range_units": float(np.median(median_range)),
        "final_test_accuracy": math.nan if diverged else float(history["final_test_accuracy"]),
        "final_train_accuracy": math.nan if diverged else accuracy(model, data.x_train, data.y_train),
        "diverged": diverged,
    }


def train_deep(config: dict[str, Any], variant: str, seed: int) -> dict[str, Any]:
    """Train the deep sigmoid network once (Glorot-uniform init); record its curves."""
    data = mnist()
    model = mlp(config["deep_hidden"], activation="sigmoid", batch_norm=VARIANTS[variant], seed=seed)
    history = train(
        model, data.x_train, data.y_train, data.x_test, data.y_test,
        steps=config["deep_steps"], batch_size=config["batch_size"], learning_rate=config["learning_rate"],
        seed=seed, eval_every=config["deep_eval_every"],
    )
    diverged = bool(history["diverged"])
    n = len(record_steps(config["deep_steps"], config["deep_eval_every"]))
    pad = [math.nan] * (n - len(history["test_accuracy"]))
    return {
        "test_accuracy_curve": [float(a) for a in history["test_accuracy"]] + pad,
        "train_loss_curve": [float(a) for a in history["train_loss"]] + pad,
        "final_test_accuracy": math.nan if diverged else float(history["final_test_accuracy"]),
        "diverged": diverged,
    }


def run(config: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Both parts for every variant and seed; per-run quantities are lists over seeds."""
    paper: dict[str, Any] = {}
    deep: dict[str, Any] = {}
    with one_blas_thread():
        for variant in VARIANTS:
            runs = [train_paper(config, variant, seed) for seed in seeds]
            paper[variant] = {key: [r[key] for r in runs] for key in runs[0]}
            runs = [train_deep(config, variant, seed) for seed in seeds]
            deep[variant] = {key: [r[key] for r in runs] for key in runs[0]}
        for variant in CONTROLS if config["control"] else ():
            runs = [train_paper(config, variant, seed) for seed in seeds]
            paper[variant] = {key: [r[key] for r in runs] for key in runs[0]}
    with_bn = paper["with_bn"]["final_test_accuracy"]
    without_bn = paper["without_bn"]["final_test_accuracy"]
    deep_with = deep["with_bn"]["final_test_accuracy"]
    deep_without = deep["without_bn"]["final_test_accuracy"]
    layers = "-".join(["784", *map(str, config["hidden"]), "10"])
    headline = {
        "claim": "Batch normalization makes saturating nonlinearities (sigmoid) usable",
        "metric": (
            f"test accuracy (fraction of 1,000 MNIST test digits) of the paper's {layers} sigmoid MLP after "
            f"{config['steps']} SGD steps (lr {config['learning_rate']:g}, batch {config['batch_size']}, "
            f"init N(0, {config['init_std']:g}^2))"
        ),
        "with_bn": summarize(with_bn),
        "without_bn": summarize(without_bn),
        "effect": float(np.nanmean(with_bn) - np.nanmean(without_bn)),
        "effect_definition": "mean final test accuracy with BN minus without BN (fraction; 0.01 = 1 point)",
        "verdict": verdict(with_bn, without_bn, config["margin"]),
        "verdict_rule": verdict_rule(config["margin"]),
    }
    deep["verdict"] = deep_verdict(deep_with, deep_without, config["deep_threshold"])
    deep["verdict_rule"] = deep_verdict_rule(config["deep_threshold"])
    deep["eval_steps"] = record_steps(config["deep_steps"], config["deep_eval_every"])
    return {
        "record_steps": record_steps(config["steps"], config["record_every"]),
        "percentiles": list(PERCENTILES),
        "variants": list(paper),
        "paper": paper,
        "deep": deep,
        "headline": headline,
    }
