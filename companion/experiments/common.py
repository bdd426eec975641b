"""What the experiments share: data per seed, run records, claims and verdicts.

Every experiment stores its runs the same way: ``results["runs"]`` is a
list over seeds of ``{run name: record}`` (:func:`record`), where a run
name says what was trained (``"relu/before/d20"``, ``"with_bn/lr3"``).
Its claims are :class:`Measure` objects: a :class:`~companion.stats.Claim`
(stated before the runs) and the function that turns one seed's runs into
that seed's effect.  :func:`verdicts` applies :mod:`companion.stats` to
them, the same way in every chapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from companion import stats
from companion.data import MnistSplit, load_mnist_subset
from companion.nn import Conv2D, Dense

__all__ = [
    "TWIN",
    "Measure",
    "mnist",
    "noise",
    "one_blas_thread",
    "perturb_ulp",
    "record",
    "summarize",
    "verdicts",
]

TWIN = "~ulp"
"""Suffix of a run's *twin*: the same run from kernels one ulp larger.

Training amplifies a difference in the last bit of the weights until the
trajectory is another one, as a CPU with other kernels does (chapter 8).
The spread between a run and its twin is the noise of a claim's metric.
"""


@functools.lru_cache(maxsize=16)
def mnist(seed: int = 0, test_size: int = 1000) -> MnistSplit:
    """The MNIST split of run ``seed``, parsed once per process, read-only.

    :func:`companion.data.load_mnist_subset` with ``seed``: the test
    images change with the seed, so that the spread of an effect over
    seeds contains test-set sampling (:mod:`companion.stats`).
    """
    split = load_mnist_subset(test_size=test_size, seed=seed)
    for array in split:
        array.flags.writeable = False
    return split


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run numpy's BLAS on one thread inside the ``with`` block.

    The experiments multiply small matrices (batch 60 x width 100): there,
    extra BLAS threads only add synchronization (20x slower on a loaded
    2-core machine), and one thread makes the results independent of how
    many cores the machine has.  Needs ``threadpoolctl`` (the ``[data]``
    extra); without it the block runs unchanged.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is in [data]
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def perturb_ulp(model: Any) -> None:
    """Move every Dense and Conv2D kernel of ``model`` up by one ulp, in place.

    ``np.nextafter(k, inf)``: a relative change of about 1e-7 in float32,
    the size of the differences between two CPUs' kernels.
    """
    for layer in getattr(model, "layers", model):
        if isinstance(layer, (Dense, Conv2D)) and layer.kernel is not None:
            layer.kernel[...] = np.nextafter(layer.kernel, np.inf)


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, standard deviation (ddof=1), min and max of per-seed values.

    None and NaN are left out and counted in ``n_missing``.
    """
    raw = [math.nan if v is None else float(v) for v in values]
    finite = np.array([v for v in raw if not math.isnan(v)])
    if finite.size == 0:
        stats_ = dict.fromkeys(("mean", "std", "min", "max"), math.nan)
    else:
        stats_ = {
            "mean": float(finite.mean()),
            "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
            "min": float(finite.min()),
            "max": float(finite.max()),
        }
    return {**stats_, "n_missing": len(raw) - int(finite.size), "values": raw}


def record(history: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The standard record of one run from :func:`companion.training.train`.

    ``final_test_accuracy`` (None if the run diverged), ``diverged``,
    ``test_correct`` (per test image, packed by
    :func:`companion.stats.pack_correct`; None if diverged),
    ``steps_run``, the curves ``eval_steps``, ``test_accuracy`` and
    ``train_loss`` (up to the last evaluation the run reached: a diverged
    run's curves are shorter), and any ``extra`` fields.
    """
    diverged = bool(history["diverged"])
    return {
        "final_test_accuracy": None
        if diverged
        else float(history["final_test_accuracy"]),
        "diverged": diverged,
        "test_correct": stats.pack_correct(history["final_test_correct"]),
        "steps_run": len(history["losses"]),
        "eval_steps": [int(s) for s in history["steps"]],
        "test_accuracy": [float(a) for a in history["test_accuracy"]],
        "train_loss": [
            None if math.isnan(v) else float(v) for v in history["train_loss"]
        ],
        **extra,
    }


@dataclasses.dataclass(frozen=True)
class Measure:
    """A claim and how one seed's runs give its effect.

    ``effect`` maps one seed's runs to a number in ``claim.unit``.  With
    ``kind="accuracy"`` it receives ``{run name: test accuracy}`` (a
    diverged run scoring :data:`companion.stats.DIVERGED_ACCURACY`), and
    the verdict's interval includes test-set sampling
    (:func:`companion.stats.judge`).  With ``kind="records"`` it receives
    ``{run name: record}`` and the interval comes from the seeds alone
    (:func:`companion.stats.decide`), for metrics that are not functions
    of the final test predictions (a loss gap, steps to an accuracy).
    ``twinned=False`` says that none of the runs the effect reads has
    one-ulp twins, so :func:`noise` has nothing to measure for it (None,
    not a difference of 0).
    """

    claim: stats.Claim
    effect: Callable[[Mapping[str, Any]], float]
    kind: str = "accuracy"
    twinned: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("accuracy", "records"):
            raise ValueError(
                f"kind must be 'accuracy' or 'records'; received {self.kind!r}"
            )

    def effect_of(
        self, runs: Mapping[str, Mapping[str, Any]], n: int
    ) -> float:
        """The effect of one seed's ``runs`` (records as stored)."""
        if self.kind == "records":
            return float(self.effect(runs))
        return float(self.effect(stats.accuracies(_correct(runs, n))))


def _correct(
    runs: Mapping[str, Mapping[str, Any]], n: int
) -> dict[str, np.ndarray | None]:
    return {
        name: stats.unpack_correct(run["test_correct"], n)
        for name, run in runs.items()
    }


def verdicts(
    measures: Sequence[Measure],
    runs_per_seed: Sequence[Mapping[str, Mapping[str, Any]]],
    *,
    n_test: int = 1000,
    n_boot: int = 2000,
) -> dict[str, dict[str, Any]]:
    """Every measure's claim and verdict, as plain data keyed by claim key.

    The margin a verdict uses is the claim's margin, stated before the
    runs, or the claim's measured noise when that is larger: when the runs
    have one-ulp twins (:func:`noise`), an effect no larger than what a
    last-bit perturbation of the trajectory produces on one seed is not
    counted as real.  Each entry holds the claim's fields, the verdict's
    fields (:meth:`companion.stats.Verdict.as_dict`; its ``margin`` is the
    one used; its ``effect`` is the measured mean, so the claim's
    definition of the effect is kept as ``definition``), ``stated_margin``
    and ``interval`` (what the confidence interval covers).
    """
    measured = noise(measures, runs_per_seed, n_test=n_test)
    out: dict[str, dict[str, Any]] = {}
    for measure in measures:
        claim = measure.claim
        rms = measured[claim.key]["rms"]
        margin = claim.margin if rms is None else max(claim.margin, rms)
        judged = dataclasses.replace(claim, margin=margin)
        if measure.kind == "accuracy":
            correct = [_correct(runs, n_test) for runs in runs_per_seed]
            verdict = stats.judge(
                judged, measure.effect, correct, n_boot=n_boot
            )
            interval = "seeds (each with its own split) and test-set bootstrap"
        else:
            effects = [measure.effect(runs) for runs in runs_per_seed]
            verdict = stats.decide(effects, margin, unit=claim.unit)
            interval = "seeds (each with its own split)"
        out[claim.key] = {
            **dataclasses.asdict(claim),
            **verdict.as_dict(),
            "definition": claim.effect,
            "stated_margin": claim.margin,
            "interval": interval,
        }
    return out


def noise(
    measures: Sequence[Measure],
    runs_per_seed: Sequence[Mapping[str, Mapping[str, Any]]],
    *,
    n_test: int = 1000,
) -> dict[str, dict[str, Any]]:
    """How much each claim's effect moves when runs are replaced by their
    twins.

    Per seed, the effect is computed again with every run that has a twin
    (``name + TWIN``) replaced by the twin.  ``differences`` lists the
    per-seed changes, ``rms`` their root mean square: the typical change
    of one seed's effect when the trajectory of those runs is perturbed at
    the last bit, as another CPU does.  Claims none of whose runs have
    twins (or whose measure says ``twinned=False``) get None.
    """
    out: dict[str, dict[str, Any]] = {}
    for measure in measures:
        if not measure.twinned:
            out[measure.claim.key] = {"differences": None, "rms": None}
            continue
        differences = []
        for runs in runs_per_seed:
            twinned = {
                name: runs[name + TWIN]
                for name in runs
                if not name.endswith(TWIN) and name + TWIN in runs
            }
            if not twinned:
                continue
            swapped = {**runs, **twinned}
            base = measure.effect_of(runs, n_test)
            differences.append(measure.effect_of(swapped, n_test) - base)
        if not differences:
            out[measure.claim.key] = {"differences": None, "rms": None}
            continue
        rms = math.sqrt(float(np.mean(np.square(differences))))
        out[measure.claim.key] = {"differences": differences, "rms": rms}
    return out
