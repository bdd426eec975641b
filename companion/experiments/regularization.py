r"""Claim (4): batch normalization regularizes, through the noise of its batch
statistics.

Ioffe & Szegedy (2015) write that batch norm "also acts as a regularizer, in
some cases eliminating the need for Dropout" (abstract): with it "the
training network no longer producing deterministic values for a given
training example", an effect they found "advantageous to the generalization
of the network" (section 3.4).  Chapter 11, "A regularizer?", runs this
module.

Set-up: a ReLU MLP (784-256-256-10 at full scale) that can fit the 4,000
MNIST training digits perfectly is trained with plain SGD for a fixed number
of epochs, from the same Glorot kernels and on the same mini-batches for a
given seed (which also fixes the split), in eight runs:

* ``none``, ``bn``, ``dropout``, ``bn_dropout`` at the paper's batch size 60
  (learning rate 0.1): with or without batch norm (``"before"`` the ReLU) and
  with or without inverted dropout after every hidden ReLU (:class:`Dropout`,
  written here because the package has none);
* ``none_small``, ``bn_small``, ``none_large``, ``bn_large``: the same
  without/with batch norm at a 4x smaller and a 4x larger batch, with the
  learning rate scaled in proportion to the batch size (the linear scaling
  rule) and the same number of epochs, so that SGD's own noise scale
  :math:`\eta/B` and the distance travelled (:math:`\eta \times` steps) are
  the same and the size of the batch statistics' noise is what changes.

Every ``eval_every_epochs`` the full training and test sets are evaluated in
inference mode (moving statistics, dropout off): cross-entropy and accuracy.
The batch-norm runs without dropout are also evaluated with *batch*
statistics of their training batch size.  The claims (:func:`measures`):
test accuracy with batch norm minus without at the same budget; how much
batch norm shrinks the loss gap (test loss minus training loss); batch
norm against dropout; and, as a control of the explanation, whether the
shrinking is larger at small batches, where batch statistics are noisier.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from companion._validation import describe
from companion.base import Layer
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
from companion.nn import ReLU, Sequential
from companion.seeding import DROPOUT, derive_seed
from companion.stats import Claim
from companion.training import evaluate, mlp, train

__all__ = [
    "CONFIG_CI",
    "CONFIG_FULL",
    "CONFIG_TEST",
    "DESCRIPTION",
    "EXPECTED_CI",
    "RUNS",
    "Dropout",
    "at_train_loss",
    "batch_size_and_learning_rate",
    "build_model",
    "eval_epochs",
    "gap_shrink",
    "measures",
    "run",
    "train_one",
]

DESCRIPTION = (
    "Batch norm regularizes: higher test accuracy and a smaller train-test "
    "gap than without it (and dropout)"
)

CONFIG_TEST: dict[str, Any] = {
    "hidden": [16, 16],
    "n_train": 480,
    "epochs": 2,
    "eval_every_epochs": 1,
    "batch_size": 60,
    "small_batch": 15,
    "large_batch": 240,
    "learning_rate": 0.1,
    "dropout_rate": 0.5,
    "bn_momentum": 0.99,
    "matched_train_loss": 0.05,
    "margin_points": 1.0,
    "margin_gap_nats": 0.02,
    "batch_arms": True,
    "twins": True,
}
CONFIG_CI: dict[str, Any] = {
    **CONFIG_TEST,
    "hidden": [128, 128],
    "n_train": 4000,
    "epochs": 20,
    "eval_every_epochs": 2,
    "batch_arms": False,
    "twins": False,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "hidden": [256, 256],
    "epochs": 60,
    "eval_every_epochs": 3,
    "batch_arms": True,
    "twins": True,
}

EXPECTED_CI = {
    "test_accuracy": "inconclusive",
    "loss_gap": "inconclusive",
    "replaces_dropout": "inconclusive",
}
"""What chapter 11 states for the CI-scale run (and ``make robustness``
checks with other seeds)."""

RUNS: dict[str, tuple[str, bool, str]] = {
    "none": ("none", False, "batch_size"),
    "bn": ("before", False, "batch_size"),
    "dropout": ("none", True, "batch_size"),
    "bn_dropout": ("before", True, "batch_size"),
    "none_small": ("none", False, "small_batch"),
    "bn_small": ("before", False, "small_batch"),
    "none_large": ("none", False, "large_batch"),
    "bn_large": ("before", False, "large_batch"),
}
"""Run name -> (``batch_norm`` argument of :func:`companion.training.mlp`,
dropout?, config key of the batch size)."""

TWINNED = ("none", "bn")
"""The runs that get a one-ulp twin when ``config["twins"]``."""
BATCH_ARMS = ("none_small", "bn_small", "none_large", "bn_large")
"""The runs at other batch sizes, trained when ``config["batch_arms"]``."""


def run_names(config: Mapping[str, Any]) -> list[str]:
    """The runs of :data:`RUNS` that ``config`` trains."""
    return [n for n in RUNS if config["batch_arms"] or n not in BATCH_ARMS]


# ---------------------------------------------------------------------------
# dropout
class _DropoutCache(NamedTuple):
    mask: np.ndarray | None
    """The scaled keep-mask (0 or 1/(1-rate)) of the last training call; None
    in inference mode.
    """
    output_shape: tuple[int, ...]


class Dropout(Layer):
    r"""Inverted dropout: :math:`y = x \odot m`, :math:`m_i = [u_i \ge p] / (1
    - p)`, :math:`u_i \sim U(0, 1)`.

    In training mode every element is kept with probability :math:`1 - p`
    and scaled by :math:`1/(1-p)`, so :math:`E[y] = x`; in inference mode the
    layer is the identity.  Backward: :math:`dx = dy \odot m` (the identity
    after an inference call).  A fresh mask is drawn from the layer's own
    ``np.random.default_rng(seed)`` at every training call unless
    ``fixed_mask`` is set (a 0/1 keep-array the shape of the input, for
    gradient checks).  Chapter 11 compares it with batch norm.

    Parameters
    ----------
    rate : float in [0, 1)
        The probability :math:`p` of dropping an element.
    seed : int or None
    """

    def __init__(self, rate: float, seed: int | None = None) -> None:
        super().__init__()
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float, np.floating))
            or not 0 <= rate < 1
        ):
            raise ValueError(
                f"rate must be a float in [0, 1); received {describe(rate)}"
            )
        self.rate = float(rate)
        self.seed = seed
        self.fixed_mask: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"Dropout(rate={self.rate:g})"

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, _DropoutCache]:
        if not training or self.rate == 0.0:
            return x, _DropoutCache(None, x.shape)
        if self.fixed_mask is not None:
            keep = np.asarray(self.fixed_mask, dtype=bool)
            if keep.shape != x.shape:
                raise ValueError(
                    f"fixed_mask has shape {keep.shape}; expected the "
                    f"input's shape {x.shape}"
                )
        else:
            keep = self._rng.random(x.shape) >= self.rate
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.rate))
        return x * mask, _DropoutCache(mask, x.shape)

    def _backward(
        self, dy: np.ndarray, cache: _DropoutCache
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return (dy if cache.mask is None else dy * cache.mask), {}


# --------------------------------------------------------------- models
def build_model(config: Mapping[str, Any], run: str, seed: int) -> Sequential:
    """The network of ``run``: :func:`companion.training.mlp`, plus a
    :class:`Dropout` after every hidden ReLU (layer ``i``'s masks from the
    stream ``(seed, DROPOUT, i)``)."""
    batch_norm, dropout, _ = RUNS[run]
    base = mlp(
        config["hidden"],
        batch_norm=batch_norm,
        momentum=config["bn_momentum"],
        seed=seed,
    )
    if not dropout:
        return base
    layers: list[Layer] = []
    for layer in base:
        layers.append(layer)
        if isinstance(layer, ReLU):
            stream = derive_seed(seed, DROPOUT, len(layers))
            layers.append(Dropout(config["dropout_rate"], seed=stream))
    return Sequential(layers)


def batch_size_and_learning_rate(
    config: Mapping[str, Any], run: str
) -> tuple[int, float]:
    """The run's batch size B and learning rate ``learning_rate * B /
    batch_size`` (the linear scaling rule)."""
    batch = int(config[RUNS[run][2]])
    return batch, config["learning_rate"] * batch / config["batch_size"]


def at_train_loss(
    train_loss: Sequence[float], values: Sequence[float], level: float
) -> float:
    """``values`` where ``train_loss`` first reaches ``level``.

    Interpolated linearly in log training loss between evaluations; NaN
    when the curve never gets to ``level``; the first value when it
    starts there.
    """
    for k, loss in enumerate(train_loss):
        if math.isnan(loss):
            return math.nan
        if loss <= level:
            if k == 0:
                return float(values[0])
            hi, lo = math.log(train_loss[k - 1]), math.log(loss)
            t = (hi - math.log(level)) / (hi - lo)
            return float(values[k - 1] + t * (values[k] - values[k - 1]))
    return math.nan


def eval_epochs(config: Mapping[str, Any]) -> list[int]:
    """The epochs after which the full sets are evaluated: 0, every
    ``eval_every_epochs``, the last."""
    epochs, every = config["epochs"], config["eval_every_epochs"]
    return sorted({*range(0, epochs + 1, every), epochs})


def train_one(
    config: Mapping[str, Any], run: str, seed: int, *, twin: bool = False
) -> dict[str, Any]:
    """Train the network of ``run`` for ``config["epochs"]`` epochs.

    The record (:func:`companion.experiments.common.record`) adds, from
    full-set evaluations in inference mode after every
    ``eval_every_epochs``: the curves ``train_loss_curve``,
    ``train_accuracy_curve``, ``test_loss_curve``,
    ``test_accuracy_curve``, ``minibatch_loss_curve``; the ``final_*``
    values and ``loss_gap`` (test loss - training loss); the
    ``matched_*`` values where the training loss first reaches
    ``matched_train_loss``; and, for batch-norm runs without dropout, the
    ``batchstat_*`` values (evaluated with the statistics of batches of
    the run's own size).  Missing values are None.
    """
    data = mnist(seed)
    n = config["n_train"]
    x_train, y_train = data.x_train[:n], data.y_train[:n]
    batch, lr = batch_size_and_learning_rate(config, run)
    per_epoch = n // batch
    model = build_model(config, run, seed)
    model.build((None, 28, 28, 1))
    if twin:
        perturb_ulp(model)
    checkpoints = {e * per_epoch: e for e in eval_epochs(config)}
    curves: dict[str, list[float]] = {
        f"{split}_{what}": []
        for split in ("train", "test")
        for what in ("loss", "accuracy")
    }

    def on_step(step: int, net: Sequential) -> None:
        if step not in checkpoints:
            return
        sets = (
            ("train", x_train, y_train),
            ("test", data.x_test, data.y_test),
        )
        for split, xs, ys in sets:
            result = evaluate(net, xs, ys)
            curves[f"{split}_loss"].append(result.loss)
            curves[f"{split}_accuracy"].append(result.accuracy)

    on_step(0, model)
    steps = config["epochs"] * per_epoch
    history = train(
        model,
        x_train,
        y_train,
        data.x_test,
        data.y_test,
        steps=steps,
        batch_size=batch,
        learning_rate=lr,
        seed=seed,
        eval_every=steps,
        on_step=on_step,
    )
    diverged = bool(history["diverged"])
    n_eval = len(checkpoints)
    for values in curves.values():
        values += [math.nan] * (n_eval - len(values))
    losses = np.asarray(history["losses"], dtype=np.float64)
    marks = sorted(checkpoints)
    minibatch = [math.nan] + [
        float(losses[a:b].mean()) if len(losses) >= b else math.nan
        for a, b in itertools.pairwise(marks)
    ]
    final = {key: values[-1] for key, values in curves.items()}
    level = config["matched_train_loss"]
    batch_norm, dropout, _ = RUNS[run]
    batchstat = dict.fromkeys(
        ("train_loss", "train_accuracy", "test_loss", "test_accuracy"),
        math.nan,
    )
    if batch_norm != "none" and not dropout and not diverged:
        sets = (
            ("train", x_train, y_train),
            ("test", data.x_test, data.y_test),
        )
        for split, xs, ys in sets:
            result = evaluate(model, xs, ys, training=True, chunk=batch)
            batchstat[f"{split}_loss"] = result.loss
            batchstat[f"{split}_accuracy"] = result.accuracy
    extra = {
        **{f"final_{k}": v for k, v in final.items()},
        "loss_gap": final["test_loss"] - final["train_loss"],
        "matched_epoch": at_train_loss(
            curves["train_loss"], eval_epochs(config), level
        ),
        "matched_test_loss": at_train_loss(
            curves["train_loss"], curves["test_loss"], level
        ),
        "matched_test_accuracy": at_train_loss(
            curves["train_loss"], curves["test_accuracy"], level
        ),
        **{f"batchstat_{k}": v for k, v in batchstat.items()},
        **{f"{k}_curve": v for k, v in curves.items()},
        "minibatch_loss_curve": minibatch,
    }
    return record(history, **_nan_to_none(extra))


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# ------------------------------------------------------------- the claims
def _gap(run: Mapping[str, Any]) -> float:
    """The run's loss gap (test minus training cross-entropy, nats).

    A diverged run scores chance on both sets (ln 10 each, as its accuracy
    scores chance): its gap is 0.
    """
    return 0.0 if run["diverged"] else float(run["loss_gap"])


def gap_shrink(runs: Mapping[str, Any], bn: str, none: str) -> float:
    """How much of the loss gap batch norm removes: gap without - gap with
    (nats).
    """
    return _gap(runs[none]) - _gap(runs[bn])


def measures(config: Mapping[str, Any]) -> list[Measure]:
    """The chapter's claims, stated before the runs, and their effects."""
    arch = "-".join(["784", *map(str, config["hidden"]), "10"])
    setting = (
        f"a {arch} ReLU MLP after {config['epochs']} epochs of plain SGD "
        f"on {config['n_train']:,} MNIST digits (batch "
        f"{config['batch_size']}, learning rate {config['learning_rate']:g})"
    )
    small, large = config["small_batch"], config["large_batch"]
    out = [
        Measure(
            Claim(
                "test_accuracy",
                "Batch norm regularizes: higher test accuracy at the same "
                "budget",
                f"final test accuracy with BN minus without BN; {setting}",
                "points",
                config["margin_points"],
            ),
            lambda acc: 100.0 * (acc["bn"] - acc["none"]),
        ),
        Measure(
            Claim(
                "loss_gap",
                "Batch norm regularizes: a smaller gap between test and "
                "training loss",
                "loss gap (test minus training cross-entropy, inference "
                f"mode) without BN minus with BN; {setting}",
                "nats",
                config["margin_gap_nats"],
            ),
            lambda runs: gap_shrink(runs, "bn", "none"),
            kind="records",
        ),
        Measure(
            Claim(
                "replaces_dropout",
                "Batch norm reduces the need for dropout: alone, it is "
                "more accurate than dropout alone",
                "final test accuracy with BN (no dropout) minus with "
                f"dropout (no BN); {setting}",
                "points",
                config["margin_points"],
            ),
            lambda acc: 100.0 * (acc["bn"] - acc["dropout"]),
        ),
        Measure(
            Claim(
                "batch_noise",
                "... because its batch statistics are noisy: the smaller "
                "the batch, the more of the gap it removes",
                f"loss gap BN removes (without minus with) at batch "
                f"{small} minus at batch {large} (learning rate scaled with "
                "the batch, same epochs)",
                "nats",
                config["margin_gap_nats"],
                role="control",
            ),
            lambda runs: (
                gap_shrink(runs, "bn_small", "none_small")
                - gap_shrink(runs, "bn_large", "none_large")
            ),
            kind="records",
            twinned=False,  # the batch-size arms have no twins
        ),
    ]
    if config["batch_arms"]:
        return out
    return [m for m in out if m.claim.key != "batch_noise"]


def run(config: Mapping[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Train every run of :data:`RUNS` on every seed; judge the claims.

    Returns
    -------
    dict
        ``eval_epochs``, ``runs_spec`` (each run's batch norm, dropout,
        batch size and learning rate), ``runs`` (per seed, ``{run name:
        record}``), ``verdicts`` and ``noise``.
    """
    runs: list[dict[str, Any]] = []
    with one_blas_thread():
        for seed in seeds:
            per_seed: dict[str, Any] = {}
            for name in run_names(config):
                per_seed[name] = train_one(config, name, seed)
                if config["twins"] and name in TWINNED:
                    per_seed[name + TWIN] = train_one(
                        config, name, seed, twin=True
                    )
            runs.append(per_seed)
    claims = measures(config)
    spec = {}
    for name in run_names(config):
        bn, dropout, _ = RUNS[name]
        batch, lr = batch_size_and_learning_rate(config, name)
        spec[name] = {
            "batch_norm": bn,
            "dropout": dropout,
            "batch_size": batch,
            "learning_rate": lr,
        }
    return {
        "eval_epochs": eval_epochs(config),
        "runs_spec": spec,
        "runs": runs,
        "verdicts": verdicts(claims, runs),
        "noise": noise(claims, runs) if config["twins"] else None,
    }
