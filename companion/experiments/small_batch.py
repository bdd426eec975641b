r"""Small batches: batch norm, batch renorm, group norm and layer norm.

The claims, as their papers make them: batch norm degrades when the
mini-batch is small, because its batch statistics get noisy and differ
from the moving averages used at inference; batch renormalization (Ioffe
2017) "significantly improves" training with small mini-batches; group
norm (Wu and He 2018) is "stable in a wide range of batch sizes" where
batch norm is not, and is better than layer norm.

Set-up: the 784-100-100-100-10 MLP with a normalization layer between
every hidden Dense (no bias) and its ReLU -- ``BatchNorm`` (``"bn"``),
``BatchNorm(renorm=True)`` (``"renorm"``, clipping ``rmax`` 3, ``rmin``
1/3, ``dmax`` 5, Ioffe's final values), ``GroupNorm(groups)`` (``"gn"``)
or ``LayerNorm`` (``"ln"``) -- trained on the MNIST subset with plain SGD
for the same number of steps at the same learning rate, with mini-batches
of ``batch_sizes`` examples.  For one seed every arm starts from the same
kernels and sees the same mini-batches (paired runs).  The batch norm run
is evaluated a second time after recalibrating its moving statistics
with the paper's Algorithm 2 on training batches of 60
(:func:`companion.recalibrate`): run ``"bn_recal"``, a control that asks
whether batch norm's loss is its moving averages or the network it
learned with noisy statistics.

The claims (:func:`measures`), per batch size: final test accuracy of one
arm minus another, in percentage points, with a margin stated before the
runs.  Chapter 16, *Alternatives*, runs it; which normalization wins at
this scale is what the verdicts say, not what the papers say.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import islice
from typing import Any

from companion.data import batches
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
from companion.nn import (
    BatchNorm,
    Dense,
    Flatten,
    GroupNorm,
    LayerNorm,
    ReLU,
    Sequential,
)
from companion.recalibration import recalibrate
from companion.seeding import KERNELS, PERTURB, derive_seed
from companion.stats import Claim
from companion.training import evaluate, train

__all__ = [
    "ARMS",
    "CI_SEEDS",
    "CONFIG_CI",
    "CONFIG_FULL",
    "CONFIG_TEST",
    "DESCRIPTION",
    "EXPECTED_CI",
    "build",
    "measures",
    "run",
    "run_name",
    "train_one",
]

DESCRIPTION = (
    "Small batches (2-8): batch norm versus batch renorm, group norm and "
    "layer norm on an MLP, same steps and learning rate"
)

ARMS = ("bn", "renorm", "gn", "ln")
"""The normalizations compared; ``"bn_recal"`` is the recalibrated
``"bn"`` run (no training of its own)."""

CONFIG_TEST: dict[str, Any] = {
    "width": 16,
    "depth": 2,
    "groups": 4,
    "batch_sizes": [2],
    "steps": 20,
    "learning_rate": 0.05,
    "momentum": 0.99,
    "renorm_clipping": {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0},
    "renorm_momentum": 0.99,
    "eval_every": 10,
    "recalibration_batches": 5,
    "margin_points": 2.0,
    "twins": True,
}
CONFIG_CI: dict[str, Any] = {
    **CONFIG_TEST,
    "width": 100,
    "depth": 3,
    "groups": 5,
    "batch_sizes": [2],
    "steps": 500,
    "eval_every": 100,
    "recalibration_batches": 50,
    "twins": False,
}
CONFIG_FULL: dict[str, Any] = {
    **CONFIG_CI,
    "batch_sizes": [2, 4, 8],
    "steps": 2000,
    "eval_every": 100,
    "twins": True,
}

CI_SEEDS = 10
"""Seeds of the CI run.  With five, group norm's lead over batch renorm
(about 12 points, one seed in five near 0) cleared the margin for seeds
0-4 and not for 1000-1004; with ten the interval clears it for both sets
(tests/test_robustness.py checks ten seeds the book never uses)."""

EXPECTED_CI = {
    "renorm_b2": "supported",
    "groupnorm_b2": "supported",
    "groupnorm_vs_renorm_b2": "supported",
    "groupnorm_vs_layernorm_b2": "inconclusive",
    "recalibrated_b2": "inconclusive",
}
"""What chapter 16 states for the CI-scale run (and ``make robustness``
checks with other seeds)."""

RECALIBRATION_BATCH = 60
"""Batch size of Algorithm 2's pass (the paper's MNIST batch)."""


def run_name(arm: str, batch_size: int) -> str:
    """``"gn/b2"``: the arm at batch size 2."""
    return f"{arm}/b{batch_size}"


def build(arm: str, config: Mapping[str, Any], seed: int) -> Sequential:
    """The MLP with normalization ``arm`` before every ReLU.

    Hidden Dense layer ``i`` draws its Glorot kernel from the stream
    ``(seed, KERNELS, i)``, as :func:`companion.training.mlp` does, so the
    arms of one seed start from the same kernels.
    """
    makers = {
        "bn": lambda: BatchNorm(momentum=config["momentum"]),
        "renorm": lambda: BatchNorm(
            momentum=config["momentum"],
            renorm=True,
            renorm_clipping=config["renorm_clipping"],
            renorm_momentum=config["renorm_momentum"],
        ),
        "gn": lambda: GroupNorm(groups=config["groups"]),
        "ln": lambda: LayerNorm(),
    }
    if arm not in makers:
        raise ValueError(
            f"arm must be one of {list(makers)}; received {arm!r}"
        )
    layers: list[Any] = [Flatten()]
    for i in range(config["depth"]):
        layers.append(
            Dense(
                config["width"],
                use_bias=False,
                seed=derive_seed(seed, KERNELS, i),
            )
        )
        layers.append(makers[arm]())
        layers.append(ReLU())
    layers.append(Dense(10, seed=derive_seed(seed, KERNELS, config["depth"])))
    return Sequential(layers)


def train_one(
    config: Mapping[str, Any],
    arm: str,
    batch_size: int,
    seed: int,
    *,
    twin: bool = False,
) -> dict[str, dict[str, Any]]:
    """Train one arm at one batch size; ``{run name: record}``.

    For ``"bn"`` also the record of the recalibrated network
    (``"bn_recal"``, test correctness only; None if the run diverged).
    """
    data = mnist(seed)
    model = build(arm, config, seed)
    model.build((None, 28, 28, 1))
    if twin:
        perturb_ulp(model)
    history = train(
        model,
        *data,
        steps=config["steps"],
        batch_size=batch_size,
        learning_rate=config["learning_rate"],
        seed=seed,
        eval_every=config["eval_every"],
    )
    suffix = TWIN if twin else ""
    out = {run_name(arm, batch_size) + suffix: record(history)}
    if arm == "bn":
        recal = {
            "diverged": history["diverged"],
            "final_test_accuracy": float("nan"),
            "final_test_correct": None,
            "losses": [],
            "steps": [],
            "test_accuracy": [],
            "train_loss": [],
        }
        if not history["diverged"]:
            stream = batches(
                data.x_train,
                data.y_train,
                RECALIBRATION_BATCH,
                seed=derive_seed(seed, PERTURB, batch_size),
                epochs=None,
                drop_last=True,
            )
            recalibrate(model, islice(stream, config["recalibration_batches"]))
            result = evaluate(model, data.x_test, data.y_test)
            recal["final_test_accuracy"] = result.accuracy
            recal["final_test_correct"] = result.correct
            # a one-point curve: the trained network, recalibrated
            recal["steps"] = [history["steps"][-1]]
            recal["test_accuracy"] = [result.accuracy]
            recal["train_loss"] = [float("nan")]
        out[run_name("bn_recal", batch_size) + suffix] = record(recal)
    return out


def _difference(first: str, second: str) -> Any:
    def effect(acc: Mapping[str, float]) -> float:
        return 100.0 * (acc[first] - acc[second])

    return effect


def measures(config: Mapping[str, Any]) -> list[Measure]:
    """Per batch size b: five comparisons of final test accuracy (points).

    ``renorm_b{b}``: renorm minus bn; ``groupnorm_b{b}``: gn minus bn;
    ``groupnorm_vs_renorm_b{b}``: gn minus renorm;
    ``groupnorm_vs_layernorm_b{b}``: gn minus ln; and the control
    ``recalibrated_b{b}``: bn_recal minus bn (does replacing batch
    norm's moving statistics by population statistics recover what it
    lost?).
    """
    margin = config["margin_points"]
    steps, lr = config["steps"], config["learning_rate"]
    arch = "x".join([str(config["width"])] * config["depth"])
    out = []
    for b in config["batch_sizes"]:
        setting = (
            f"final test accuracy of the {arch} ReLU MLP after {steps} "
            f"plain-SGD steps of {b} examples at learning rate {lr:g}"
        )
        pairs = [
            (
                "renorm",
                "renorm",
                "bn",
                "Batch renormalization beats batch norm with mini-batches "
                f"of {b} (Ioffe 2017)",
                "claim",
            ),
            (
                "groupnorm",
                "gn",
                "bn",
                f"Group norm beats batch norm with mini-batches of {b} (Wu "
                "and He 2018)",
                "claim",
            ),
            (
                "groupnorm_vs_renorm",
                "gn",
                "renorm",
                f"Group norm beats batch renorm with mini-batches of {b}",
                "claim",
            ),
            (
                "groupnorm_vs_layernorm",
                "gn",
                "ln",
                f"Group norm beats layer norm with mini-batches of {b} (Wu "
                "and He 2018)",
                "claim",
            ),
            (
                "recalibrated",
                "bn_recal",
                "bn",
                "Batch norm's loss with mini-batches of "
                f"{b} is its moving statistics: recalibrating them "
                "(Algorithm 2, batches of 60) recovers accuracy",
                "control",
            ),
        ]
        for key, first, second, statement, role in pairs:
            out.append(
                Measure(
                    Claim(
                        f"{key}_b{b}",
                        statement,
                        f"{setting}: {first} minus {second}",
                        "points",
                        margin,
                        role=role,
                    ),
                    _difference(run_name(first, b), run_name(second, b)),
                )
            )
    return out


def run(config: Mapping[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Train every (arm, batch size, seed); judge the claims.

    Returns ``arms``, ``batch_sizes``, ``runs`` (per seed, ``{run name:
    record}``), ``verdicts`` and ``noise`` (from the one-ulp twins of
    every arm, full scale only).
    """
    runs: list[dict[str, Any]] = []
    with one_blas_thread():
        for seed in seeds:
            per_seed: dict[str, Any] = {}
            for b in config["batch_sizes"]:
                for arm in ARMS:
                    per_seed.update(train_one(config, arm, b, seed))
                    if config["twins"]:
                        per_seed.update(
                            train_one(config, arm, b, seed, twin=True)
                        )
            runs.append(per_seed)
    claims = measures(config)
    return {
        "arms": list(ARMS),
        "batch_sizes": list(config["batch_sizes"]),
        "runs": runs,
        "verdicts": verdicts(claims, runs),
        "noise": noise(claims, runs) if config["twins"] else None,
    }
