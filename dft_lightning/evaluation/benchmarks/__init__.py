"""Benchmarks: classes with problems, prompts and grading (``base.Benchmark``), chosen by ``class_path`` or a short
name (``registry.ALIASES``). The math names are imported on first use (they pull in the math grader)."""

from __future__ import annotations

from typing import Any

from dft_lightning.evaluation.benchmarks.base import Benchmark, GradedBenchmark, ModelInfo

_MATH = ("BENCHMARKS", "PROMPT_TEMPLATES", "GSM8KBenchmark", "MathBenchmark", "PromptTemplate", "load_math_benchmark",
         "load_rows", "rows_to_problems", "to_messages", "to_prompt")

__all__ = ["Benchmark", "GradedBenchmark", "ModelInfo", *_MATH]


def __getattr__(name: str) -> Any:
    if name in _MATH:
        from dft_lightning.evaluation.benchmarks import math

        return getattr(math, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
