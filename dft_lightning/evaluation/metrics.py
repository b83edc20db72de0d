"""Sampling metrics over per-problem correctness: avg@k and the unbiased pass@k estimator.

Input everywhere is ``results[i][j]``: whether sample ``j`` of problem ``i`` was graded correct.

* ``avg_at_k``: accuracy averaged over the k samples of each problem, then over problems (the DFT paper's
  "Average@16"). With k samples per problem it is the expected pass@1.
* ``pass_at_k``: Chen et al. (2021), the probability that at least one of k samples drawn without
  replacement from n (c of them correct) is correct, ``1 - C(n-c, k) / C(n, k)``, computed as the product
  ``prod_{i=n-c+1..n} (1 - k/i)`` so no huge binomials or cancellations appear.

Pure Python, no torch or numpy. Not handled: confidence intervals, majority voting (maj@k), weighting
problems by anything but equally.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["avg_at_k", "group_by_problem", "mean_pass_at_k", "pass_at_k", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct.

    Raises:
        ValueError: when not ``0 <= c <= n`` or not ``1 <= k <= n``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _checked(results: Sequence[Sequence[bool]], k: int | None) -> tuple[list[Sequence[bool]], int | None]:
    rows = list(results)
    if not rows:
        raise ValueError("no problems to average over")
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        short = [i for i, row in enumerate(rows) if len(row) < k]
        if short:
            raise ValueError(f"problems {short[:5]} have fewer than k={k} samples")
    elif any(len(row) == 0 for row in rows):
        raise ValueError("a problem has no samples")
    return rows, k


def avg_at_k(results: Sequence[Sequence[bool]], k: int | None = None) -> float:
    """Mean over problems of the fraction correct among the first ``k`` samples (all samples if None)."""
    rows, k = _checked(results, k)
    per_problem = [sum(bool(x) for x in row[:k]) / len(row[:k]) for row in rows]
    return sum(per_problem) / len(per_problem)


def mean_pass_at_k(results: Sequence[Sequence[bool]], k: int) -> float:
    """Unbiased pass@k averaged over problems (each problem uses all of its n >= k samples)."""
    rows, _ = _checked(results, k)
    return sum(pass_at_k(len(row), sum(bool(x) for x in row), k) for row in rows) / len(rows)


def summarize(results: Sequence[Sequence[bool]], ks: Iterable[int] = (1,)) -> dict[str, float]:
    """``{"avg@n": ..., "pass@k": ...}`` for the common sample count n and every k <= n in ``ks``.

    ``n`` is the smallest number of samples any problem has; every metric uses each problem's first n
    samples, so avg@n equals pass@1.
    """
    rows, _ = _checked(results, None)
    n = min(len(row) for row in rows)
    rows = [row[:n] for row in rows]
    out = {f"avg@{n}": avg_at_k(rows, n)}
    for k in sorted(set(ks)):
        if 1 <= k <= n:
            out[f"pass@{k}"] = mean_pass_at_k(rows, k)
    return out


def group_by_problem(flat: Sequence[bool], samples_per_problem: int) -> list[list[bool]]:
    """Split a flat list ordered problem-major (all samples of problem 0, then problem 1, ...)."""
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem must be >= 1, got {samples_per_problem}")
    if len(flat) % samples_per_problem:
        raise ValueError(f"{len(flat)} results do not split into groups of {samples_per_problem}")
    return [list(flat[i : i + samples_per_problem]) for i in range(0, len(flat), samples_per_problem)]
