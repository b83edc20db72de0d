"""Math benchmarks: load Math500, Minerva Math, OlympiadBench, AIME24 and AMC23 into uniform problems, and
turn a problem into a prompt.

A problem is a plain dict ``{"id": str, "question": str, "answer": str}``, whatever the source schema:

* math500: ``problem``, ``answer`` (id: ``unique_id``)
* minerva: ``problem``, answer = content of the last ``\\boxed{}`` in ``solution`` (id: ``idx``)
* olympiadbench: ``question``, ``final_answer`` (a list, or a list written as a string; several entries
  are joined with ", ", and ``$`` signs dropped) (id: ``id``)
* aime24: ``problem``, ``answer`` (id: ``id``)
* amc23: ``question`` or ``problem``, ``answer`` (floats such as ``27.0`` become ``"27"``) (id: ``id``)

A source is a local ``.jsonl``/``.json`` file or a hub dataset id (read with ``datasets.load_dataset``,
imported only then). A row missing a required field raises ``ValueError`` naming the file and row.

Prompt templates are chosen by name (``PROMPT_TEMPLATES``): ``qwen-boxed``, ``qwen25-math-cot`` and
``plain``. ``to_messages`` gives chat messages; ``to_prompt`` gives the raw string (through a tokenizer's
chat template when one is passed). Not handled: few-shot prompts, OlympiadBench's ``context`` images or
physics subsets, and answer units (the grader strips trailing ``\\text{}`` units, it does not convert them).

``MathBenchmark.load(..., numeric_rule="qwen")`` grades numbers by the Qwen2.5-Math harness's rule instead
of the exact default (see ``graders.math`` and docs/benchmarks.md).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dft_lightning.errors import MissingFileError
from dft_lightning.evaluation.benchmarks.base import GradedBenchmark
from dft_lightning.evaluation.graders.math import MathGrader, NumericRule, extract_boxed

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

Problem = dict[str, str]

# ----------------------------------------------------------------------------------------------- schemas


class _RowError(ValueError):
    pass


def _field(row: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        value = row.get(name)
        if value is not None and value != "":
            return value
    raise _RowError(f"missing required field {' or '.join(repr(n) for n in names)}")


def _answer_text(value: Any) -> str:
    """A reference answer as a string; integral floats lose their ".0"."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _math500(row: Mapping[str, Any]) -> tuple[Any, str, str]:
    return row.get("unique_id"), _field(row, "problem"), _answer_text(_field(row, "answer"))


def _minerva(row: Mapping[str, Any]) -> tuple[Any, str, str]:
    if row.get("answer") not in (None, ""):
        answer = _answer_text(row["answer"])
    else:
        answer = extract_boxed(_field(row, "solution"))
        if answer is None:
            raise _RowError("no \\boxed{} answer in 'solution'")
    return row.get("idx", row.get("id")), _field(row, "problem"), answer


def _olympiad_answer(value: Any) -> str:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = [text]
        else:
            value = [text]
    if not isinstance(value, list | tuple) or not value:
        raise _RowError(f"'final_answer' is not a non-empty list: {value!r}")
    parts = [str(v).replace("$", "").strip() for v in value]
    return ", ".join(p for p in parts if p)


def _olympiadbench(row: Mapping[str, Any]) -> tuple[Any, str, str]:
    question = _field(row, "question", "problem")
    context = row.get("context")
    if context:
        question = f"{context}\n{question}"
    return row.get("id"), question, _olympiad_answer(_field(row, "final_answer"))


def _aime_or_amc(row: Mapping[str, Any]) -> tuple[Any, str, str]:
    return row.get("id"), _field(row, "question", "problem"), _answer_text(_field(row, "answer"))


BENCHMARKS: dict[str, Callable[[Mapping[str, Any]], tuple[Any, str, str]]] = {
    "math500": _math500,
    "minerva": _minerva,
    "olympiadbench": _olympiadbench,
    "aime24": _aime_or_amc,
    "amc23": _aime_or_amc,
}
_ALIASES = {"math_500": "math500", "math-500": "math500", "minerva_math": "minerva", "olympiad": "olympiadbench"}

# -------------------------------------------------------------------------------------------------- loading


def load_rows(source: str | Path, split: str = "test", name: str | None = None) -> tuple[list[dict], str]:
    """Raw rows from a local json/jsonl file, or from a hub dataset id; also returns a label for errors."""
    path = Path(source).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = []
            for line_no, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}: line {line_no} is not valid JSON: {err}") from err
            return rows, str(path)
        data = json.loads(text)
        if isinstance(data, dict):  # {"data": [...]} or {"test": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: expected a list of rows or a dict holding exactly one list")
            data = lists[0]
        return list(data), str(path)
    if path.suffix in (".json", ".jsonl") or str(source).startswith((".", "/", "~")):
        raise MissingFileError(f"benchmark file not found: {path}")
    import datasets  # lazily: only hub sources need it

    dataset = datasets.load_dataset(str(source), name, split=split)
    return [dict(row) for row in dataset], f"{source}[{split}]"


def rows_to_problems(benchmark: str, rows: Iterable[Mapping[str, Any]], label: str = "<rows>") -> list[Problem]:
    """Map source rows to ``{"id", "question", "answer"}``; errors name ``label`` and the 0-based row."""
    key = _ALIASES.get(benchmark, benchmark)
    if key not in BENCHMARKS:
        raise KeyError(f"unknown math benchmark {benchmark!r}; known: {sorted(BENCHMARKS)}")
    convert = BENCHMARKS[key]
    problems: list[Problem] = []
    for index, row in enumerate(rows):
        try:
            row_id, question, answer = convert(row)
        except _RowError as err:
            raise ValueError(f"{label}: row {index} ({key}): {err}") from None
        if not answer:
            raise ValueError(f"{label}: row {index} ({key}): empty reference answer")
        problem_id = f"{key}/{row_id if row_id is not None else index}"
        problems.append({"id": problem_id, "question": str(question), "answer": answer})
    return problems


def load_math_benchmark(
    benchmark: str,
    source: str | Path,
    split: str = "test",
    subset: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems of ``benchmark`` (a key of ``BENCHMARKS``) read from ``source`` (file path or hub id)."""
    rows, label = load_rows(source, split=split, name=subset)
    problems = rows_to_problems(benchmark, rows, label)
    return problems[:limit] if limit is not None else problems


# -------------------------------------------------------------------------------------------------- prompts

_STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes a prompt. ``user`` holds ``{question}``; ``chat=False`` means a raw prompt."""

    name: str
    user: str
    system: str | None = None
    chat: bool = True


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "qwen-boxed": PromptTemplate("qwen-boxed", "{question}\n" + _STEP_BY_STEP, system="You are a helpful assistant."),
    "qwen25-math-cot": PromptTemplate("qwen25-math-cot", "{question}", system=_STEP_BY_STEP),
    "plain": PromptTemplate("plain", "Question: {question}\nAnswer:", chat=False),
}


def _template(template: str | PromptTemplate) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    if template not in PROMPT_TEMPLATES:
        raise KeyError(f"unknown prompt template {template!r}; known: {sorted(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[template]


def to_messages(problem: Mapping[str, Any], template: str | PromptTemplate = "qwen-boxed") -> list[dict[str, str]]:
    """Chat messages for ``problem`` (a raw template becomes a single user message)."""
    tpl = _template(template)
    # str.replace, not str.format: questions and templates are full of LaTeX braces
    messages = [{"role": "system", "content": tpl.system}] if tpl.system else []
    messages.append({"role": "user", "content": tpl.user.replace("{question}", str(problem["question"]))})
    return messages


def to_prompt(
    problem: Mapping[str, Any],
    template: str | PromptTemplate = "qwen-boxed",
    apply_chat_template: Callable[[list[dict[str, str]]], str] | None = None,
) -> str:
    """The prompt string: the raw text for ``chat=False`` templates, otherwise the messages rendered by
    ``apply_chat_template`` (e.g. ``lambda m: tok.apply_chat_template(m, tokenize=False,
    add_generation_prompt=True)``), or in ChatML (Qwen's format) when none is given."""
    tpl = _template(template)
    if not tpl.chat:
        return tpl.user.replace("{question}", str(problem["question"]))
    messages = to_messages(problem, tpl)
    if apply_chat_template is not None:
        return apply_chat_template(messages)
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------------------ benchmark


@dataclass
class MathBenchmark(GradedBenchmark):
    """Data plus a grader: what the evaluation loop needs for one math benchmark."""

    name: str
    problems: list[Problem]
    template: str | PromptTemplate = "qwen-boxed"
    grader: MathGrader = field(default_factory=MathGrader)

    @classmethod
    def load(
        cls, benchmark: str, source: str | Path, numeric_rule: NumericRule | None = None, **kwargs: Any
    ) -> MathBenchmark:
        """Problems from ``source``; ``numeric_rule`` (``"exact"``/``"qwen"``) builds the default grader with it."""
        load_args = {k: kwargs.pop(k) for k in ("split", "subset", "limit") if k in kwargs}
        if numeric_rule is not None:
            if "grader" in kwargs:
                raise ValueError("pass numeric_rule or grader, not both (set it on the grader)")
            kwargs["grader"] = MathGrader(numeric_rule=numeric_rule)
        return cls(benchmark, load_math_benchmark(benchmark, source, **load_args), **kwargs)

    def prompts(self, apply_chat_template: Callable[[list[dict[str, str]]], str] | None = None) -> list[str]:
        return [to_prompt(p, self.template, apply_chat_template) for p in self.problems]

    def messages(self) -> list[list[dict[str, str]]]:
        return [to_messages(p, self.template) for p in self.problems]
