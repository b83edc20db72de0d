"""What every benchmark shares: grading ``k`` samples per problem through its grader's batch path.

A benchmark class holds ``name``, ``problems`` and a ``grader`` with ``grade(problem, completion)``
and ``grade_batch(problems, completions) -> (results, stats)``; mixing in ``GradedBenchmark`` gives
it ``grade`` and ``grade_samples``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class GradedBenchmark:
    """Mixin: ``grade`` one completion, ``grade_samples`` all of them in one batch."""

    name: str
    problems: list[Any]
    grader: Any

    def grade(self, problem: Mapping[str, Any], completion: str) -> bool:
        return self.grader.grade(problem, completion)

    def grade_samples(self, completions: Sequence[Sequence[str]]) -> tuple[list[list[bool]], Any]:
        """``completions[i]`` holds the k samples of problem i; returns per-problem correctness and stats."""
        if len(completions) != len(self.problems):
            raise ValueError(f"{self.name}: {len(self.problems)} problems but {len(completions)} sample lists")
        flat_problems = [p for p, samples in zip(self.problems, completions, strict=True) for _ in samples]
        flat = [c for samples in completions for c in samples]
        results, stats = self.grader.grade_batch(flat_problems, flat)
        nested, start = [], 0
        for samples in completions:
            nested.append(list(results[start : start + len(samples)]))
            start += len(samples)
        return nested, stats
