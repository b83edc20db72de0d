"""The benchmarks behind ``tools/bench.py``, one module per measurement family."""
