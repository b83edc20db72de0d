"""The benchmark interface: load problems, build a prompt per problem, grade a completion.

A benchmark is a class, chosen in a config by ``class_path`` and built with ``init_args`` (see
``benchmarks.registry`` for the short names of the built-in ones). Its constructor takes settings only (a source,
a split, a prompt style); problems are read once, on first use of ``problems``. A subclass implements:

* ``load_problems() -> list[dict]``: the problems, one dict each (``evaluate`` records a problem's ``id`` or
  ``task_id`` and its ``answer`` next to the completions when the dict has them);
* ``prompt(problem)``: what the engine gets: a string (raw completion), a chat (a list of ``{"role", "content"}``
  messages, rendered with the model's chat template), or an image + text chat (contents as lists of
  ``{"type": "image", "image": ...}`` and ``{"type": "text", "text": ...}`` parts);
* ``grade(problem, completion) -> bool``.

Optional: ``name`` (the default metric label, ``eval/<name>/avg@k``), ``group_keys`` (problem fields, or fields
of a problem's ``meta`` dict, to break scores down by in ``summary.json``), ``stop_sequences()`` (stop strings
for the engine), ``setup(model)`` (called once before prompting with what ``evaluate`` knows about the model,
``ModelInfo``; prompt-style decisions go there) and ``grade_batch(problems, completions)`` (grade many at once,
e.g. in a process pool; the default calls ``grade`` on each). ``GradedBenchmark`` is the base for benchmarks
whose grading lives in a ``grader`` object (``grade`` and ``grade_batch``), as all the built-in ones do.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Benchmark", "GradedBenchmark", "ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """What ``evaluate`` tells a benchmark about the model before prompting (``Benchmark.setup``).

    ``chat``: whether the model counts as a chat model (``evaluation.model_kind`` says how that is decided);
    ``reason``: why, in words (recorded in ``summary.json``).
    """

    name: str
    chat: bool = False
    reason: str = ""


class Benchmark(abc.ABC):
    """Problems, a prompt per problem, a grade per completion (see the module docstring)."""

    name: str = "benchmark"
    group_keys: tuple[str, ...] = ()
    _problems: list[Any] | None = None

    @abc.abstractmethod
    def load_problems(self) -> list[Any]:
        """Read the problems (called once, on first use of ``problems``)."""

    @abc.abstractmethod
    def prompt(self, problem: Any) -> Any:
        """The prompt of one problem: a string, a chat, or an image + text chat."""

    @abc.abstractmethod
    def grade(self, problem: Any, completion: str) -> bool:
        """Whether ``completion`` solves ``problem``."""

    @property
    def problems(self) -> list[Any]:
        if self._problems is None:
            self._problems = list(self.load_problems())
        return self._problems

    @problems.setter
    def problems(self, problems: Sequence[Any]) -> None:
        self._problems = list(problems)

    def setup(self, model: ModelInfo) -> None:
        """Called once before ``prompts``; nothing by default."""
        return None

    def stop_sequences(self) -> Sequence[str]:
        """Stop strings for the engine (none by default)."""
        return ()

    def settings(self) -> dict[str, Any]:
        """Decisions worth recording in ``summary.json`` (e.g. the prompt style ``auto`` chose); none by default."""
        return {}

    def prompts(self) -> list[Any]:
        return [self.prompt(p) for p in self.problems]

    def grade_batch(self, problems: Sequence[Any], completions: Sequence[str]) -> tuple[list[bool], Any]:
        """``completions[i]`` against ``problems[i]``; returns the grades and grading stats (``None`` here)."""
        return [bool(self.grade(p, c)) for p, c in zip(problems, completions, strict=True)], None

    def grade_samples(self, completions: Sequence[Sequence[str]]) -> tuple[list[list[bool]], Any]:
        """``completions[i]`` holds the k samples of problem i; returns per-problem correctness and stats."""
        problems = self.problems
        if len(completions) != len(problems):
            raise ValueError(f"{self.name}: {len(problems)} problems but {len(completions)} sample lists")
        flat_problems = [p for p, samples in zip(problems, completions, strict=True) for _ in samples]
        flat = [c for samples in completions for c in samples]
        results, stats = self.grade_batch(flat_problems, flat)
        nested, start = [], 0
        for samples in completions:
            nested.append(list(results[start : start + len(samples)]))
            start += len(samples)
        return nested, stats


class GradedBenchmark(Benchmark):
    """A benchmark graded by ``self.grader`` (an object with ``grade`` and ``grade_batch``)."""

    grader: Any

    def grade(self, problem: Mapping[str, Any], completion: str) -> bool:
        return self.grader.grade(problem, completion)

    def grade_batch(self, problems: Sequence[Any], completions: Sequence[str]) -> tuple[list[bool], Any]:
        return self.grader.grade_batch(problems, completions)
