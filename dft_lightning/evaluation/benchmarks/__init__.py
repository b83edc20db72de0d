"""Benchmarks: problems plus a grader, loaded from local files or the hub."""

from dft_lightning.evaluation.benchmarks.math import (
    BENCHMARKS,
    PROMPT_TEMPLATES,
    MathBenchmark,
    PromptTemplate,
    load_math_benchmark,
    load_rows,
    rows_to_problems,
    to_messages,
    to_prompt,
)

__all__ = [
    "BENCHMARKS",
    "PROMPT_TEMPLATES",
    "MathBenchmark",
    "PromptTemplate",
    "load_math_benchmark",
    "load_rows",
    "rows_to_problems",
    "to_messages",
    "to_prompt",
]
