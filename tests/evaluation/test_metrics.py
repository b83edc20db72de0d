"""avg@k and unbiased pass@k: hand-computed values, brute-force enumeration, and argument checks."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from dft_lightning.evaluation.metrics import avg_at_k, group_by_problem, mean_pass_at_k, pass_at_k, summarize


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (5, 0, 3, 0.0),
        (5, 5, 1, 1.0),
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct
        (16, 1, 16, 1.0),
        (16, 4, 13, 1.0),  # n - c < k: every draw holds a correct sample
        (3, 1, 3, 1.0),
    ],
)
def test_pass_at_k_hand_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def _brute_force(n: int, c: int, k: int) -> Fraction:
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in draw) for draw in draws), len(draws))


def test_pass_at_k_matches_enumeration() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_force(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n() -> None:
    # exact big-integer binomials as the reference; the product form never builds them
    for n, c, k in [(1000, 1, 1), (1000, 3, 100), (2000, 10, 256), (5000, 1, 4999)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        value = pass_at_k(n, c, k)
        assert value == pytest.approx(float(exact), rel=1e-9)
        assert 0.0 <= value <= 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_k_hand_values() -> None:
    results = [[True, True, False, False], [True, False, False, False], [False] * 4]
    assert avg_at_k(results) == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    assert avg_at_k(results, k=2) == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert avg_at_k([[1, 0, 1]]) == pytest.approx(2 / 3)  # ints count as booleans
    # with all samples, avg@n equals the mean pass@1
    assert avg_at_k(results) == pytest.approx(mean_pass_at_k(results, 1))


def test_mean_pass_at_k_and_summary() -> None:
    results = [[True, False, False, False], [False, False, True, True], [False] * 4]
    assert mean_pass_at_k(results, 2) == pytest.approx((0.5 + 5 / 6 + 0.0) / 3)
    summary = summarize(results, ks=(1, 2, 8))
    assert set(summary) == {"avg@4", "pass@1", "pass@2"}  # pass@8 needs 8 samples
    assert summary["avg@4"] == pytest.approx(0.25)
    assert summary["pass@2"] == pytest.approx(mean_pass_at_k(results, 2))


def test_uneven_sample_counts() -> None:
    results = [[True, False], [True, True, False, False]]
    assert avg_at_k(results) == pytest.approx(0.5)
    assert summarize(results) == {"avg@2": pytest.approx(0.75), "pass@1": pytest.approx(0.75)}  # first 2 each
    with pytest.raises(ValueError, match="fewer than k=3"):
        avg_at_k(results, k=3)


def test_argument_checks_and_grouping() -> None:
    with pytest.raises(ValueError, match="no problems"):
        avg_at_k([])
    with pytest.raises(ValueError, match="no samples"):
        avg_at_k([[True], []])
    with pytest.raises(ValueError, match="k must be"):
        mean_pass_at_k([[True]], 0)
    assert group_by_problem([True, False, False, True], 2) == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="do not split"):
        group_by_problem([True] * 3, 2)
