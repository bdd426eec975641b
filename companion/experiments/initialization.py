r"""Less dependence on initialization: over how many decades of weight scale
does an MLP train?  (Chapter 10.)

Set-up (the weight-scale experiment of CS231n's batch-norm assignment, on
MNIST and with plain SGD): a 784-100-100-100-100-10 ReLU MLP
(:func:`companion.training.mlp`) is built with and without batch norm
(``"before"`` the ReLU); then every Dense kernel, the output layer's
included, is overwritten with :math:`W = s\,Z`, :math:`Z_{ij} \sim N(0,
1)`, for weight scales :math:`s` on a log grid from :math:`10^{-3}` to
:math:`10`.  For one seed the same :math:`Z`, split and mini-batch order
are used at every scale and in every variant, so the weight scale is the
only thing that changes along the grid.  With ``control=True`` a third
variant, ``"with_bn_default_output"``, scales only the hidden kernels and
keeps the output layer at its Glorot initialization, to separate the
output layer's scale from the hidden layers'.

A scale *works* when the run reaches ``threshold`` test accuracy.  The
*working range* of a variant is the span, in decades, between the
smallest and the largest working scale of the grid (0 when fewer than two
scales work).  The claims (:func:`measures`) compare working ranges.
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
from companion.seeding import KERNELS, rng
from companion.stats import Claim
from companion.training import mlp, train

__all__ = [
    "BATCH_NORM",
    "CONFIG_CI",
    "CONFIG_FULL",
    "CONFIG_TEST",
    "CONTROL",
    "DESCRIPTION",
    "EXPECTED_CI",
    "dense_layers",
    "draw_kernels",
    "grid_step_decades",
    "measures",
    "run",
    "run_name",
    "train_one",
    "variants",
    "weight_scales",
    "working_range",
]

DESCRIPTION = (
    "Batch norm widens the range of weight-initialization scales at which "
    "an MLP trains on MNIST"
)

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
    "twins": True,
}
CONFIG_CI: dict[str, Any] = {
    **CONFIG_TEST,
    "hidden": [100, 100, 100, 100],
    "n_scales": 9,
    "steps": 400,
    "eval_every": 100,
    "control": False,
    "twins": False,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "n_scales": 17,
    "steps": 3000,
    "eval_every": 250,
    "control": True,
    "twins": True,
}

EXPECTED_CI = {"working_range": "supported"}
"""What chapter 10 states for the CI-scale run (and ``make robustness``
checks with other seeds)."""

CONTROL = "with_bn_default_output"
"""Control variant: batch norm, hidden kernels drawn at scale s, output
layer left at its Glorot initialization."""
BATCH_NORM = {"without_bn": "none", "with_bn": "before", CONTROL: "before"}
"""Each variant's ``batch_norm`` argument of :func:`companion.training.mlp`."""
TWINNED = ("without_bn",)
"""The variant whose runs get a one-ulp twin when ``config["twins"]``."""


def variants(config: Mapping[str, Any]) -> list[str]:
    """without_bn, with_bn and, with ``config["control"]``, the control."""
    return ["without_bn", "with_bn"] + ([CONTROL] if config["control"] else [])


def weight_scales(config: Mapping[str, Any]) -> list[float]:
    """The grid ``logspace(log10_scale_min, log10_scale_max, n_scales)``."""
    grid = np.logspace(
        config["log10_scale_min"],
        config["log10_scale_max"],
        config["n_scales"],
    )
    return [float(s) for s in grid]


def grid_step_decades(config: Mapping[str, Any]) -> float:
    """Distance between neighbouring grid scales, in decades."""
    span = config["log10_scale_max"] - config["log10_scale_min"]
    return float(span / max(config["n_scales"] - 1, 1))


def run_name(variant: str, index: int) -> str:
    """The name of a run: ``"with_bn/s2"`` is the third scale of the grid."""
    return f"{variant}/s{index}"


def dense_layers(model: Sequential) -> list[Dense]:
    """The model's Dense layers, input side first."""
    return [layer for layer in model if isinstance(layer, Dense)]


def draw_kernels(
    model: Sequential, scale: float, seed: int, *, skip_output: bool = False
) -> None:
    r"""Overwrite the Dense kernels of a built ``model`` with :math:`s\,Z`,
    :math:`Z \sim N(0, 1)`.

    Layer ``i`` draws its :math:`Z` from the stream ``(seed, KERNELS, i)``,
    so for one seed every scale gets the same directions and differs only
    in size.  ``skip_output=True`` leaves the last Dense layer as it was.
    """
    layers = dense_layers(model)
    if skip_output:
        layers = layers[:-1]
    for index, layer in enumerate(layers):
        assert layer.kernel is not None
        z = rng(seed, KERNELS, index).standard_normal(layer.kernel.shape)
        layer.kernel[...] = scale * z


def train_one(
    config: Mapping[str, Any],
    variant: str,
    scale: float,
    seed: int,
    *,
    twin: bool = False,
) -> dict[str, Any]:
    """Build, initialize at ``scale`` and train one network; return its record.

    The record adds ``initial_loss`` (the first mini-batch's loss; None
    when the run diverged on its first step, i.e. that loss was not finite
    or above :data:`companion.training.DIVERGENCE_LOSS`) and
    ``hidden_change`` / ``output_change``: :math:`\\lVert W_T - W_0
    \\rVert / \\lVert W_0 \\rVert`, the mean over the hidden kernels and
    the output kernel's (None if the run diverged).
    """
    data = mnist(seed)
    model = mlp(config["hidden"], batch_norm=BATCH_NORM[variant], seed=seed)
    model.build((None, 28, 28, 1))
    draw_kernels(model, scale, seed, skip_output=variant == CONTROL)
    if twin:
        perturb_ulp(model)
    initial = [layer.kernel.copy() for layer in dense_layers(model)]  # type: ignore[union-attr]
    history = train(
        model,
        *data,
        steps=config["steps"],
        batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        seed=seed,
        eval_every=config["eval_every"],
    )
    diverged = bool(history["diverged"])
    change = [
        float(np.linalg.norm(layer.kernel - w0) / np.linalg.norm(w0))
        for layer, w0 in zip(dense_layers(model), initial, strict=True)
    ]
    first = history["losses"][0] if history["losses"] else math.nan
    return record(
        history,
        initial_loss=first if math.isfinite(first) else None,
        hidden_change=None if diverged else float(np.mean(change[:-1])),
        output_change=None if diverged else change[-1],
    )


def working_range(
    accuracies: Mapping[str, float],
    variant: str,
    scales: Sequence[float],
    threshold: float,
) -> float:
    """Decades between the smallest and the largest scale that work (0 if < 2
    do).
    """
    works = [
        math.log10(s)
        for i, s in enumerate(scales)
        if accuracies[run_name(variant, i)] >= threshold
    ]
    return max(works) - min(works) if len(works) >= 2 else 0.0


def measures(config: Mapping[str, Any]) -> list[Measure]:
    """The chapter's claims, stated before the runs, and their effects."""
    scales, threshold = weight_scales(config), config["threshold"]
    arch = "-".join(["784", *map(str, config["hidden"]), "10"])
    setting = (
        f"working range: decades between the smallest and the largest "
        f"initial weight scale s of the grid 10^{config['log10_scale_min']:g}"
        f"..10^{config['log10_scale_max']:g} ({config['n_scales']} scales) "
        f"at which a {arch} ReLU MLP reaches {threshold:.0%} test accuracy "
        f"after {config['steps']} SGD steps"
    )

    def gain(a: str, b: str) -> Any:
        def effect(acc: Mapping[str, float]) -> float:
            return working_range(acc, a, scales, threshold) - working_range(
                acc, b, scales, threshold
            )

        return effect

    out = [
        Measure(
            Claim(
                "working_range",
                "Batch norm reduces the dependence on weight initialization",
                f"{setting}; with BN minus without BN",
                "decades",
                config["margin_decades"],
            ),
            gain("with_bn", "without_bn"),
        )
    ]
    if config["control"]:
        out.append(
            Measure(
                Claim(
                    "output_layer",
                    "... and what is left of the dependence is the output "
                    "layer, which batch norm does not normalize",
                    f"{setting}; with BN and the output layer at its Glorot "
                    "initialization minus with BN",
                    "decades",
                    config["margin_decades"],
                    role="control",
                ),
                gain(CONTROL, "with_bn"),
                twinned=False,  # only the runs without BN have twins
            )
        )
    return out


def run(config: Mapping[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Train every (variant, weight scale, seed); judge the claims.

    Returns
    -------
    dict
        ``weight_scales``, ``grid_step_decades``, ``variants``, ``runs``
        (per seed, ``{run name: record}``), ``verdicts``, ``noise`` and
        ``working_range`` (per variant, a list over seeds).
    """
    scales = weight_scales(config)
    runs: list[dict[str, Any]] = []
    with one_blas_thread():
        for seed in seeds:
            per_seed: dict[str, Any] = {}
            for variant in variants(config):
                for i, scale in enumerate(scales):
                    name = run_name(variant, i)
                    per_seed[name] = train_one(config, variant, scale, seed)
                    if config["twins"] and variant in TWINNED:
                        per_seed[name + TWIN] = train_one(
                            config, variant, scale, seed, twin=True
                        )
            runs.append(per_seed)
    claims = measures(config)
    threshold = config["threshold"]
    ranges = {
        variant: [
            working_range(
                {k: _acc(r) for k, r in per_seed.items()},
                variant,
                scales,
                threshold,
            )
            for per_seed in runs
        ]
        for variant in variants(config)
    }
    return {
        "weight_scales": scales,
        "grid_step_decades": grid_step_decades(config),
        "variants": variants(config),
        "runs": runs,
        "verdicts": verdicts(claims, runs),
        "noise": noise(claims, runs) if config["twins"] else None,
        "working_range": ranges,
    }


def _acc(run: Mapping[str, Any]) -> float:
    value = run["final_test_accuracy"]
    return math.nan if value is None else float(value)
