r"""Gradient flow: does batch norm let deeper networks train?  (Chapter 8.)

The claim, as tutorials state it: batch normalization improves the flow of
gradients through a deep network, so deeper networks train.  The set-up:
fully connected networks of ``depth`` hidden layers of ``width`` units on
the MNIST subset, ReLU or sigmoid, each without batch norm (``"none"``) or
with batch norm before every nonlinearity (``"before"``, the paper's
placement), all from Keras's default Glorot-uniform initialization (what
tutorials use).  ReLU networks without batch norm get a third arm,
``"none_he"``: He initialization, :math:`W \sim N(0, 2/n_\text{in})`, the
one derived for ReLU (He et al. 2015), so that "batch norm" is not
credited with what a correct initialization does.  Everything else is held
fixed: plain SGD (a layer's update is exactly ``learning_rate`` times the
gradient measured here), learning rate, batch size, number of steps, and
the seed, which fixes the split, the Glorot kernels (identical in every
arm) and the order of the mini-batches.

Measured, per run: the Frobenius norm :math:`\lVert \partial L/\partial
W_l \rVert` of every Dense kernel's gradient on the first and on the last
mini-batch, the test-accuracy curve, the final per-image correctness and,
for batch-normalized runs, the final accuracy with batch statistics (to
see whether lagging moving averages cost accuracy).

The claims (:func:`measures`) compare the deepest network that trains --
reaches ``trained_threshold`` test accuracy -- in two arms, in layers.
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
from companion.training import evaluate, mlp, train

__all__ = [
    "CONFIG_CI",
    "CONFIG_FULL",
    "CONFIG_TEST",
    "DESCRIPTION",
    "EXPECTED_CI",
    "arms",
    "build",
    "deepest_trained",
    "he_normal",
    "kernel_gradient_norms",
    "measures",
    "run",
    "run_name",
    "train_once",
]

DESCRIPTION = (
    "Batch norm improves gradient flow so deeper networks train: gradient "
    "norms per layer and the deepest MLP that trains, with and without BN"
)

CONFIG_TEST: dict[str, Any] = {
    "width": 16,
    "depths": [1, 3],
    "activations": ["relu", "sigmoid"],
    "steps": 12,
    "batch_size": 60,
    "learning_rate": 0.1,
    "eval_every": 6,
    "trained_threshold": 0.5,
    "margin_layers": 1.0,
    "he_baseline": True,
    "twins": True,
}
CONFIG_CI: dict[str, Any] = {
    **CONFIG_TEST,
    "width": 100,
    "depths": [2, 5, 10, 20],
    "steps": 300,
    "eval_every": 50,
    "margin_layers": 5.0,
    "he_baseline": False,
    "twins": False,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "depths": [2, 5, 10, 20, 30, 50],
    "steps": 2000,
    "eval_every": 100,
    "he_baseline": True,
    "twins": True,
}

EXPECTED_CI = {
    "relu_depth": "supported",
    "sigmoid_depth": "supported",
}
"""What chapter 8 states for the CI-scale run (and ``make robustness``
checks with other seeds)."""

TWINNED = ("relu/none", "relu/none_he", "sigmoid/before")
"""Arms whose runs get a one-ulp twin when ``config["twins"]``: the arm of
each claim whose accuracy lies nearest the threshold."""


def arms(activation: str, he_baseline: bool = True) -> list[str]:
    """The arms of ``activation``: none, before (and none_he for ReLU when
    ``he_baseline``)."""
    he = activation == "relu" and he_baseline
    return ["none", "before"] + (["none_he"] if he else [])


def run_name(activation: str, arm: str, depth: int) -> str:
    """The name of a run in ``results["runs"]``, e.g. ``"relu/before/d20"``."""
    return f"{activation}/{arm}/d{depth}"


def he_normal(model: Sequential, seed: int) -> None:
    r"""Overwrite the Dense kernels of a built ``model`` with He-normal draws.

    :math:`W \sim N(0, 2/n_\text{in})`, layer ``i`` from the stream
    ``(seed, KERNELS, i)``: with ReLU, the mean square of the signal is the
    same in every layer (chapter 8, section 1).
    """
    dense = [layer for layer in model if isinstance(layer, Dense)]
    for index, layer in enumerate(dense):
        assert layer.kernel is not None
        fan_in = layer.kernel.shape[0]
        draw = rng(seed, KERNELS, index).standard_normal(layer.kernel.shape)
        layer.kernel[...] = np.sqrt(2.0 / fan_in) * draw


def build(
    depth: int, activation: str, arm: str, seed: int, width: int
) -> Sequential:
    """The network of one arm, built for MNIST images."""
    batch_norm = "before" if arm == "before" else "none"
    model = mlp(
        [width] * depth,
        activation=activation,
        batch_norm=batch_norm,
        seed=seed,
    )
    model.build((None, 28, 28, 1))
    if arm == "none_he":
        he_normal(model, seed)
    return model


def kernel_gradient_norms(model: Sequential) -> list[float]:
    r""":math:`\lVert \partial L/\partial W_l \rVert_F` of every Dense kernel,
    input side first.

    Reads the ``grads`` the last ``model.backward`` left in the layers.
    The norm is computed in float64: the gradients of a deep sigmoid
    network are representable in float32 (entries of 1e-33 at 50 layers),
    but the sum of their squares is not.
    """
    return [
        float(np.linalg.norm(layer.grads["kernel"].astype(np.float64)))
        for layer in model
        if isinstance(layer, Dense)
    ]


def train_once(
    depth: int,
    activation: str,
    arm: str,
    seed: int,
    config: Mapping[str, Any],
    *,
    twin: bool = False,
) -> dict[str, Any]:
    """Build and train one network; return its record.

    The record (:func:`companion.experiments.common.record`) adds
    ``grad_norm_init`` and ``grad_norm_final`` (kernel-gradient norms on
    the first and the last mini-batch, input side first; None if the run
    diverged before) and, with batch norm, ``batchstat_accuracy`` (final
    test accuracy with the statistics of each batch of ``batch_size``
    test images instead of the moving averages).  ``twin=True`` starts
    from kernels one ulp larger.
    """
    data = mnist(seed)
    model = build(depth, activation, arm, seed, config["width"])
    if twin:
        perturb_ulp(model)
    steps = config["steps"]
    recorded: dict[int, list[float]] = {}

    def on_step(step: int, net: Sequential) -> None:
        if step in (1, steps):
            recorded[step] = kernel_gradient_norms(net)

    history = train(
        model,
        *data,
        steps=steps,
        batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        seed=seed,
        eval_every=config["eval_every"],
        on_step=on_step,
        desc=f"{run_name(activation, arm, depth)} seed {seed}",
    )
    extra: dict[str, Any] = {
        "grad_norm_init": recorded.get(1),
        "grad_norm_final": None
        if history["diverged"]
        else recorded.get(steps),
    }
    if arm == "before":
        extra["batchstat_accuracy"] = (
            None
            if history["diverged"]
            else evaluate(
                model,
                data.x_test,
                data.y_test,
                training=True,
                chunk=config["batch_size"],
            ).accuracy
        )
    return record(history, **extra)


def deepest_trained(
    accuracies: Mapping[str, float],
    activation: str,
    arm: str,
    depths: Sequence[int],
    threshold: float,
) -> int:
    """The largest depth whose run reaches ``threshold`` test accuracy (0 if
    none).
    """
    reached = [
        d
        for d in depths
        if accuracies[run_name(activation, arm, d)] >= threshold
    ]
    return max(reached, default=0)


def measures(config: Mapping[str, Any]) -> list[Measure]:
    """The chapter's claims, stated before the runs, and their effects."""
    depths, threshold = list(config["depths"]), config["trained_threshold"]
    margin = config["margin_layers"]
    metric = (
        f"deepest network (of {depths} hidden layers of "
        f"{config['width']}) reaching {threshold:.0%} test accuracy after "
        f"{config['steps']} plain-SGD steps"
    )

    def depth_gain(activation: str, arm_a: str, arm_b: str) -> Any:
        def effect(acc: Mapping[str, float]) -> float:
            a = deepest_trained(acc, activation, arm_a, depths, threshold)
            b = deepest_trained(acc, activation, arm_b, depths, threshold)
            return float(a - b)

        return effect

    out = [
        Measure(
            Claim(
                "relu_depth",
                "Batch norm lets deeper ReLU networks train "
                "(Glorot initialization in both arms)",
                f"{metric}: with BN minus without BN",
                "layers",
                margin,
            ),
            depth_gain("relu", "before", "none"),
        ),
        Measure(
            Claim(
                "relu_depth_he",
                "... also against a ReLU network without BN initialized "
                "for ReLU (He)",
                f"{metric}: with BN (Glorot) minus without BN (He)",
                "layers",
                margin,
                role="control",
            ),
            depth_gain("relu", "before", "none_he"),
        ),
        Measure(
            Claim(
                "sigmoid_depth",
                "Batch norm lets deeper sigmoid networks train",
                f"{metric}: with BN minus without BN",
                "layers",
                margin,
            ),
            depth_gain("sigmoid", "before", "none"),
        ),
    ]
    return [m for m in out if _uses_known_arms(m, config)]


def _uses_known_arms(measure: Measure, config: Mapping[str, Any]) -> bool:
    activation = measure.claim.key.split("_")[0]
    if measure.claim.key == "relu_depth_he" and not config["he_baseline"]:
        return False
    return activation in config["activations"]


def run(config: Mapping[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Train every (activation, arm, depth, seed); judge the claims.

    Returns
    -------
    dict
        ``runs`` (per seed, ``{run name: record}``), ``verdicts``,
        ``noise`` (the one-ulp twins' effect on each claim; None without
        twins) and ``deepest_trained`` (per arm, a list over seeds).
    """
    depths = list(config["depths"])
    runs: list[dict[str, Any]] = []
    with one_blas_thread():
        for seed in seeds:
            per_seed: dict[str, Any] = {}
            for activation in config["activations"]:
                for arm in arms(activation, config["he_baseline"]):
                    twin = config["twins"] and f"{activation}/{arm}" in TWINNED
                    for depth in depths:
                        name = run_name(activation, arm, depth)
                        per_seed[name] = train_once(
                            depth, activation, arm, seed, config
                        )
                        if twin:
                            per_seed[name + TWIN] = train_once(
                                depth, activation, arm, seed, config, twin=True
                            )
            runs.append(per_seed)
    claims = measures(config)
    threshold = config["trained_threshold"]
    deepest = {
        f"{activation}/{arm}": [
            deepest_trained(
                {
                    k: math.nan
                    if r["final_test_accuracy"] is None
                    else r["final_test_accuracy"]
                    for k, r in per_seed.items()
                },
                activation,
                arm,
                depths,
                threshold,
            )
            for per_seed in runs
        ]
        for activation in config["activations"]
        for arm in arms(activation, config["he_baseline"])
    }
    return {
        "runs": runs,
        "verdicts": verdicts(claims, runs),
        "noise": noise(claims, runs) if config["twins"] else None,
        "deepest_trained": deepest,
    }
