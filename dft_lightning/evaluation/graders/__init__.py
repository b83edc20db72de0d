"""Graders: decide whether a completion answers a problem correctly. Pure Python, no torch."""

from dft_lightning.evaluation.graders.math import (
    GradingStats,
    MathGrader,
    extract_answer,
    extract_boxed,
    grade_math,
    grade_math_batch,
    is_equivalent,
    normalize_answer,
)

__all__ = [
    "GradingStats",
    "MathGrader",
    "extract_answer",
    "extract_boxed",
    "grade_math",
    "grade_math_batch",
    "is_equivalent",
    "normalize_answer",
]
