"""Benchmark classes by name: the short names of the built-in benchmarks, and import of any class path.

``build_benchmark(class_path, init_args)`` takes a short name (``ALIASES``: ``math500``, ``humaneval``, ...) or a
dotted path (``my_benchmarks.PrivateSet``, importable from ``PYTHONPATH``), checks that it names a ``Benchmark``
subclass and that ``init_args`` fit its constructor (one-line ``UserError`` otherwise, naming the arguments it
takes), and builds it. A short name may carry default arguments (``math500`` is ``MathBenchmark`` with
``schema: math500``); ``init_args`` override them.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from dft_lightning.errors import UserError
from dft_lightning.evaluation.benchmarks.base import Benchmark

__all__ = ["ALIASES", "benchmark_class", "build_benchmark", "check_arguments", "resolve_alias"]

_P = "dft_lightning.evaluation.benchmarks"
#: short name -> (class path, default init_args)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    **{name: (f"{_P}.math.MathBenchmark", {"schema": name})
       for name in ("math500", "minerva", "olympiadbench", "aime24", "amc23")},
    "gsm8k": (f"{_P}.math.GSM8KBenchmark", {}),
    "humaneval": (f"{_P}.code.HumanEvalBenchmark", {}),
    "humaneval_plus": (f"{_P}.humaneval_plus.HumanEvalPlusBenchmark", {}),
    "multipl_e": (f"{_P}.multipl_e.MultiPLEBenchmark", {}),
    **{name: (f"{_P}.multimodal.MultimodalBenchmark", {"benchmark": name})
       for name in ("mathverse", "mathvision", "wemath")},
}


def resolve_alias(class_path: str) -> tuple[str, dict[str, Any]]:
    """``(class path, default init_args)`` of a short name; a dotted path comes back unchanged with no defaults."""
    if class_path in ALIASES:
        path, defaults = ALIASES[class_path]
        return path, dict(defaults)
    return class_path, {}


def benchmark_class(class_path: str, where: str = "benchmark") -> type[Benchmark]:
    """The ``Benchmark`` subclass a short name or dotted path names."""
    path, _ = resolve_alias(class_path)
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise UserError(f"{where}: unknown benchmark {class_path!r}; give a class path (module.Class) or one of: "
                        f"{', '.join(ALIASES)}")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except ImportError as e:
        raise UserError(f"{where}: cannot import {path!r} ({e}); is its module on PYTHONPATH?") from None
    except AttributeError:
        raise UserError(f"{where}: module {module_name!r} has no {attribute!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, Benchmark)):
        raise UserError(f"{where}: {path} is not a subclass of {Benchmark.__module__}.Benchmark")
    return cls


def check_arguments(cls: type, init_args: dict[str, Any], where: str = "benchmark") -> None:
    """``UserError`` when ``init_args`` do not fit ``cls``'s constructor (an unknown name, a required one missing)."""
    parameters = inspect.signature(cls).parameters
    takes = [name for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    listed = f"it takes: {', '.join(takes) or 'no arguments'}"
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        unknown = [name for name in init_args if name not in takes]
        if unknown:
            raise UserError(f"{where}: {cls.__name__} has no argument {', '.join(map(repr, unknown))}; {listed}")
    try:
        inspect.signature(cls).bind(**init_args)
    except TypeError as e:
        raise UserError(f"{where}: {cls.__name__}: {e}; {listed}") from None


def build_benchmark(class_path: str, init_args: dict[str, Any] | None = None, where: str = "benchmark") -> Benchmark:
    """Build the benchmark ``class_path`` names with its alias defaults overridden by ``init_args``."""
    cls = benchmark_class(class_path, where)
    args = {**resolve_alias(class_path)[1], **(init_args or {})}
    check_arguments(cls, args, where)
    return cls(**args)
