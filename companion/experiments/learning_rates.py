r"""Higher learning rates: does batch norm let an MLP train with larger steps?
(Chapter 9.)

Set-up: a 784-100-100-100-10 ReLU MLP (:func:`companion.training.mlp`)
with and without batch norm (``"before"`` the ReLU, the paper's placement)
is trained on the MNIST subset with plain SGD (no momentum, so the learning
rate *is* the step size) for the same number of steps, at every learning
rate of a log grid.  For one seed, every learning rate and both variants
start from the same kernels and see the same mini-batches (and the same
split), so the learning rate and the batch norm layers are the only
differences.  Recorded per run: the standard record
(:func:`companion.experiments.common.record`) and the mean squared norm of
every Dense layer's weight vectors along training, from which the
*effective* learning rate :math:`\eta / \lVert w \rVert^2` of a
scale-invariant layer follows.

A learning rate *trains* a network when the run does not diverge and
reaches ``threshold`` test accuracy.  The claims (:func:`measures`): the
largest grid rate that trains, with BN over without, in decades; each
variant's best accuracy over the grid; and the steps each variant needs,
at its own best rate, to reach ``threshold`` ("so does it train faster?").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from companion.experiments.common import (
    TWIN,
    Measure,
    mnist,
    noise,
    one_blas_thread,
    perturb_ulp,
    record,
    verdicts,
)
from companion.nn import Dense, Sequential
from companion.stats import DIVERGED_ACCURACY, Claim
from companion.training import mlp, train

__all__ = [
    "CONFIG_CI",
    "CONFIG_FULL",
    "CONFIG_TEST",
    "DESCRIPTION",
    "EXPECTED_CI",
    "VARIANTS",
    "best_rate",
    "grid_step_decades",
    "largest_trained",
    "learning_rates",
    "measures",
    "run",
    "run_name",
    "sq_norms",
    "steps_to",
    "train_one",
]

DESCRIPTION = (
    "Batch norm raises the largest learning rate at which an MLP still "
    "trains on MNIST"
)

CONFIG_TEST: dict[str, Any] = {
    "hidden": [16, 16],
    "log10_lr_min": -2.0,
    "log10_lr_max": 1.0,
    "n_lrs": 3,
    "steps": 20,
    "batch_size": 60,
    "eval_every": 10,
    "threshold": 0.5,
    "margin_decades": 0.5,
    "margin_points": 1.0,
    "margin_steps_decades": 0.3,
    "twins": True,
}
CONFIG_CI: dict[str, Any] = {
    **CONFIG_TEST,
    "hidden": [100, 100, 100],
    "log10_lr_min": -2.0,
    "log10_lr_max": 1.0,
    "n_lrs": 7,
    "steps": 600,
    "eval_every": 50,
    "threshold": 0.9,
    "twins": False,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "log10_lr_min": -3.0,
    "log10_lr_max": 1.5,
    "n_lrs": 19,
    "steps": 4000,
    "eval_every": 100,
    "twins": True,
}

EXPECTED_CI = {
    "largest_rate": "supported",
    "best_accuracy": "inconclusive",
    "time_to_threshold": "inconclusive",
}
"""What chapter 9 states for the CI-scale run (and ``make robustness``
checks with other seeds)."""

VARIANTS = {"without_bn": "none", "with_bn": "before"}
"""Each variant's ``batch_norm`` argument of :func:`companion.training.mlp`."""

TWINNED = ("without_bn",)
"""The variant whose runs get a one-ulp twin: the one that diverges."""


def learning_rates(config: Mapping[str, Any]) -> list[float]:
    """The grid ``logspace(log10_lr_min, log10_lr_max, n_lrs)`` as floats."""
    grid = np.logspace(
        config["log10_lr_min"], config["log10_lr_max"], config["n_lrs"]
    )
    return [float(v) for v in grid]


def grid_step_decades(config: Mapping[str, Any]) -> float:
    """Distance between neighbouring grid learning rates, in decades."""
    span = config["log10_lr_max"] - config["log10_lr_min"]
    return float(span / max(config["n_lrs"] - 1, 1))


def run_name(variant: str, index: int) -> str:
    """The name of a run: ``"with_bn/lr3"`` is the fourth rate of the grid."""
    return f"{variant}/lr{index}"


def sq_norms(model: Sequential) -> list[float | None]:
    r"""Mean squared norm of the weight vectors of every Dense layer.

    A Dense kernel :math:`K` (in, out) holds one weight vector
    :math:`w_j` (a column) per unit; the value is
    :math:`\frac{1}{\text{out}}\sum_j \lVert w_j\rVert^2`, in float64
    (None if not finite).  Input side first.
    """
    values: list[float | None] = []
    for layer in model:
        if isinstance(layer, Dense):
            assert layer.kernel is not None
            with np.errstate(over="ignore", invalid="ignore"):
                total = np.sum(np.square(layer.kernel, dtype=np.float64))
            value = float(total / layer.kernel.shape[1])
            values.append(value if math.isfinite(value) else None)
    return values


def train_one(
    config: Mapping[str, Any],
    variant: str,
    lr: float,
    seed: int,
    *,
    twin: bool = False,
) -> dict[str, Any]:
    """Build and train one network at learning rate ``lr``; return its record.

    The record adds ``sq_norm_curve``: :func:`sq_norms` at every
    evaluation step (None after a divergence).  ``twin=True`` starts from
    kernels one ulp larger.
    """
    data = mnist(seed)
    model = mlp(config["hidden"], batch_norm=VARIANTS[variant], seed=seed)
    model.build((None, 28, 28, 1))
    if twin:
        perturb_ulp(model)
    norms = [sq_norms(model)]

    def on_step(step: int, net: Sequential) -> None:
        if step % config["eval_every"] == 0 or step == config["steps"]:
            norms.append(sq_norms(net))

    history = train(
        model,
        *data,
        steps=config["steps"],
        batch_size=config["batch_size"],
        learning_rate=lr,
        seed=seed,
        eval_every=config["eval_every"],
        on_step=on_step,
    )
    return record(history, sq_norm_curve=norms)


def largest_trained(
    accuracies: Mapping[str, float],
    variant: str,
    lrs: Sequence[float],
    threshold: float,
    step: float,
) -> float:
    """log10 of the largest grid rate at which ``variant`` trains.

    When it trains at no rate of the grid, one grid step below the grid's
    smallest rate: "below the grid" (a diverged run scores chance, below
    any threshold, so it never trains).
    """
    trained = [
        math.log10(lr)
        for i, lr in enumerate(lrs)
        if accuracies[run_name(variant, i)] >= threshold
    ]
    return max(trained, default=math.log10(lrs[0]) - step)


def best_rate(accuracies: Mapping[str, float], variant: str, n: int) -> int:
    """Index of the grid rate with the highest accuracy (ties: the smaller)."""
    values = [accuracies[run_name(variant, i)] for i in range(n)]
    return int(np.argmax(values))


def steps_to(run: Mapping[str, Any], threshold: float, never: float) -> float:
    """First evaluation step with test accuracy >= ``threshold`` (at least 1).

    ``never`` when the run never gets there (or diverged first): a run
    that misses the threshold counts as reaching it just after the budget.
    A run already there at step 0 counts as step 1, so that ratios of
    steps stay finite.
    """
    pairs = zip(run["eval_steps"], run["test_accuracy"], strict=False)
    return next(
        (max(float(s), 1.0) for s, a in pairs if a >= threshold), never
    )


def measures(config: Mapping[str, Any]) -> list[Measure]:
    """The chapter's claims, stated before the runs, and their effects."""
    lrs, step = learning_rates(config), grid_step_decades(config)
    threshold, n = config["threshold"], config["n_lrs"]
    arch = "-".join(["784", *map(str, config["hidden"]), "10"])
    setting = (
        f"a {arch} ReLU MLP, {config['steps']} plain-SGD steps, grid "
        f"10^{config['log10_lr_min']:g}..10^{config['log10_lr_max']:g} "
        f"({n} rates, {step:g} decade apart)"
    )

    def largest_rate(acc: Mapping[str, float]) -> float:
        return largest_trained(
            acc, "with_bn", lrs, threshold, step
        ) - largest_trained(acc, "without_bn", lrs, threshold, step)

    def best_accuracy(acc: Mapping[str, float]) -> float:
        best = {v: acc[run_name(v, best_rate(acc, v, n))] for v in VARIANTS}
        return 100.0 * (best["with_bn"] - best["without_bn"])

    never = float(config["steps"] + config["eval_every"])

    def time_to_threshold(runs: Mapping[str, Any]) -> float:
        steps = {}
        for v in VARIANTS:
            names = [run_name(v, i) for i in range(n)]
            acc = {name: _accuracy(runs[name]) for name in names}
            best = runs[run_name(v, best_rate(acc, v, n))]
            steps[v] = steps_to(best, threshold, never)
        return math.log10(steps["without_bn"] / steps["with_bn"])

    return [
        Measure(
            Claim(
                "largest_rate",
                "Batch norm allows (much) higher learning rates",
                f"log10 of (largest rate reaching {threshold:.0%} test "
                f"accuracy without diverging, with BN / without BN); "
                f"{setting}",
                "decades",
                config["margin_decades"],
            ),
            largest_rate,
        ),
        Measure(
            Claim(
                "best_accuracy",
                "... and with it a better network",
                "best final test accuracy over the grid, with BN minus "
                f"without BN; {setting}",
                "points",
                config["margin_points"],
            ),
            best_accuracy,
        ),
        Measure(
            Claim(
                "time_to_threshold",
                "... that trains faster",
                f"log10 of (steps to {threshold:.0%} test accuracy without "
                "BN / with BN), each at its best rate of the grid (first "
                f"evaluation, every {config['eval_every']} steps; a run "
                f"that never gets there counts as {never:g}); {setting}",
                "decades",
                config["margin_steps_decades"],
            ),
            time_to_threshold,
            kind="records",
        ),
    ]


def _accuracy(run: Mapping[str, Any]) -> float:
    value = run["final_test_accuracy"]
    return DIVERGED_ACCURACY if value is None else float(value)


def run(config: Mapping[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Train every (variant, learning rate, seed); judge the claims.

    Returns
    -------
    dict
        ``learning_rates``, ``grid_step_decades``, ``runs`` (per seed,
        ``{run name: record}``), ``verdicts`` and ``noise``.
    """
    lrs = learning_rates(config)
    runs: list[dict[str, Any]] = []
    with one_blas_thread():
        for seed in seeds:
            per_seed: dict[str, Any] = {}
            for variant in VARIANTS:
                for i, lr in enumerate(lrs):
                    name = run_name(variant, i)
                    per_seed[name] = train_one(config, variant, lr, seed)
                    if config["twins"] and variant in TWINNED:
                        per_seed[name + TWIN] = train_one(
                            config, variant, lr, seed, twin=True
                        )
            runs.append(per_seed)
    claims = measures(config)
    return {
        "learning_rates": lrs,
        "grid_step_decades": grid_step_decades(config),
        "runs": runs,
        "verdicts": verdicts(claims, runs),
        "noise": noise(claims, runs) if config["twins"] else None,
    }
