"""companion.stats: the verdict rule on synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from companion import stats


# ------------------------------------------------------------ t quantile
@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 29, 120])
@pytest.mark.parametrize("p", [0.51, 0.9, 0.975, 0.995, 0.025, 0.3])
def test_t_quantile_matches_scipy(df, p):
    scipy_stats = pytest.importorskip("scipy.stats")
    expected = scipy_stats.t.ppf(p, df)
    assert stats.t_quantile(p, df) == pytest.approx(expected, rel=1e-9)


def test_t_quantile_known_values_and_errors():
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert stats.t_quantile(0.5, 3) == 0.0
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\); received 1"):
        stats.t_quantile(1, 3)
    with pytest.raises(ValueError, match=r"df=0 is out of range"):
        stats.t_quantile(0.9, 0)


# --------------------------------------------------------------- decide
def test_decide_by_hand():
    # mean 3, s = sqrt(2.5), SE = sqrt(0.5), t(0.975, 4) = 2.776445
    verdict = stats.decide([1, 2, 3, 4, 5], 1.0, unit="points")
    half = 2.776445105 * math.sqrt(0.5)
    assert verdict.effect == 3.0
    assert verdict.low == pytest.approx(3 - half)
    assert verdict.high == pytest.approx(3 + half)
    assert verdict.outcome == "supported"  # 1.037 > 1
    assert verdict.se_seeds == pytest.approx(math.sqrt(0.5))
    assert verdict.se_sampling == 0.0 and verdict.n_seeds == 5
    assert str(verdict).endswith(": supported") and "points" in str(verdict)
    # The same data against a margin the interval does not clear.
    assert stats.decide([1, 2, 3, 4, 5], 1.1).outcome == "inconclusive"


@pytest.mark.parametrize(
    ("effects", "outcome"),
    [
        ([5.0, 6.0, 5.5, 6.5, 5.2], "supported"),
        ([-5.0, -6.0, -5.5, -6.5, -5.2], "contradicted"),
        ([0.5, -0.4, 0.1, 0.2, -0.3], "inconclusive"),
        ([5.0, -5.0, 6.0, -6.0, 0.0], "inconclusive"),  # large, but noisy
    ],
)
def test_decide_has_three_outcomes(effects, outcome):
    assert stats.decide(effects, 2.0).outcome == outcome


def test_decide_is_symmetric_in_the_two_arms():
    rng = np.random.default_rng(0)
    for _ in range(50):
        effects = rng.normal(rng.normal(0, 3), 1, size=5)
        v = rng.uniform(0, 2, size=5)
        a = stats.decide(effects, 1.0, sampling_variances=v)
        b = stats.decide(-effects, 1.0, sampling_variances=v)
        swap = {
            "supported": "contradicted",
            "contradicted": "supported",
            "inconclusive": "inconclusive",
        }
        assert b.outcome == swap[a.outcome]
        assert (b.low, b.high) == pytest.approx((-a.high, -a.low))


def test_sampling_variance_floors_the_interval():
    # Five identical effects: no spread across seeds.  Without a sampling
    # variance the interval has zero width; with one it cannot be narrower
    # than the test set allows.
    exact = stats.decide([3.0] * 5, 1.0)
    assert exact.low == exact.high == 3.0 and exact.outcome == "supported"
    floored = stats.decide([3.0] * 5, 1.0, sampling_variances=[4.0] * 5)
    half = 2.776445105 * math.sqrt(4.0 / 5)
    assert (floored.low, floored.high) == pytest.approx((3 - half, 3 + half))
    assert floored.outcome == "inconclusive"
    # When the spread is larger than the floor, the spread decides.
    spread = stats.decide([1, 2, 3, 4, 5], 1.0, sampling_variances=[0.1] * 5)
    assert spread.se_seeds > spread.se_sampling
    assert spread.low == pytest.approx(stats.decide([1, 2, 3, 4, 5], 1.0).low)


def test_interval_covers_the_true_effect_at_its_confidence():
    # 4,000 simulated experiments of 5 seeds each: the 95 % interval must
    # contain the true mean effect about 95 % of the time.
    rng = np.random.default_rng(1)
    true = 2.0
    hits = sum(
        (v := stats.decide(rng.normal(true, 1.5, size=5), 0.5)).low
        <= true
        <= v.high
        for _ in range(4000)
    )
    assert 0.94 <= hits / 4000 <= 0.96


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: stats.decide([], 1.0), "non-empty"),
        (lambda: stats.decide([1.0], 1.0), "at least 2 seeds"),
        (lambda: stats.decide([1.0, math.nan], 1.0), "must be finite"),
        (lambda: stats.decide([1.0, 2.0], 0.0), "margin must be > 0"),
        (lambda: stats.decide([1.0, 2.0], -1.0), "margin must be > 0"),
        (
            lambda: stats.decide([1.0, 2.0], 1.0, sampling_variances=[1.0]),
            "one entry per seed",
        ),
        (
            lambda: stats.decide([1.0, 2.0], 1.0, sampling_variances=[1, -1]),
            ">= 0",
        ),
        (lambda: stats.decide([1.0, 2.0], 1.0, confidence=1.0), "confidence"),
    ],
)
def test_decide_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_verdict_round_trips_through_plain_data():
    verdict = stats.decide([1, 2, 3], 0.5, unit="layers")
    assert stats.Verdict.from_dict(verdict.as_dict()) == verdict


def test_claim_checks_its_margin_and_role():
    with pytest.raises(ValueError, match="margin must be finite and > 0"):
        stats.Claim("k", "s", "e", "points", 0.0)
    with pytest.raises(ValueError, match="role must be 'claim' or 'control'"):
        stats.Claim("k", "s", "e", "points", 1.0, role="other")


# ------------------------------------------------- test-set sampling
def _runs(rng, n=1000, p=(0.9, 0.85)):
    return {"a": rng.random(n) < p[0], "b": rng.random(n) < p[1]}


def test_accuracies_score_a_diverged_run_as_chance():
    rng = np.random.default_rng(2)
    correct = {**_runs(rng), "dead": None}
    acc = stats.accuracies(correct)
    assert acc["a"] == correct["a"].mean() and acc["dead"] == 0.1
    weights = np.zeros(1000)
    weights[:10] = 1.0
    assert stats.accuracies(correct, weights)["a"] == correct["a"][:10].mean()


def test_sampling_variance_of_an_accuracy_difference():
    rng = np.random.default_rng(3)
    correct = _runs(rng)
    d = 100.0 * (correct["a"].astype(float) - correct["b"])
    exact = d.var() / d.size  # the bootstrap's expectation
    values = [
        stats.sampling_variance(
            lambda acc: 100 * (acc["a"] - acc["b"]), correct, seed=s
        )
        for s in range(8)
    ]
    assert np.mean(values) == pytest.approx(exact, rel=0.05)
    again = stats.sampling_variance(
        lambda acc: 100 * (acc["a"] - acc["b"]), correct, seed=0
    )
    assert again == values[0]  # deterministic for a given seed


def test_sampling_variance_is_zero_for_a_diverged_pair():
    correct = {"a": None, "b": None, "c": np.ones(10, bool)}
    assert (
        stats.sampling_variance(lambda acc: acc["a"] - acc["b"], correct) == 0
    )


def test_judge_pairs_runs_by_seed_and_rejects_unpaired_seeds():
    rng = np.random.default_rng(4)
    seeds = [_runs(rng, p=(0.95, 0.80)) for _ in range(5)]
    claim = stats.Claim("gain", "a beats b", "acc(a) - acc(b)", "points", 5.0)
    verdict = stats.judge(
        claim, lambda acc: 100 * (acc["a"] - acc["b"]), seeds
    )
    assert verdict.outcome == "supported" and verdict.se_sampling > 0
    effects = [100 * (s["a"].mean() - s["b"].mean()) for s in seeds]
    assert verdict.effects == pytest.approx(effects)
    with pytest.raises(ValueError, match="paired runs"):
        stats.judge(claim, lambda acc: 0.0, [seeds[0], {"a": seeds[0]["a"]}])
    with pytest.raises(ValueError, match="at least one seed"):
        stats.judge(claim, lambda acc: 0.0, [])
    with pytest.raises(ValueError, match="same test images"):
        stats.judge(
            claim,
            lambda acc: 0.0,
            [{"a": np.ones(5, bool), "b": np.ones(6, bool)}] * 2,
        )


def test_pack_and_unpack_correctness():
    rng = np.random.default_rng(5)
    bits = rng.random(1003) < 0.5
    text = stats.pack_correct(bits)
    assert len(text) == 2 * 126
    np.testing.assert_array_equal(stats.unpack_correct(text, 1003), bits)
    assert stats.pack_correct(None) is None
    assert stats.unpack_correct(None, 5) is None
    with pytest.raises(ValueError, match="expected 1000 images"):
        stats.unpack_correct(text, 1000)
    with pytest.raises(TypeError, match="1-D bool array"):
        stats.pack_correct(np.ones(3))


def test_resampled_counts_are_remembered_and_read_only():
    """The multinomial draws are memoized per (n, n_boot, seed): the same
    numbers as a fresh draw, and nobody can change them for later calls."""
    counts = stats._resample_counts(50, 40, 7)
    assert counts is stats._resample_counts(50, 40, 7)
    fresh = np.random.default_rng(7).multinomial(
        50, np.full(50, 1 / 50), size=40
    )
    np.testing.assert_array_equal(counts, fresh)
    assert (counts.sum(axis=1) == 50).all()
    with pytest.raises(ValueError, match="read-only"):
        counts[0, 0] = 3
