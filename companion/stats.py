r"""Verdicts on the book's claims: paired effects, a confidence interval, three
outcomes.

Every claim of Parts II to IV is decided by this module, with one rule
(chapter 8 explains it; chapter 14 collects the verdicts):

1. An experiment runs every arm of a comparison (with and without batch
   norm, say) for each of :math:`S` seeds.  The seed fixes everything
   random -- the MNIST split, the initial kernels, the order of the
   mini-batches (:mod:`companion.seeding`) -- and the arms of one seed share
   it: the runs are *paired*.
2. Per seed, the claim's metric gives one effect :math:`d_s` in the claim's
   own unit (percentage points of test accuracy, decades of learning rate,
   layers, ...).  A run that diverged scores :data:`DIVERGED_ACCURACY`,
   chance on the balanced test sets (what its NaN logits predict).
3. The mean effect :math:`\bar d` gets the confidence interval

   .. math::

       \bar d \pm t_{S-1,\,1-\alpha/2}\,\mathrm{SE}, \qquad
       \mathrm{SE}^2 = \frac{\max(s^2, \bar v)}{S},

   where :math:`s^2` is the variance of the :math:`d_s` across seeds and
   :math:`\bar v` the mean *sampling* variance of one :math:`d_s`: its
   variance when the test images are resampled with replacement, the same
   images for every arm of the seed (a paired bootstrap over the test set,
   :func:`sampling_variance`).  Each seed draws its own test split, so
   :math:`s^2` already contains test-set sampling; the floor :math:`\bar v`
   keeps five seeds that happen to agree from claiming more precision than
   a test set of 1,000 images has.
4. Against a margin :math:`M > 0`, fixed in the claim's unit before the
   runs: **supported** if the whole interval lies above :math:`+M`,
   **contradicted** if it lies below :math:`-M`, **inconclusive**
   otherwise.  The rule is symmetric in the two arms.

The interval is Student's, on paired differences; the bootstrap over test
images is Efron and Tibshirani's (1993); treating the seed and the data
split as sources of variance to be sampled, rather than fixed, follows
Bouthillier et al. (2021).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from companion._validation import check_int, describe

__all__ = [
    "DIVERGED_ACCURACY",
    "OUTCOMES",
    "Claim",
    "Verdict",
    "accuracies",
    "decide",
    "judge",
    "pack_correct",
    "sampling_variance",
    "t_quantile",
    "unpack_correct",
]

OUTCOMES = ("supported", "contradicted", "inconclusive")
"""The three possible verdicts."""

DIVERGED_ACCURACY = 0.1
"""Test accuracy of a run that diverged: chance on 10 balanced classes.

A diverged network has NaN logits; ``argmax`` returns class 0 for every
image, which is right on exactly one image in ten of a stratified test set.
Every experiment scores divergence this way, through :func:`accuracies`.
"""

Correct = np.ndarray | None
"""Per-image correctness of one run (bool, one entry per test image), or
None for a run that diverged."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim as it is stated before the runs.

    Attributes
    ----------
    key
        Short identifier, e.g. ``"relu_depth"``.
    statement
        The claim in one sentence, as the book states it.
    effect
        What one seed's effect :math:`d_s` is, in words.
    unit
        The unit of the effect and of the margin (``"points"``,
        ``"decades"``, ``"layers"``, ...).
    margin
        The margin :math:`M > 0` of :func:`decide`, in ``unit``.
    role
        ``"claim"`` for what tutorials assert, ``"control"`` for a
        comparison that tests an explanation of it.
    """

    key: str
    statement: str
    effect: str
    unit: str
    margin: float
    role: str = "claim"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise ValueError(
                f"margin must be finite and > 0; received {self.margin!r}"
            )
        if self.role not in ("claim", "control"):
            raise ValueError(
                f"role must be 'claim' or 'control'; received {self.role!r}"
            )


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`decide`: the effect, its interval, the verdict.

    Attributes
    ----------
    effect
        The mean of the per-seed effects.
    low, high
        The confidence interval of the mean effect.
    margin, unit
        As in the :class:`Claim`.
    outcome
        One of :data:`OUTCOMES`.
    effects
        The per-seed effects, in seed order.
    se_seeds
        :math:`s/\\sqrt{S}`, the standard error from the spread over seeds.
    se_sampling
        :math:`\\sqrt{\\bar v/S}`, from test-set sampling (0 if unknown).
    confidence
        The confidence level of the interval, e.g. 0.95.
    """

    effect: float
    low: float
    high: float
    margin: float
    unit: str
    outcome: str
    effects: tuple[float, ...]
    se_seeds: float
    se_sampling: float
    confidence: float

    @property
    def n_seeds(self) -> int:
        """The number S of seeds."""
        return len(self.effects)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (:func:`Verdict.from_dict` reads it back)."""
        out = dataclasses.asdict(self)
        out["effects"] = list(self.effects)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """The inverse of :meth:`as_dict`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["effects"] = tuple(values["effects"])
        return cls(**values)

    def __str__(self) -> str:
        level = f"{100 * self.confidence:g} %"
        return (
            f"{self.effect:+.3g} {self.unit} ({level} CI {self.low:+.3g} "
            f"to {self.high:+.3g}; margin {self.margin:g}): {self.outcome}"
        )


# ------------------------------------------------------------ the t quantile
def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (closed forms).

    Abramowitz and Stegun 26.7.3-4: with :math:`\\theta = \\arctan(t /
    \\sqrt{\\nu})`, a finite series in :math:`\\cos\\theta`.
    """
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        series = math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0
        return 2.0 / math.pi * (theta + series)
    term, total = 1.0, 1.0
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The ``p``-quantile of Student's t distribution with ``df`` degrees of
    freedom.

    Solved by bisection on the closed-form distribution function (exact to
    about 1e-12); ``t_quantile(0.975, 4)`` is 2.776.  Needs no SciPy.

    Raises
    ------
    ValueError
        ``p`` outside (0, 1) or ``df`` < 1.
    """
    df = check_int(df, "df", low=1)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); received {p!r}")
    if p == 0.5:
        return 0.0
    mass = abs(2.0 * p - 1.0)  # P(|T| <= t) for the wanted t
    low, high = 0.0, 1.0
    while _t_two_sided_mass(high, df) < mass:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _t_two_sided_mass(mid, df) < mass:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    t = 0.5 * (low + high)
    return t if p > 0.5 else -t


# ---------------------------------------------------------------- decisions
def _as_effects(effects: Sequence[float], name: str) -> np.ndarray:
    values = np.asarray(list(effects), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"{name} must be a non-empty sequence of per-seed numbers; "
            f"received {describe(effects)}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"{name} must be finite; received {values.tolist()} (score a "
            "diverged run before it gets here: companion.stats.accuracies)"
        )
    return values


def decide(
    effects: Sequence[float],
    margin: float,
    *,
    unit: str = "",
    sampling_variances: Sequence[float] | None = None,
    confidence: float = 0.95,
) -> Verdict:
    """The verdict on per-seed paired effects against ``margin`` (steps 3-4
    above).

    Parameters
    ----------
    effects
        One effect per seed, in the claim's unit (finite).
    margin
        :math:`M > 0`, in the same unit, fixed before the runs.
    unit
        Carried into the verdict for display.
    sampling_variances
        Per seed, the variance of that seed's effect under resampling of
        the test set (:func:`sampling_variance`); None when the effect does
        not come from a test set.
    confidence
        Of the two-sided interval.

    Raises
    ------
    ValueError
        Empty, non-finite or unpaired input (``sampling_variances`` of
        another length), ``margin`` <= 0, ``confidence`` outside (0, 1), or
        a single seed (no spread, no interval).
    """
    d = _as_effects(effects, "effects")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin)):
        raise TypeError(f"margin must be a finite number; received {margin!r}")
    if margin <= 0:
        raise ValueError(f"margin must be > 0; received {margin!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(
            f"confidence must be in (0, 1); received {confidence!r}"
        )
    if d.size < 2:
        raise ValueError(
            "effects must hold at least 2 seeds for an interval; received "
            f"{d.size}"
        )
    if sampling_variances is None:
        v = np.zeros_like(d)
    else:
        v = _as_effects(sampling_variances, "sampling_variances")
        if v.shape != d.shape:
            raise ValueError(
                "sampling_variances must have one entry per seed, paired with "
                f"effects; received {v.size} for {d.size} effects"
            )
        if np.any(v < 0):
            raise ValueError("sampling_variances must be >= 0")
    n = d.size
    spread = float(d.var(ddof=1))
    sampling = float(v.mean())
    se = math.sqrt(max(spread, sampling) / n)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * se
    mean = float(d.mean())
    low, high = mean - half, mean + half
    if low > margin:
        outcome = "supported"
    elif high < -margin:
        outcome = "contradicted"
    else:
        outcome = "inconclusive"
    return Verdict(
        effect=mean,
        low=low,
        high=high,
        margin=float(margin),
        unit=unit,
        outcome=outcome,
        effects=tuple(float(x) for x in d),
        se_seeds=math.sqrt(spread / n),
        se_sampling=math.sqrt(sampling / n),
        confidence=confidence,
    )


# ------------------------------------------------------- test-set sampling
def _check_runs(correct: Mapping[str, Correct]) -> int:
    """All runs of a seed: bool arrays of one length n (or None); returns n."""
    if not isinstance(correct, Mapping) or not correct:
        raise ValueError(
            "correct must be a non-empty mapping run name -> per-image "
            f"correctness; received {describe(correct)}"
        )
    lengths = {
        name: np.shape(c) for name, c in correct.items() if c is not None
    }
    if not lengths:
        raise ValueError(
            "every run diverged: there is no test set to resample"
        )
    if (
        len(set(lengths.values())) != 1
        or len(next(iter(lengths.values()))) != 1
    ):
        raise ValueError(
            "the runs of one seed must be evaluated on the same test images "
            f"(1-D arrays of one length); received shapes {lengths}"
        )
    return int(next(iter(lengths.values()))[0])


def accuracies(
    correct: Mapping[str, Correct], weights: np.ndarray | None = None
) -> dict[str, float]:
    """Test accuracy of every run, a diverged run (None) scoring chance.

    ``weights`` (one non-negative count per test image, e.g. a bootstrap
    resample's) weights the images; None weights them equally.
    """
    n = _check_runs(correct)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    total = float(w.sum())
    return {
        name: DIVERGED_ACCURACY
        if c is None
        else float(np.dot(w, np.asarray(c, np.float64)) / total)
        for name, c in correct.items()
    }


@functools.lru_cache(maxsize=20)
def _resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each of n test images is drawn in each of n_boot
    resamples (multinomial, generator ``seed``), read-only.

    Remembered (at most 20 of them, 2 MB each for 1,000 images and 1,000
    resamples): every claim judged on the same seeds resamples the same
    test images the same way, and drawing them is most of the cost of
    :func:`sampling_variance`.
    """
    counts = np.random.default_rng(seed).multinomial(
        n, np.full(n, 1.0 / n), size=n_boot
    )
    small = counts.astype(np.uint16 if n < 2**16 else np.int64)
    small.flags.writeable = False
    return small


def sampling_variance(
    effect: Callable[[Mapping[str, float]], float],
    correct: Mapping[str, Correct],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> float:
    """Variance of one seed's effect when its test images are resampled.

    Draws ``n_boot`` resamples of the n test images with replacement (the
    same resample for every run of the seed: the runs stay paired),
    recomputes every run's accuracy on each and applies ``effect`` to them.
    Deterministic for a given ``seed``.

    Parameters
    ----------
    effect
        Maps ``{run name: accuracy}`` to the seed's effect.
    correct
        ``{run name: per-image correctness}`` of all runs of one seed.
    """
    n = _check_runs(correct)
    n_boot = check_int(n_boot, "n_boot", low=2)
    names = list(correct)
    matrix = np.stack(
        [
            np.zeros(n)
            if correct[k] is None
            else np.asarray(correct[k], float)
            for k in names
        ]
    )
    # Each resampled count of correct images is an integer <= n: exact in
    # float32 below 2**24 (a faster product), then divided in float64.
    exact = np.float32 if n < 2**24 else np.float64
    counts = _resample_counts(n, n_boot, seed).astype(exact)
    resampled = (counts @ matrix.T.astype(exact)).astype(np.float64) / n
    diverged = [i for i, k in enumerate(names) if correct[k] is None]
    resampled[:, diverged] = DIVERGED_ACCURACY  # a diverged run: chance
    values = np.empty(n_boot)
    for b, row in enumerate(resampled.tolist()):
        values[b] = effect(dict(zip(names, row, strict=True)))
    return float(values.var(ddof=1))


def judge(
    claim: Claim,
    effect: Callable[[Mapping[str, float]], float],
    correct_per_seed: Sequence[Mapping[str, Correct]],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
) -> Verdict:
    """:func:`decide` for an effect computed from test-set correctness.

    Per seed, ``effect(accuracies(correct))`` is the effect and
    :func:`sampling_variance` its sampling variance.

    Raises
    ------
    ValueError
        No seeds, or seeds whose runs differ (unpaired).
    """
    seeds = list(correct_per_seed)
    if not seeds:
        raise ValueError("correct_per_seed must hold at least one seed")
    names = set(seeds[0])
    for i, runs in enumerate(seeds):
        if set(runs) != names:
            raise ValueError(
                f"seed #{i} has runs {sorted(runs)}, seed #0 has "
                f"{sorted(names)}: every seed needs the same, paired runs"
            )
    effects = [effect(accuracies(runs)) for runs in seeds]
    variances = [
        sampling_variance(effect, runs, n_boot=n_boot, seed=i)
        for i, runs in enumerate(seeds)
    ]
    return decide(
        effects,
        claim.margin,
        unit=claim.unit,
        sampling_variances=variances,
        confidence=confidence,
    )


# ------------------------------------------------------------ JSON storage
def pack_correct(correct: Correct) -> str | None:
    """Per-image correctness as a hex string (1,000 images: 250 characters)."""
    if correct is None:
        return None
    bits = np.asarray(correct)
    if bits.dtype != np.bool_ or bits.ndim != 1:
        raise TypeError(
            f"correct must be a 1-D bool array; received {describe(correct)}"
        )
    return np.packbits(bits).tobytes().hex()


def unpack_correct(text: str | None, n: int) -> Correct:
    """The inverse of :func:`pack_correct` for ``n`` images."""
    if text is None:
        return None
    n = check_int(n, "n", low=1)
    raw = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)
    if raw.size != (n + 7) // 8:
        raise ValueError(
            f"text holds {raw.size * 8} bits; expected {n} images "
            f"({(n + 7) // 8} bytes)"
        )
    return np.unpackbits(raw)[:n].astype(bool)
