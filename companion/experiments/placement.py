r"""Claim: batch norm belongs *before* the nonlinearity (Dense -> BN -> f), not after it (Dense -> f -> BN).

Ioffe & Szegedy (2015, section 3.2) normalize the pre-activation
:math:`x = Wu + b`, because it "is more likely to have a symmetric, non-sparse
distribution, that is 'more Gaussian'" than the layer input :math:`u`, the
output of the previous nonlinearity.  Many practitioners put batch norm after
the nonlinearity instead and report that it works as well or better.

Set-up: the 784-100-100-100-10 MLP of :func:`companion.training.mlp` with
ReLU and with sigmoid hidden units, batch norm ``"before"`` the nonlinearity,
``"after"`` it, or ``"none"`` (a reference), trained on the MNIST subset with
plain SGD (mini-batches of 60) for the same number of steps at two learning
rates.  For one seed, every placement starts from the same kernels (the same
Glorot draws) and sees the same mini-batches, so (before, after) runs are
*paired*.  Recorded per run: the test-accuracy and training-loss curves, the
final test accuracy, the steps to reach ``threshold`` test accuracy, and, on
the test images at the start and the end of training, per hidden layer: the
fraction of nonlinearity inputs where the local gradient :math:`f'(z)` is below
a tenth of its maximum, the root mean square of those inputs, the share of the
next layer's input second moment that is due to its mean, and the skewness of
the batch norm layer's input.  The sigmoid networks have one more arm,
``"before_centered"`` (:data:`EXTRA_ARMS`), which explains a result and does
not enter the verdict.

Headline: per (nonlinearity, learning rate, seed), the difference
before - after of the final test accuracy, in percentage points; "supported"
means that the paper's placement wins every pair by more than ``margin``.
Chapter 13, "Before or after the activation?", runs it.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np

from companion.experiments.common import mnist, one_blas_thread, summarize
from companion.experiments.learning_rates import eval_steps
from companion.layers import BatchNorm
from companion.nn import Dense, ReLU, Sequential, Sigmoid
from companion.training import mlp, train

DESCRIPTION = "Batch norm before the nonlinearity (the paper's placement) beats batch norm after it"

CONFIG_TEST: dict[str, Any] = {
    "hidden": [16, 16],
    "activations": ["relu", "sigmoid"],
    "learning_rates": [0.1, 1.0],
    "steps": 12,
    "batch_size": 60,
    "momentum": 0.0,
    "bn_momentum": 0.99,
    "eval_every": 6,
    "threshold": 0.5,
    "margin": 0.5,
}
CONFIG_CI: dict[str, Any] = {
    "hidden": [100, 100, 100],
    "activations": ["relu", "sigmoid"],
    "learning_rates": [0.1, 1.0],
    "steps": 800,
    "batch_size": 60,
    "momentum": 0.0,
    "bn_momentum": 0.99,
    "eval_every": 50,
    "threshold": 0.9,
    "margin": 0.5,
}
CONFIG_FULL: dict[str, Any] = {**CONFIG_CI, "steps": 5000, "eval_every": 100}

PLACEMENTS = ("none", "before", "after")
"""The ``batch_norm`` arguments of :func:`companion.training.mlp` that are compared."""

EXTRA_ARMS = {"sigmoid": ("before_centered", "before_output_bn")}
"""Arms that test explanations of a result and do not enter the verdict, both variants of ``"before"``:
``"before_centered"`` uses :class:`CenteredSigmoid` (sigmoid - 1/2) instead of the sigmoid, so the
output layer's input has mean ~0; ``"before_output_bn"`` adds a BatchNorm in front of the output
layer, so the output layer sees normalized inputs as in ``"after"``."""


PER_RUN = (
    "final_test_accuracy", "diverged", "steps_run", "steps_to_threshold",
    "test_accuracy_curve", "train_loss_curve",
    "low_gradient_start", "low_gradient_end", "activation_input_rms_start", "activation_input_rms_end",
    "mean_share_start", "mean_share_end", "bn_input_skewness_start", "bn_input_skewness_end",
)
"""The per-run records; ``runs[activation][i_lr][placement][key]`` is a list over seeds."""

LOW_GRADIENT = 0.1
"""A nonlinearity input z has a 'low gradient' when f'(z) < LOW_GRADIENT * max f'."""

SIGMOID_LOW_GRADIENT_Z = math.log((1.0 + math.sqrt(1.0 - LOW_GRADIENT)) / (1.0 - math.sqrt(1.0 - LOW_GRADIENT)))
r"""The :math:`|z|` above which :math:`\sigma'(z) < 0.1 \cdot \sigma'(0)`: :math:`\sigma(1-\sigma) = 0.025` at
:math:`\sigma = (1 - \sqrt{0.9})/2`, i.e. :math:`|z| = \ln\frac{1+\sqrt{0.9}}{1-\sqrt{0.9}} \approx 3.64`."""


class CenteredSigmoid(Sigmoid):
    r"""The sigmoid shifted down by 1/2: :math:`y = \sigma(x) - \tfrac12 = \tfrac12\tanh(x/2)`.

    Same derivative :math:`\sigma(x)(1 - \sigma(x))` as the sigmoid, so it
    saturates where the sigmoid does; only the mean of its output moves to 0
    for inputs symmetric about 0.  The next Dense layer's bias can absorb the
    shift (:math:`W(h - \tfrac12) + b = Wh + (b - \tfrac12 W\mathbf{1})`), so the
    network computes the same set of functions as with the sigmoid.
    """

    def __repr__(self) -> str:
        return "CenteredSigmoid()"

    def _forward(self, x: np.ndarray, training: bool) -> tuple[np.ndarray, Any]:
        y, cache = super()._forward(x, training)
        return (y - 0.5).astype(y.dtype, copy=False), cache


def build(hidden: Sequence[int], activation: str, placement: str, *, momentum: float = 0.99, seed: int = 0) -> Sequential:
    """:func:`companion.training.mlp` for a placement of :data:`PLACEMENTS` or an arm of :data:`EXTRA_ARMS`.

    ``"before_centered"``: ``"before"`` with every :class:`~companion.nn.Sigmoid`
    replaced by a :class:`CenteredSigmoid`; ``"before_output_bn"``: ``"before"``
    with one more BatchNorm in front of the output layer.  Same kernels as
    ``"before"`` for the same seed.
    """
    if placement in ("before_centered", "before_output_bn"):
        if activation != "sigmoid":
            raise ValueError(f"placement {placement!r} needs activation 'sigmoid'; received {activation!r}")
        model = mlp(hidden, activation="sigmoid", batch_norm="before", momentum=momentum, seed=seed)
        if placement == "before_centered":
            model.layers = [CenteredSigmoid() if isinstance(layer, Sigmoid) else layer for layer in model.layers]
        else:
            model.layers.insert(len(model.layers) - 1, BatchNorm(momentum=momentum))
        return model
    return mlp(hidden, activation=activation, batch_norm=placement, momentum=momentum, seed=seed)


def verdict_rule(margin: float) -> str:
    """The verdict rule, in words, with its margin filled in (fixed before any result was seen)."""
    return (
        f"A pair is one (nonlinearity, learning rate, seed): the 'before' and the 'after' network start from "
        f"the same kernels and see the same mini-batches. d = final test accuracy (before) - (after), in "
        f"percentage points. 'before' wins the pair if d > {margin:g}, 'after' wins if d < -{margin:g}, "
        f"otherwise it is a tie; a run that diverged loses to one that did not, and two diverged runs tie. "
        f"'supported' (the paper's placement wins) if 'before' wins every pair; 'contradicted' if 'after' "
        f"wins every pair; otherwise 'mixed' if 'before' wins at least one pair, and 'not supported at this "
        f"scale' if it wins none."
    )


def winner(before: float, after: float, margin: float) -> str:
    """'before', 'after' or 'tie' for one pair of final test accuracies in percent (NaN = diverged)."""
    if math.isnan(before) and math.isnan(after):
        return "tie"
    if math.isnan(after):
        return "before"
    if math.isnan(before):
        return "after"
    tol = 1e-9  # accuracies are multiples of 0.1 point: a difference of exactly `margin` is a tie
    if before - after > margin + tol:
        return "before"
    if after - before > margin + tol:
        return "after"
    return "tie"


def percent(accuracy: float) -> float:
    """An accuracy (fraction) in percent, rounded to 1e-6 so that 0.581 gives 58.1, not 58.099999999999994."""
    return round(100.0 * accuracy, 6)


def verdict(winners: Sequence[str]) -> str:
    """Apply :func:`verdict_rule` to the winners of all pairs."""
    if winners and all(w == "before" for w in winners):
        return "supported"
    if winners and all(w == "after" for w in winners):
        return "contradicted"
    if any(w == "before" for w in winners):
        return "mixed"
    return "not supported at this scale"


def low_gradient_fraction(z: np.ndarray, activation: str) -> float:
    r"""Fraction of the entries of ``z`` (inputs of ``activation``) where f'(z) < 0.1 max f'.

    ReLU: :math:`f'(z) = 0` for :math:`z \le 0` (the unit passes no gradient);
    sigmoid: :math:`|z| >` :data:`SIGMOID_LOW_GRADIENT_Z` (the unit is saturated).
    """
    if activation == "relu":
        return float(np.mean(z <= 0))
    if activation == "sigmoid":
        return float(np.mean(np.abs(z) > SIGMOID_LOW_GRADIENT_Z))
    raise ValueError(f"activation must be 'relu' or 'sigmoid'; received {activation!r}")


def mean_share(h: np.ndarray) -> float:
    r"""Mean over units (columns) of :math:`m_j^2 / (m_j^2 + v_j)`, the share of the second moment due to the mean.

    :math:`m_j` and :math:`v_j` are the mean and the (biased) variance of
    column j over the rows.  0 for zero-mean inputs, 1 for constant non-zero
    ones; columns that are identically 0 are left out (NaN if all are).
    """
    h = np.asarray(h, dtype=np.float64)
    m, v = h.mean(axis=0), h.var(axis=0)
    second = m**2 + v
    keep = second > 0
    return float(np.mean(m[keep] ** 2 / second[keep])) if keep.any() else math.nan


def rms(z: np.ndarray) -> float:
    r"""Mean over units (columns) of the root mean square :math:`\sqrt{E[z_j^2]}` over the rows."""
    z = np.asarray(z, dtype=np.float64)
    return float(np.mean(np.sqrt(np.mean(z**2, axis=0))))


def mean_abs_skewness(x: np.ndarray) -> float:
    r"""Mean over units (columns) of :math:`|E[(x - m)^3]| / v^{3/2}`; constant columns are left out."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    v = np.mean(centred**2, axis=0)
    keep = v > 1e-12
    if not keep.any():
        return math.nan
    return float(np.mean(np.abs(np.mean(centred[:, keep] ** 3, axis=0)) / v[keep] ** 1.5))


def hidden_statistics(model: Sequential, x: np.ndarray, activation: str) -> dict[str, list[float]]:
    """Statistics of every hidden layer of an :func:`companion.training.mlp` on the images ``x``, as one batch.

    Batch norm layers normalize with the statistics of ``x`` (training mode,
    what the network computes while it trains; at step 0 the moving averages
    are still 0 and 1).  The model is copied first, so its moving averages
    are left as they were.

    Returns ``low_gradient`` (:func:`low_gradient_fraction` of each
    nonlinearity's input), ``activation_input_rms`` (:func:`rms` of each
    nonlinearity's input: how far from 0 the units operate), ``mean_share`` (:func:`mean_share` of the input of
    each Dense layer after the first, i.e. of each hidden layer's output) and
    ``bn_input_skewness`` (:func:`mean_abs_skewness` of the input of each
    hidden layer's BatchNorm; NaN without batch norm), one value per hidden
    layer.
    """
    stats: dict[str, list[float]] = {"low_gradient": [], "activation_input_rms": [], "mean_share": [], "bn_input_skewness": []}
    h, seen_dense = x, False
    for layer in copy.deepcopy(model).layers:
        if isinstance(layer, (ReLU, Sigmoid)):
            stats["low_gradient"].append(low_gradient_fraction(h, activation))
            stats["activation_input_rms"].append(rms(h))
        elif isinstance(layer, BatchNorm):
            stats["bn_input_skewness"].append(mean_abs_skewness(h))
        elif isinstance(layer, Dense):
            if seen_dense:
                stats["mean_share"].append(mean_share(h))
            seen_dense = True
        h = layer(h, training=True)
    n_hidden = len(stats["low_gradient"])
    # one value per hidden layer: without batch norm NaN; a BatchNorm in front of the output layer is left out
    stats["bn_input_skewness"] = stats["bn_input_skewness"][:n_hidden] or [math.nan] * n_hidden
    return stats


def steps_to_threshold(steps: Sequence[int], accuracies: Sequence[float], threshold: float) -> float:
    """The first evaluation step whose test accuracy is >= ``threshold``; NaN if none is."""
    for step, acc in zip(steps, accuracies):
        if not math.isnan(acc) and acc >= threshold:
            return float(step)
    return math.nan


def train_one(config: dict[str, Any], activation: str, placement: str, lr: float, seed: int) -> dict[str, Any]:
    """Build and train one network; return its record (the keys of :data:`PER_RUN`)."""
    data = mnist()
    model = build(config["hidden"], activation, placement, momentum=config["bn_momentum"], seed=seed)
    model.build((None, 28, 28, 1))
    start = hidden_statistics(model, data.x_test, activation)
    history = train(
        model, data.x_train, data.y_train, data.x_test, data.y_test,
        steps=config["steps"], batch_size=config["batch_size"], learning_rate=lr,
        momentum=config["momentum"], seed=seed, eval_every=config["eval_every"],
    )
    diverged = bool(history["diverged"])
    n_eval, n_hidden = len(eval_steps(config)), len(config["hidden"])
    if diverged:
        end = {key: [math.nan] * n_hidden for key in start}
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            end = hidden_statistics(model, data.x_test, activation)
    curve = [float(a) for a in history["test_accuracy"]] + [math.nan] * (n_eval - len(history["test_accuracy"]))
    losses = [float(v) for v in history["train_loss"]] + [math.nan] * (n_eval - len(history["train_loss"]))
    return {
        "final_test_accuracy": math.nan if diverged else float(history["final_test_accuracy"]),
        "diverged": diverged,
        "steps_run": len(history["losses"]),
        "steps_to_threshold": steps_to_threshold(history["steps"], history["test_accuracy"], config["threshold"]),
        "test_accuracy_curve": curve,
        "train_loss_curve": losses,
        **{f"{key}_start": value for key, value in start.items()},
        **{f"{key}_end": value for key, value in end.items()},
    }


def per_seed_means(pairs: Sequence[dict[str, Any]], seeds: Sequence[int], side: str) -> list[float]:
    """Per seed, the mean of ``side`` ("before" or "after") over that seed's pairs; NaN if one of them diverged."""
    return [float(np.mean([p[side] for p in pairs if p["seed"] == seed])) for seed in seeds]


def run(config: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Train every (nonlinearity, learning rate, placement, seed); return the records, the pairs and the headline.

    ``runs[activation][i]`` (i indexes ``learning_rates``) maps each placement
    (and each arm of :data:`EXTRA_ARMS`) to ``{key: [value per seed]}`` for
    every key of :data:`PER_RUN`.
    ``pairs`` lists every (nonlinearity, learning rate, seed) with the
    'before' and 'after' final accuracies in percent, their difference and the
    pair's winner (:func:`winner`).
    """
    runs: dict[str, list[dict[str, dict[str, list[Any]]]]] = {}
    with one_blas_thread():
        for activation in config["activations"]:
            runs[activation] = []
            for lr in config["learning_rates"]:
                cell = {}
                for placement in PLACEMENTS + EXTRA_ARMS.get(activation, ()):
                    records = [train_one(config, activation, placement, lr, seed) for seed in seeds]
                    cell[placement] = {key: [r[key] for r in records] for key in PER_RUN}
                runs[activation].append(cell)
    pairs = []
    for activation in config["activations"]:
        for i, lr in enumerate(config["learning_rates"]):
            cell = runs[activation][i]
            for k, seed in enumerate(seeds):
                before = percent(cell["before"]["final_test_accuracy"][k])
                after = percent(cell["after"]["final_test_accuracy"][k])
                pairs.append({
                    "activation": activation, "learning_rate": lr, "seed": seed,
                    "before": before, "after": after, "difference": round(before - after, 6),
                    "winner": winner(before, after, config["margin"]),
                })
    differences = [p["difference"] for p in pairs]
    finite = [d for d in differences if not math.isnan(d)]
    architecture = "-".join(["784", *map(str, config["hidden"]), "10"])
    optimizer = "plain SGD" if config["momentum"] == 0 else f"SGD with momentum {config['momentum']:g}"
    activations = " and ".join({"relu": "ReLU", "sigmoid": "sigmoid"}[a] for a in config["activations"])
    rates = ", ".join(f"{lr:g}" for lr in config["learning_rates"])
    n_conditions = len(config["activations"]) * len(config["learning_rates"])
    headline = {
        "claim": "Batch norm works better before the nonlinearity (Dense -> BN -> f, the paper's placement) "
                 "than after it (Dense -> f -> BN)",
        "metric": (
            f"final test accuracy (%) of a {architecture} MLP trained with {optimizer} (batch "
            f"{config['batch_size']}) for {config['steps']} steps, per seed the mean over the {n_conditions} "
            f"conditions ({activations} units x learning rates {rates}); 'with_bn' = BN before the "
            f"nonlinearity, 'without_bn' = BN after it"
        ),
        "with_bn": summarize(per_seed_means(pairs, seeds, "before")),
        "without_bn": summarize(per_seed_means(pairs, seeds, "after")),
        "effect": float(np.mean(finite)) if finite else math.nan,
        "effect_definition": (
            "mean over all (nonlinearity, learning rate, seed) pairs of the final test accuracy with BN before "
            "the nonlinearity minus with BN after it, in percentage points (positive: the paper's placement wins)"
        ),
        "winners": [p["winner"] for p in pairs],
        "verdict": verdict([p["winner"] for p in pairs]),
        "verdict_rule": verdict_rule(config["margin"]),
    }
    return {
        "activations": list(config["activations"]),
        "learning_rates": [float(lr) for lr in config["learning_rates"]],
        "placements": list(PLACEMENTS),
        "extra_arms": {a: list(EXTRA_ARMS[a]) for a in config["activations"] if a in EXTRA_ARMS},
        "eval_steps": eval_steps(config),
        "runs": runs,
        "pairs": pairs,
        "headline": headline,
    }
