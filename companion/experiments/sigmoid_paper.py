r"""Claim (5): batch normalization makes saturating nonlinearities (the
sigmoid) usable.

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

*A deep sigmoid network*: ``deep_hidden`` sigmoid layers (8 of 100 units),
with the package's default Glorot-uniform initialization, with and without
batch norm.

The claims (:func:`measures`), each the final test accuracy with batch
norm minus without, in points, paired by seed: the paper's network from
the paper's small Gaussian initialization; the same network from Glorot
kernels (a control: does batch norm still matter when the initialization
is good?); and the deep sigmoid network.  Chapter 12, "Saturating
nonlinearities and the paper's MNIST experiment", runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from companion.layers import keep_moving_statistics
from companion.nn import Dense, Sequential, Sigmoid
from companion.seeding import KERNELS, rng
from companion.stats import Claim
from companion.training import accuracy, mlp, train

__all__ = [
    "CONFIG_CI",
    "CONFIG_FULL",
    "CONFIG_TEST",
    "DESCRIPTION",
    "EXPECTED_CI",
    "PERCENTILES",
    "gaussian_kernels",
    "measures",
    "record_steps",
    "run",
    "sigmoid_inputs",
    "train_deep",
    "train_paper",
]

DESCRIPTION = (
    "Batch norm makes sigmoid networks trainable: the paper's MNIST "
    "experiment (Figure 1), a Glorot control and a deep sigmoid MLP"
)

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
    "margin_points": 2.0,
    "deep_hidden": [16, 16, 16, 16],
    "deep_steps": 20,
    "deep_eval_every": 10,
    "deep_margin_points": 10.0,
    "control": True,
    "twins": True,
}
CONFIG_CI: dict[str, Any] = {
    **CONFIG_TEST,
    "hidden": [100, 100, 100],
    "steps": 1000,
    "record_every": 100,
    "eval_size": 1000,
    "deep_hidden": [100] * 8,
    "deep_steps": 500,
    "deep_eval_every": 100,
    "control": True,
    "twins": False,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "steps": 50000,
    "record_every": 500,
    "deep_steps": 10000,
    "deep_eval_every": 500,
    "twins": True,
}

EXPECTED_CI = {
    "paper_init": "supported",
    "glorot_init": "supported",
    "deep": "supported",
}
"""What chapter 12 states for the CI-scale run (and ``make robustness``
checks with other seeds)."""

PERCENTILES = (15, 50, 85)
"""The percentiles of Figure 1 (b, c)."""
VARIANTS = {"without_bn": "none", "with_bn": "before"}
"""Each variant's ``batch_norm`` argument of :func:`companion.training.mlp`."""
INITS = ("paper", "glorot")
"""The paper network's initializations: N(0, init_std^2), or Glorot."""
TWINNED = ("paper/without_bn", "glorot/without_bn", "deep/without_bn")
"""The runs that get a one-ulp twin when ``config["twins"]``."""


# ---------------------------------------------------------------- helpers


def gaussian_kernels(model: Sequential, std: float, seed: int) -> None:
    r"""Overwrite every Dense kernel of a built ``model`` with :math:`N(0,
    \mathrm{std}^2)` draws.

    Dense layer ``i`` (input side first) draws from the stream ``(seed,
    KERNELS, i)``, so the two variants of a seed start from the same
    kernels.  Biases are left at 0.
    """
    dense = [layer for layer in model if isinstance(layer, Dense)]
    for index, layer in enumerate(dense):
        assert layer.kernel is not None
        draw = rng(seed, KERNELS, index).standard_normal(layer.kernel.shape)
        layer.kernel[...] = std * draw


def sigmoid_inputs(model: Sequential, x: np.ndarray) -> list[np.ndarray]:
    r"""The input of every Sigmoid layer of ``model`` for the batch ``x``,
    input side first.

    Without batch norm that is the Dense layer's pre-activation :math:`Wu + b`;
    with batch norm it is the BatchNorm output :math:`\gamma \hat x + \beta`
    that feeds the sigmoid, normalized with the statistics of ``x`` itself (as
    in a training step).  The BatchNorm layers' moving statistics are restored
    afterwards, so the call changes nothing in the model.
    """
    inputs = []
    h = x
    with keep_moving_statistics(model):
        for layer in model:
            if isinstance(layer, Sigmoid):
                inputs.append(h)
            h = layer(h, training=True)
    return inputs


def record_steps(steps: int, every: int) -> list[int]:
    """0, every ``every`` steps, and the last step: the evaluation points."""
    return sorted({*range(0, steps + 1, every), steps})


# ------------------------------------------------------------------- runs
def train_paper(
    config: Mapping[str, Any],
    init: str,
    variant: str,
    seed: int,
    *,
    twin: bool = False,
) -> dict[str, Any]:
    """Train the paper's network once; record accuracy, sigmoid inputs,
    saturation.

    ``init`` is ``"paper"`` (kernels from :math:`N(0, s^2)`,
    :func:`gaussian_kernels`) or ``"glorot"`` (the Glorot-uniform kernels
    :func:`companion.training.mlp` draws).  The record adds, at every
    evaluation: ``percentiles`` (the {15, 50, 85}th percentiles of the
    input of sigmoid ``unit`` of the last hidden layer over the first
    ``eval_size`` test images), ``saturated_fraction`` (per hidden layer,
    the fraction of sigmoid inputs with abs(x) > ``saturation``); and
    ``median_range_unit`` / ``median_range_units`` (how far the median
    input of that unit, and of the layer's typical unit, moved during
    training) and ``final_train_accuracy``.
    """
    data = mnist(seed)
    x_eval = data.x_test[: config["eval_size"]]
    model = mlp(
        config["hidden"],
        activation="sigmoid",
        batch_norm=VARIANTS[variant],
        seed=seed,
    )
    model.build((None, 28, 28, 1))
    if init == "paper":
        gaussian_kernels(model, config["init_std"], seed)
    if twin:
        perturb_ulp(model)
    unit, limit = config["unit"], config["saturation"]
    percentiles: list[list[float]] = []
    medians: list[np.ndarray] = []
    saturated: list[list[float]] = []

    def on_step(step: int, net: Sequential) -> None:
        if step % config["record_every"] and step != config["steps"]:
            return
        inputs = [z.astype(np.float64) for z in sigmoid_inputs(net, x_eval)]
        last = inputs[-1]
        percentiles.append(
            [float(v) for v in np.percentile(last[:, unit], PERCENTILES)]
        )
        medians.append(np.median(last, axis=0))
        saturated.append([float(np.mean(np.abs(z) > limit)) for z in inputs])

    with np.errstate(over="ignore", invalid="ignore"):
        on_step(0, model)
        history = train(
            model,
            *data,
            steps=config["steps"],
            batch_size=config["batch_size"],
            learning_rate=config["learning_rate"],
            seed=seed,
            eval_every=config["record_every"],
            on_step=on_step,
        )
    diverged = bool(history["diverged"])
    moved = np.ptp(np.array(medians), axis=0)  # per unit, over training
    return record(
        history,
        percentiles=percentiles,
        saturated_fraction=saturated,
        median_range_unit=float(moved[unit]),
        median_range_units=float(np.median(moved)),
        final_train_accuracy=None
        if diverged
        else accuracy(model, data.x_train, data.y_train),
    )


def train_deep(
    config: Mapping[str, Any], variant: str, seed: int, *, twin: bool = False
) -> dict[str, Any]:
    """Train the deep sigmoid network once (Glorot-uniform init)."""
    data = mnist(seed)
    model = mlp(
        config["deep_hidden"],
        activation="sigmoid",
        batch_norm=VARIANTS[variant],
        seed=seed,
    )
    model.build((None, 28, 28, 1))
    if twin:
        perturb_ulp(model)
    history = train(
        model,
        *data,
        steps=config["deep_steps"],
        batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        seed=seed,
        eval_every=config["deep_eval_every"],
    )
    return record(history)


def measures(config: Mapping[str, Any]) -> list[Measure]:
    """The chapter's claims, stated before the runs, and their effects."""
    layers = "-".join(["784", *map(str, config["hidden"]), "10"])
    deep = "-".join(["784", *map(str, config["deep_hidden"]), "10"])
    paper = (
        f"final test accuracy of the paper's {layers} sigmoid MLP after "
        f"{config['steps']} SGD steps (learning rate "
        f"{config['learning_rate']:g}, batch {config['batch_size']})"
    )

    def gain(prefix: str) -> Any:
        return lambda acc: (
            100.0 * (acc[f"{prefix}/with_bn"] - acc[f"{prefix}/without_bn"])
        )

    out = [
        Measure(
            Claim(
                "paper_init",
                "Batch norm makes a sigmoid network train (the paper's "
                "MNIST experiment, its small Gaussian initialization)",
                f"{paper}, init N(0, {config['init_std']:g}^2): with BN "
                "minus without BN",
                "points",
                config["margin_points"],
            ),
            gain("paper"),
        )
    ]
    if config["control"]:
        out.append(
            Measure(
                Claim(
                    "glorot_init",
                    "... also from a good initialization (Glorot)",
                    f"{paper}, Glorot-uniform init: with BN minus without BN",
                    "points",
                    config["margin_points"],
                    role="control",
                ),
                gain("glorot"),
            )
        )
    out.append(
        Measure(
            Claim(
                "deep",
                "Batch norm makes a deep sigmoid network train",
                f"final test accuracy of a {deep} sigmoid MLP (Glorot init) "
                f"after {config['deep_steps']} SGD steps: with BN minus "
                "without BN",
                "points",
                config["deep_margin_points"],
            ),
            gain("deep"),
        )
    )
    return out


def run(config: Mapping[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Both parts for every variant and seed; judge the claims.

    Run names: ``"paper/with_bn"``, ``"glorot/without_bn"``,
    ``"deep/with_bn"``, ...  Returns ``record_steps``, ``deep_eval_steps``,
    ``percentiles``, ``runs`` (per seed, ``{run name: record}``),
    ``verdicts`` and ``noise``.
    """
    inits = INITS if config["control"] else INITS[:1]
    twins = config["twins"]
    runs: list[dict[str, Any]] = []
    with one_blas_thread():
        for seed in seeds:
            per_seed: dict[str, Any] = {}
            for variant in VARIANTS:
                for init in inits:
                    name = f"{init}/{variant}"
                    per_seed[name] = train_paper(config, init, variant, seed)
                    if twins and name in TWINNED:
                        per_seed[name + TWIN] = train_paper(
                            config, init, variant, seed, twin=True
                        )
                name = f"deep/{variant}"
                per_seed[name] = train_deep(config, variant, seed)
                if twins and name in TWINNED:
                    per_seed[name + TWIN] = train_deep(
                        config, variant, seed, twin=True
                    )
            runs.append(per_seed)
    claims = measures(config)
    return {
        "record_steps": record_steps(config["steps"], config["record_every"]),
        "deep_eval_steps": record_steps(
            config["deep_steps"], config["deep_eval_every"]
        ),
        "percentiles": list(PERCENTILES),
        "runs": runs,
        "verdicts": verdicts(claims, runs),
        "noise": noise(claims, runs) if twins else None,
    }
