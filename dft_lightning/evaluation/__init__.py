"""Evaluation: engines, benchmarks, graders and metrics (graders are pure Python, no torch)."""
