r"""One training step from one shared state in the TF1, Keras, numpy models.

Chapter 6 compares the three implementations of :mod:`companion.tf_models`
step by step rather than trajectory by trajectory.  Two free-running float32
trajectories drift apart: now and then a value sits within round-off of a
ReLU's threshold, one implementation switches the unit on and the other
off, and momentum SGD amplifies the difference step after step.  So at every
step :func:`step_parity` copies the *reference* model's weights **and**
optimizer slots into every other model, lets each take one step on the same
batch and compares what each computed:

* the gradient of every trainable array and the update of every array
  (the weights after the step minus before, moving statistics included),
  as :math:`\max|a - a_\text{ref}| / \max|a_\text{ref}|` per array, the
  largest over the arrays;
* where a difference exceeds ``tolerance``, the ReLU decisions: how many
  units are active in one model and inactive in the reference
  (``relu_outputs(...) > 0``), a *flip*.

Two arrays get their own rules.  A conv bias followed by batch norm has an
exact gradient of 0 (chapter 6): its computed gradient is round-off, whose
largest magnitude is reported instead.  TF1's fused kernel feeds the moving
variance the unbiased batch variance: its update is compared with the
reference's update turned into the unbiased one,

.. math::

    \Delta_\text{fused} = \Delta + \frac{\Delta + (1 - \rho)\, v}{m - 1},

for a momentum :math:`\rho`, old moving variance :math:`v` and
:math:`m = N H W` values per channel (from
:math:`\Delta = (1 - \rho)(\sigma_B^2 - v)`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from companion.tf_models import (
    BN_MOMENTUM,
    INPUT_SHAPE,
    TF1Graph,
    get_slots,
    get_weights,
    relu_outputs,
    set_slots,
    set_weights,
    sgd_step,
    weight_names,
)

__all__ = ["Difference", "pre_bn_biases", "relative_difference", "step_parity"]


class Difference(NamedTuple):
    """How one model's step differs from the reference's (one batch)."""

    gradient: float
    """Largest relative difference of a gradient (pre-BN biases aside)."""
    update: float
    """Largest relative difference of an update (pre-BN biases aside)."""
    flips: int
    """ReLU units active in one model and inactive in the other; counted
    only when ``gradient`` or ``update`` exceeds the tolerance of
    :func:`step_parity` (0 otherwise)."""
    zero_gradient: float
    """Largest absolute gradient of a conv bias followed by batch norm (0
    in exact arithmetic), relative to the largest gradient entry of its
    conv kernel."""


def relative_difference(a: np.ndarray, ref: np.ndarray) -> float:
    r""":math:`\max|a - ref| / \max|ref|` (the absolute difference if
    ``ref`` is all zeros)."""
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(np.asarray(a, np.float64) - ref).max())
    return diff / scale if scale > 0 else diff


def pre_bn_biases(names: list[str]) -> list[str]:
    """The weight names of conv biases that feed a batch norm layer."""
    layers = {name.split("/")[0] for name in names}
    return [
        f"{layer}/bias"
        for layer in sorted(layers)
        if f"{layer}_bn" in layers and f"{layer}/bias" in names
    ]


def _fused(model: Any) -> bool:
    return isinstance(model, TF1Graph) and model.fused is not False


def _values_per_channel(x: np.ndarray, layer: str) -> int:
    """m = N H W: the values per channel that the batch norm ``layer`` sees."""
    index = int(layer.removesuffix("_bn").removeprefix("conv"))
    side = INPUT_SHAPE[0] >> (index - 1)  # "same" convs, 2x2 pools
    return int(x.shape[0]) * side * side


def _flips(model: Any, ref: Any, state: list[np.ndarray], x: Any) -> int:
    """ReLU decisions that differ between ``model`` and ``ref`` at ``state``.

    Both are put back into ``state`` for the forward pass, then restored.
    """
    count = 0
    saved = [get_weights(m) for m in (model, ref)]
    try:
        outputs = []
        for m in (model, ref):
            set_weights(m, state)
            outputs.append(relu_outputs(m, x))
        for key, value in outputs[1].items():
            count += int(
                np.count_nonzero((outputs[0][key] > 0) != (value > 0))
            )
    finally:
        for m, weights in zip((model, ref), saved, strict=True):
            set_weights(m, weights)
    return count


def step_parity(
    models: Mapping[str, Any],
    optimizers: Mapping[str, Any],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    start: list[np.ndarray],
    *,
    reference: str,
    tolerance: float = 1e-4,
) -> list[dict[str, Difference]]:
    """Compare every model's step with the reference's, batch by batch.

    Parameters
    ----------
    models
        Name -> a model of :mod:`companion.tf_models` (same architecture).
    optimizers
        Name -> its optimizer (None for a TF1 graph), same learning rate
        and momentum everywhere.
    batches
        The (images, labels) batches, one step each.
    start
        The reference's initial weights (Keras order); its slots start at 0.
    reference
        The model whose trajectory is followed.
    tolerance
        A step whose largest relative difference exceeds it gets its ReLU
        decisions compared (an extra forward pass of both models).

    Returns
    -------
    list of dict
        Per batch, model name -> :class:`Difference` (the reference left
        out).
    """
    ref_model, ref_opt = models[reference], optimizers[reference]
    names = weight_names(ref_model)
    trainable = [n for n in names if "/moving_" not in n]
    zero = set(pre_bn_biases(names))
    set_weights(ref_model, start)
    set_slots(
        ref_model,
        ref_opt,
        [
            np.zeros_like(w)
            for n, w in zip(names, start, strict=True)
            if n in trainable
        ],
    )
    results = []
    for xb, yb in batches:
        state = get_weights(ref_model)
        slots = get_slots(ref_model, ref_opt)
        for name, model in models.items():
            if name != reference:
                set_weights(model, state)
                set_slots(model, optimizers[name], slots)
        grads, updates = {}, {}
        for name, model in models.items():
            step = sgd_step(model, xb, yb, optimizers[name])
            grads[name] = dict(zip(trainable, step.gradients, strict=True))
            after = get_weights(model)
            updates[name] = {
                n: a.astype(np.float64) - s
                for n, a, s in zip(names, after, state, strict=True)
            }
        ref_g, ref_u = grads[reference], updates[reference]
        row = {}
        for name in models:
            if name == reference:
                continue
            worst_g = max(
                relative_difference(grads[name][n], ref_g[n])
                for n in trainable
                if n not in zero
            )
            worst_u = 0.0
            for i, n in enumerate(names):
                if n in zero:
                    continue
                expected = ref_u[n]
                if _fused(models[name]) and n.endswith("/moving_variance"):
                    m = _values_per_channel(xb, n.split("/")[0])
                    old = state[i].astype(np.float64)
                    expected = ref_u[n] + (
                        ref_u[n] + (1 - BN_MOMENTUM) * old
                    ) / (m - 1)
                worst_u = max(
                    worst_u, relative_difference(updates[name][n], expected)
                )
            flips = 0
            if max(worst_g, worst_u) > tolerance:
                flips = _flips(models[name], ref_model, state, xb)
            zero_g = max(
                (
                    float(np.abs(grads[name][b]).max())
                    / float(np.abs(ref_g[b.replace("bias", "kernel")]).max())
                    for b in zero
                ),
                default=0.0,
            )
            row[name] = Difference(worst_g, worst_u, flips, zero_g)
        results.append(row)
    return results
