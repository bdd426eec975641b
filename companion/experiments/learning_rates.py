r"""Claim (2): batch normalization allows (much) higher learning rates.

Set-up: a 784-100-100-100-10 ReLU MLP (:func:`companion.training.mlp`) with and
without batch norm (``"before"`` the ReLU, the paper's placement) is trained on
the MNIST subset with plain SGD (no momentum, so the learning rate *is* the
step size) for the same number of steps, at every learning rate of a log grid
(:math:`10^{-3}` to :math:`10` at CI scale).  For one seed, every learning
rate and both variants start from the same kernels (the same Glorot draws)
and see the same mini-batches, so the learning rate and the batch norm layers
are the only differences.  Recorded per learning rate and seed: final test
accuracy, whether training diverged (non-finite loss or loss > 1e3), the
test-accuracy and training-loss curves, and the mean squared norm of every
Dense layer's weight vectors (one per unit) along training, from which the
*effective* learning rate :math:`\eta / \lVert w \rVert^2` of a scale-invariant
layer follows.

Headline: per seed, the largest learning rate of the grid that still *trains*
(final test accuracy >= ``threshold`` without diverging) with batch norm,
divided by the same without.  Chapter 09, "Higher learning rates", runs it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from companion.experiments.common import mnist, one_blas_thread, summarize
from companion.nn import Dense, Sequential
from companion.training import mlp, train

DESCRIPTION = "Batch norm raises the largest learning rate at which an MLP still trains on MNIST"

CONFIG_TEST: dict[str, Any] = {
    "hidden": [16, 16],
    "log10_lr_min": -2.0,
    "log10_lr_max": 1.0,
    "n_lrs": 3,
    "steps": 20,
    "batch_size": 60,
    "momentum": 0.0,
    "eval_every": 10,
    "threshold": 0.5,
    "ratio": 3.0,
}
CONFIG_CI: dict[str, Any] = {
    "hidden": [100, 100, 100],
    "log10_lr_min": -3.0,
    "log10_lr_max": 1.0,
    "n_lrs": 9,
    "steps": 1000,
    "batch_size": 60,
    "momentum": 0.0,
    "eval_every": 100,
    "threshold": 0.9,
    "ratio": 3.0,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "log10_lr_max": 1.5,
    "n_lrs": 19,
    "steps": 4000,
    "eval_every": 200,
}

VARIANTS = {"without_bn": "none", "with_bn": "before"}
"""Each variant's ``batch_norm`` argument of :func:`companion.training.mlp`."""

PER_RUN = (
    "final_test_accuracy", "final_train_loss", "diverged", "trained", "steps_run",
    "test_accuracy_curve", "train_loss_curve", "sq_norm_curve",
)
"""The per-run records, each stored as a list over seeds of lists over learning rates."""


def verdict_rule(threshold: float, factor: float) -> str:
    """The verdict rule, in words, with its numbers filled in (fixed before any result was seen)."""
    return (
        f"A learning rate 'trains' a network when the run does not diverge and its final test accuracy is "
        f">= {threshold:g}. Per seed, r = (largest grid learning rate that trains with BN) / (the same "
        f"without BN); r is undefined when a variant trains at no grid learning rate, and an undefined r "
        f"supports nothing. 'supported' if r >= {factor:g} on every seed; 'contradicted' if r <= 1 on every "
        f"seed; otherwise 'mixed' if some seed has r >= {factor:g}, and 'not supported at this scale' if none has."
    )


def learning_rates(config: dict[str, Any]) -> list[float]:
    """The grid ``logspace(log10_lr_min, log10_lr_max, n_lrs)`` as floats."""
    return [float(v) for v in np.logspace(config["log10_lr_min"], config["log10_lr_max"], config["n_lrs"])]


def grid_step_decades(config: dict[str, Any]) -> float:
    """Distance between neighbouring grid learning rates, in decades (powers of ten)."""
    return (config["log10_lr_max"] - config["log10_lr_min"]) / max(config["n_lrs"] - 1, 1)


def eval_steps(config: dict[str, Any]) -> list[int]:
    """The steps at which :func:`companion.training.train` evaluates: 0, every ``eval_every``, the last."""
    return sorted({*range(0, config["steps"] + 1, config["eval_every"]), config["steps"]})


def sq_norms(model: Sequential) -> list[float]:
    r"""Mean squared norm of the weight vectors of every Dense layer, input side first.

    A Dense kernel :math:`K` (in, out) holds one weight vector :math:`w_j`
    (a column) per unit; the value is :math:`\frac{1}{\text{out}}\sum_j
    \lVert w_j\rVert^2`, computed in float64 (NaN if not finite).
    """
    values = []
    for layer in model:
        if isinstance(layer, Dense):
            with np.errstate(over="ignore", invalid="ignore"):
                value = float(np.sum(np.square(layer.kernel, dtype=np.float64)) / layer.kernel.shape[1])
            values.append(value if math.isfinite(value) else math.nan)
    return values


def largest_trained(lrs: Sequence[float], trained: Sequence[bool]) -> float:
    """The largest learning rate whose run trained; NaN if none did."""
    ok = [lr for lr, t in zip(lrs, trained) if t]
    return max(ok) if ok else math.nan


def smallest_trained(lrs: Sequence[float], trained: Sequence[bool]) -> float:
    """The smallest learning rate whose run trained; NaN if none did."""
    ok = [lr for lr, t in zip(lrs, trained) if t]
    return min(ok) if ok else math.nan


def best(lrs: Sequence[float], accuracies: Sequence[float]) -> tuple[float, float]:
    """(best final test accuracy, its learning rate) over the grid, NaN (diverged) ignored; ties to the smaller rate."""
    finite = [(a, lr) for lr, a in zip(lrs, accuracies) if not math.isnan(a)]
    if not finite:
        return math.nan, math.nan
    top = max(a for a, _ in finite)
    return top, min(lr for a, lr in finite if a == top)


def verdict(ratios: Sequence[float], factor: float) -> str:
    """Apply :func:`verdict_rule` to the per-seed ratios r (NaN = undefined)."""
    tol = 1e-9
    if all(not math.isnan(r) and r >= factor - tol for r in ratios):
        return "supported"
    if all(not math.isnan(r) and r <= 1 + tol for r in ratios):
        return "contradicted"
    if any(not math.isnan(r) and r >= factor - tol for r in ratios):
        return "mixed"
    return "not supported at this scale"


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean of the finite values (NaN if there are none)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.exp(np.mean(np.log(finite)))) if finite else math.nan




def train_one(config: dict[str, Any], variant: str, lr: float, seed: int) -> dict[str, Any]:
    """Build and train one network at learning rate ``lr``; return its record (see :data:`PER_RUN`)."""
    data = mnist()
    model = mlp(config["hidden"], batch_norm=VARIANTS[variant], seed=seed)
    model.build((None, 28, 28, 1))
    checkpoints = set(eval_steps(config))
    norms = [sq_norms(model)]

    def record(step: int, model: Sequential) -> None:
        if step in checkpoints:
            norms.append(sq_norms(model))

    history = train(
        model, data.x_train, data.y_train, data.x_test, data.y_test,
        steps=config["steps"], batch_size=config["batch_size"], learning_rate=lr,
        momentum=config["momentum"], seed=seed, eval_every=config["eval_every"], on_step=record,
    )
    diverged = bool(history["diverged"])
    final = math.nan if diverged else float(history["final_test_accuracy"])
    n_eval, n_dense = len(checkpoints), len(norms[0])

    def pad(values: list[Any], fill: Any) -> list[Any]:
        return list(values) + [fill] * (n_eval - len(values))

    return {
        "final_test_accuracy": final,
        "final_train_loss": math.nan if diverged else float(history["train_loss"][-1]),
        "diverged": diverged,
        "trained": bool(not diverged and final >= config["threshold"]),
        "steps_run": len(history["losses"]),
        "test_accuracy_curve": pad([float(a) for a in history["test_accuracy"]], math.nan),
        "train_loss_curve": pad([float(v) for v in history["train_loss"]], math.nan),
        "sq_norm_curve": pad(norms, [math.nan] * n_dense),
    }


def run(config: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Train every (variant, learning rate, seed); return per-run records, per-seed summaries and the headline.

    ``results[variant][key]`` is a list over seeds of lists over learning
    rates for every key of :data:`PER_RUN`; ``largest_trained_lr``,
    ``smallest_trained_lr``, ``best_accuracy`` and ``best_lr`` are lists over
    seeds, and ``ratio`` (with BN / without BN largest trained rate) too.
    """
    lrs = learning_rates(config)
    out: dict[str, Any] = {}
    with one_blas_thread():
        for variant in VARIANTS:
            records = [[train_one(config, variant, lr, seed) for lr in lrs] for seed in seeds]
            side = {key: [[r[key] for r in row] for row in records] for key in PER_RUN}
            side["largest_trained_lr"] = [largest_trained(lrs, t) for t in side["trained"]]
            side["smallest_trained_lr"] = [smallest_trained(lrs, t) for t in side["trained"]]
            tops = [best(lrs, a) for a in side["final_test_accuracy"]]
            side["best_accuracy"] = [a for a, _ in tops]
            side["best_lr"] = [lr for _, lr in tops]
            out[variant] = side
    with_bn, without_bn = out["with_bn"]["largest_trained_lr"], out["without_bn"]["largest_trained_lr"]
    ratios = [b / n if not (math.isnan(b) or math.isnan(n)) else math.nan for b, n in zip(with_bn, without_bn)]
    architecture = "-".join(["784", *map(str, config["hidden"]), "10"])
    optimizer = "plain SGD" if config["momentum"] == 0 else f"SGD with momentum {config['momentum']:g}"
    headline = {
        "claim": "Batch normalization allows (much) higher learning rates",
        "metric": (
            f"largest learning rate of the grid 10^{config['log10_lr_min']:g}..10^{config['log10_lr_max']:g} "
            f"({config['n_lrs']} rates, {grid_step_decades(config):g} decade apart) at which a {architecture} "
            f"ReLU MLP trained with {optimizer} for {config['steps']} steps reaches >= {config['threshold']:.0%} "
            f"test accuracy without diverging (learning rate, dimensionless)"
        ),
        "with_bn": summarize(with_bn),
        "without_bn": summarize(without_bn),
        "ratio": ratios,
        "effect": geometric_mean(ratios),
        "effect_definition": (
            "geometric mean over seeds of r = largest trained learning rate with BN / without BN (a factor)"
        ),
        "verdict": verdict(ratios, config["ratio"]),
        "verdict_rule": verdict_rule(config["threshold"], config["ratio"]),
    }
    return {
        "learning_rates": lrs,
        "grid_step_decades": grid_step_decades(config),
        "eval_steps": eval_steps(config),
        "variants": list(VARIANTS),
        **out,
        "headline": headline,
    }
