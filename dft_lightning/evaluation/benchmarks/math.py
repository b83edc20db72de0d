"""Math benchmarks: Math500, Minerva Math, OlympiadBench, AIME24, AMC23 and GSM8K as uniform problems, prompted
and graded alike.

A problem is a plain dict ``{"id": str, "question": str, "answer": str}``, whatever the source schema:

* math500: ``problem``, ``answer`` (id: ``unique_id``)
* minerva: ``problem``, answer = content of the last ``\\boxed{}`` in ``solution`` (id: ``idx``)
* olympiadbench: ``question``, ``final_answer`` (a list, or a list written as a string; several entries
  are joined with ", ", and ``$`` signs dropped) (id: ``id``)
* aime24: ``problem``, ``answer`` (id: ``id``)
* amc23: ``question`` or ``problem``, ``answer`` (floats such as ``27.0`` become ``"27"``) (id: ``id``)
* gsm8k: ``question``, answer = what follows the last ``#### `` of ``answer`` (the worked solution), thousands
  separators dropped (``#### 1,234`` -> ``"1234"``) (id: ``id`` when present, else the row index)

A source is a local ``.jsonl``/``.json``/``.parquet`` file (or a directory of them) or a hub dataset id, read by
``dft_lightning.rows`` (``datasets`` is imported only for hub ids). A malformed line, a row that is not an object
or a row missing a required field raises ``ValueError`` naming the file and row.

``MathBenchmark(schema, source, ...)`` is the benchmark class (short names ``math500``, ``minerva``,
``olympiadbench``, ``aime24``, ``amc23``); ``GSM8KBenchmark`` is the one for GSM8K (short name ``gsm8k``; default
source the hub's ``openai/gsm8k``, configuration ``main``). Prompt templates are chosen by name
(``PROMPT_TEMPLATES``): ``qwen-boxed``, ``qwen25-math-cot``, ``deepseek-math``, ``llama-base-boxed`` and ``plain``
(the first four are the prompt types of the Qwen2.5-Math evaluation harness that the DFT paper's evaluation uses,
with the harness's stop strings). ``to_messages`` gives chat messages;
``to_prompt`` gives the raw string (through a tokenizer's chat template when one is passed). Not handled:
few-shot prompts, OlympiadBench's ``context`` images or physics subsets, and answer units (the grader strips
trailing ``\\text{}`` units, it does not convert them).

``numeric_rule="qwen"`` grades numbers by the Qwen2.5-Math harness's rule instead of the exact default (see
``graders.math`` and docs/benchmarks.md).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dft_lightning.errors import UserError
from dft_lightning.evaluation.benchmarks.base import GradedBenchmark
from dft_lightning.evaluation.graders.math import MathGrader, NumericRule, extract_boxed
from dft_lightning.rows import read_rows

__all__ = [
    "BENCHMARKS",
    "HARNESS_STOP",
    "PROMPT_TEMPLATES",
    "GSM8KBenchmark",
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


_GSM8K_NUMBER_RE = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")


def gsm8k_answer(solution: str) -> str:
    """The reference of a GSM8K solution: the text after its last ``#### ``, thousands separators dropped."""
    if "####" not in solution:
        raise _RowError("no '#### <answer>' in 'answer'")
    answer = solution.rsplit("####", 1)[1].strip()
    return _GSM8K_NUMBER_RE.sub("", answer).rstrip(".").strip()


def _gsm8k(row: Mapping[str, Any]) -> tuple[Any, str, str]:
    return row.get("id"), _field(row, "question"), gsm8k_answer(str(_field(row, "answer")))


BENCHMARKS: dict[str, Callable[[Mapping[str, Any]], tuple[Any, str, str]]] = {
    "math500": _math500,
    "minerva": _minerva,
    "olympiadbench": _olympiadbench,
    "aime24": _aime_or_amc,
    "amc23": _aime_or_amc,
    "gsm8k": _gsm8k,
}
_ALIASES = {"math_500": "math500", "math-500": "math500", "minerva_math": "minerva", "olympiad": "olympiadbench"}

# -------------------------------------------------------------------------------------------------- loading


def load_rows(source: str | Path, split: str = "test", name: str | None = None) -> tuple[list[dict], str]:
    """Raw rows of a local file or hub dataset (``dft_lightning.rows.read_rows``) and a label for errors."""
    path = Path(source).expanduser()
    rows = [row for _, row in read_rows(source, key=str(source), split=split, name=name)]
    return rows, str(path) if path.exists() else f"{source}[{split}]"


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
#: the stop strings the Qwen2.5-Math harness gives every prompt type (EOS tokens of the model families it covers)
HARNESS_STOP = ("</s>", "<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes a prompt. ``user`` holds ``{question}``; ``chat=False`` means a raw prompt.

    ``stop``: the engine's stop strings (``None``: none for chat templates, ``"\\nQuestion:"`` for raw ones)."""

    name: str
    user: str
    system: str | None = None
    chat: bool = True
    stop: tuple[str, ...] | None = None


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    # Qwen models: the model's chat template, instruction in the user turn (the harness's qwen-boxed)
    "qwen-boxed": PromptTemplate("qwen-boxed", "{question}\n" + _STEP_BY_STEP, system="You are a helpful assistant.",
                                 stop=HARNESS_STOP),
    # Qwen2.5-Math-Instruct: the instruction as the system turn
    "qwen25-math-cot": PromptTemplate("qwen25-math-cot", "{question}", system=_STEP_BY_STEP, stop=HARNESS_STOP),
    # DeepSeekMath base: its plain User/Assistant layout, no chat template
    "deepseek-math": PromptTemplate("deepseek-math", "User: {question}\n" + _STEP_BY_STEP + "\n\nAssistant:",
                                    chat=False, stop=HARNESS_STOP),
    # LLaMA base models: zero-shot Question/Answer with the step-by-step cue (assumed: the DFT code names this
    # prompt type, the public harness does not define it; so are the extra stops, Llama 3's EOS text and the
    # next invented question)
    "llama-base-boxed": PromptTemplate(
        "llama-base-boxed", "Question: {question}\n" + _STEP_BY_STEP + "\nAnswer: Let's think step by step.",
        chat=False, stop=(*HARNESS_STOP, "<|end_of_text|>", "\n\nQuestion:")),
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


class MathBenchmark(GradedBenchmark):
    """A math benchmark: problems of one source schema, a prompt template, the math grader.

    Args:
        schema: the source's schema, a key of ``BENCHMARKS`` (``math500``, ``minerva``, ``olympiadbench``,
            ``aime24``, ``amc23``, ``gsm8k``).
        source: a local file (or directory) or hub dataset id in that schema.
        split: hub split.
        subset: hub configuration name.
        limit: the first ``limit`` problems only.
        template: prompt template, a key of ``PROMPT_TEMPLATES`` (chat templates give chat messages, ``plain``
            a raw ``Question: ... Answer:`` string that stops at the next ``Question:``; ``deepseek-math`` and
            ``llama-base-boxed`` raw strings for base models without a chat template).
        numeric_rule: ``exact`` (default) or ``qwen``: how numeric answers compare (builds the default grader).
        grader: a ``MathGrader`` of your own (then not ``numeric_rule``).
        name: the label in metric names (default: ``schema``).
        problems: ready problems instead of reading ``source``.
    """

    def __init__(
        self, schema: str = "math500", source: str | Path | None = None, *, split: str = "test",
        subset: str | None = None, limit: int | None = None, template: str | PromptTemplate = "qwen-boxed",
        numeric_rule: NumericRule | None = None, grader: MathGrader | None = None, name: str | None = None,
        problems: Sequence[Problem] | None = None,
    ) -> None:
        if numeric_rule is not None and grader is not None:
            raise ValueError("pass numeric_rule or grader, not both (set it on the grader)")
        where = f"benchmark {name or schema!r}"
        if _ALIASES.get(schema, schema) not in BENCHMARKS:
            raise UserError(f"{where}: unknown math schema {schema!r}; known: {', '.join(BENCHMARKS)}")
        if isinstance(template, str) and template not in PROMPT_TEMPLATES:
            raise UserError(f"{where}: unknown template {template!r}; known: {', '.join(PROMPT_TEMPLATES)}")
        self.schema, self.source, self.split, self.subset, self.limit = schema, source, split, subset, limit
        self.template = _template(template)
        self.grader = grader or MathGrader(numeric_rule=numeric_rule or "exact")
        self.name = name or schema
        if problems is not None:
            self.problems = problems

    @classmethod
    def load(
        cls, benchmark: str, source: str | Path, numeric_rule: NumericRule | None = None, **kwargs: Any
    ) -> MathBenchmark:
        """The benchmark with its problems read now (``kwargs``: the other constructor arguments)."""
        bench = cls(benchmark, source, numeric_rule=numeric_rule, **kwargs)
        bench.problems  # noqa: B018 - read now, so a bad source fails here
        return bench

    def load_problems(self) -> list[Problem]:
        if self.source is None:
            raise UserError(f"benchmark {self.name!r}: set its source (a local file or hub id)")
        return load_math_benchmark(self.schema, self.source, split=self.split, subset=self.subset, limit=self.limit)

    def prompt(self, problem: Mapping[str, Any]) -> str | list[dict[str, str]]:
        """Chat messages for chat templates (the engine applies the model's template), raw text for ``plain``."""
        return to_messages(problem, self.template) if self.template.chat else to_prompt(problem, self.template)

    def stop_sequences(self) -> Sequence[str]:
        if self.template.stop is not None:
            return self.template.stop
        return () if self.template.chat else ("\nQuestion:",)  # a base model goes on with invented questions

    def settings(self) -> dict[str, Any]:
        return {"template": self.template.name, "numeric_rule": self.grader.numeric_rule}

    def prompt_strings(self, apply_chat_template: Callable[[list[dict[str, str]]], str] | None = None) -> list[str]:
        """Every prompt as a string (chat templates through ``apply_chat_template``, or ChatML; see ``to_prompt``)."""
        return [to_prompt(p, self.template, apply_chat_template) for p in self.problems]

    def messages(self) -> list[list[dict[str, str]]]:
        return [to_messages(p, self.template) for p in self.problems]


class GSM8KBenchmark(MathBenchmark):
    """GSM8K (grade-school word problems) from a local file or hub id in its own schema (``question``, and an
    ``answer`` whose worked solution ends in ``#### <number>``), graded on that number by the math grader.

    Args: as ``MathBenchmark`` (no ``schema``); ``source`` defaults to the hub's ``openai/gsm8k`` (``subset``
    ``main``, ``split`` ``test``: 1,319 problems).
    """

    def __init__(
        self, source: str | Path = "openai/gsm8k", *, split: str = "test", subset: str | None = "main",
        limit: int | None = None, template: str | PromptTemplate = "qwen-boxed",
        numeric_rule: NumericRule | None = None, grader: MathGrader | None = None, name: str | None = None,
        problems: Sequence[Problem] | None = None,
    ) -> None:
        super().__init__("gsm8k", source, split=split, subset=subset, limit=limit, template=template,
                         numeric_rule=numeric_rule, grader=grader, name=name, problems=problems)
