"""Evaluation: engines, benchmarks, graders and metrics (graders are pure Python, no torch).

Entry points: ``run.evaluate_model`` (and ``python -m dft_lightning evaluate``), the training
callback ``callback.EvaluationCallback``, engines ``engines.HFEngine`` / ``engines.VLLMEngine``.
"""
