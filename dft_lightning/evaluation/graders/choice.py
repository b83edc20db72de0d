"""Multiple-choice grading by rule: find the option letter a completion commits to, compare it with the answer.

``extract_choice`` looks, in this order, for:

1. the last ``\\boxed{}`` holding a letter: ``\\boxed{B}``, ``\\boxed{(B)}``, ``\\boxed{\\text{B}}``,
   ``\\boxed{B. 60^\\circ}``;
2. the last explicit statement: "the answer is (B)", "Answer: C", "**Answer:** $D$", "the correct option is
   B", "option (C)", "B is correct", "B is the answer";
3. a last line that is only a letter: "B", "(B)", "**B**", "B.", or that starts with one: "B. 60°", "(B) 60°";
4. a boxed value equal to exactly one option's text (``\\boxed{60^\\circ}`` with option B "60°").

It is conservative on purpose: a letter is taken only where it stands as an answer. The article "A" is the
trap: "the answer is A triangle ..." or a last line "A circle has ..." do not give A, because a bare letter
followed by a lower-case word reads as prose; "point B" or "triangle ABC" in the reasoning are never read
as answers, and no "last capital letter anywhere" fallback exists. A statement naming two letters ("B or C")
gives nothing. Only letters of the problem's option set count (``letters``, default A-E).

``grade_choice`` compares with the reference letter (``"B"``, ``"(B)"``, ``"b."`` are all B).
``ChoiceGrader`` grades problem dicts: multiple-choice ones by letter, free-form ones through the math grader
(``graders.math``), both in the math grader's process pool with its per-item time limit.

What it does not do: judge free text that names an option without its letter or exact value ("the second
one"), accept several letters for multi-answer questions, or read intent the way a judge model does.
``docs/benchmarks.md`` explains how these rule-based scores differ from judge-model (GPT-4o) scores.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence

from dft_lightning.evaluation.graders.math import (
    GradingStats,
    extract_boxed,
    grade_math,
    grade_math_batch,
    normalize_answer,
)

__all__ = [
    "ChoiceGrader",
    "extract_choice",
    "grade_choice",
    "grade_problem",
    "normalize_choice",
    "option_letters",
]

DEFAULT_LETTERS = "ABCDE"
MAX_OPTIONS = 26

_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}")
_DECOR = "*_`$ \t"
# a letter standing alone as an answer: "B", "(B)", "[B]", "B.", "B)", "B:"; group 1 the letter, group 2 the rest
_LETTER_ONLY_RE = re.compile(r"^[\(\[]?([A-Z])[\)\]]?[.:)]?$")
_LETTER_LEAD_RE = re.compile(r"^(?:[\(\[]([A-Z])[\)\]]|([A-Z])[.:)])\s*(\S.*)$")
_OPTION_WORD_RE = re.compile(r"^(?i:option|choice)\s+[\(\[]?([A-Z])[\)\]]?[.:]?$")

_ANSWER_WORDS = r"(?i:(?:final\s+|correct\s+|right\s+|best\s+)?(?:answer|option|choice))"
_LINK = r"(?i:\s*(?:is|:|=|would\s+be|should\s+be|must\s+be|will\s+be)?\s*(?:option|choice)?\s*[:：]?\s*)"
_TOKEN = r"(?:\s*(?:\*\*|\$|\\text\{|\\textbf\{|\\mathrm\{))*\s*(\(|\[)?\s*([A-Z])\s*(\)|\])?(?:\s*(?:\*\*|\$|\}))*"
_STATEMENT_RE = re.compile(_ANSWER_WORDS + _LINK + _TOKEN)
_VERDICT_RE = re.compile(
    r"(?<![\w\\])(\(|\[)?([A-Z])(\)|\])?\s+(?i:is\s+(?:the\s+)?(?:correct|right|answer|best))(?![\w])"
)


def option_letters(n: int) -> str:
    """The first ``n`` option letters: ``option_letters(4) == "ABCD"``."""
    if not 1 <= n <= MAX_OPTIONS:
        raise ValueError(f"need 1..{MAX_OPTIONS} options, got {n}")
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def _clean(text: str) -> str:
    text = _WRAP_RE.sub(r"\1", text)
    return text.strip().strip(_DECOR).strip()


def normalize_choice(answer: object, letters: str = DEFAULT_LETTERS) -> str | None:
    """A reference answer as a letter of ``letters`` ("B", "(b)", "B.", "Option B" -> "B"), else None."""
    text = _clean(str(answer))
    match = _LETTER_ONLY_RE.match(text.upper()) or _OPTION_WORD_RE.match(text)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    return None


def _letter_of(text: str, letters: str) -> str | None:
    """A letter when ``text`` (a box's content or a line) is an answer letter, alone or leading an option."""
    text = _clean(text)
    for pattern in (_LETTER_ONLY_RE, _OPTION_WORD_RE):
        match = pattern.match(text)
        if match and match.group(1) in letters:
            return match.group(1)
    match = _LETTER_LEAD_RE.match(text)
    if match:
        letter = match.group(1) or match.group(2)
        if letter in letters:
            return letter
    return None


def _stands_alone(text: str, end: int, wrapped: bool) -> bool:
    """After a candidate letter ending at ``end``: not part of a word, and not an article before a noun."""
    rest = text[end:]
    if rest[:1].isalnum() or (rest[:1] and rest[:1] in "_'’"):
        return False
    if wrapped:
        return True
    return not re.match(r"\s+[a-z]", rest)  # "A triangle", "B is ..." read as prose


def _statement_letter(text: str, letters: str) -> str | None:
    best: tuple[int, str] | None = None
    for match in _STATEMENT_RE.finditer(text):
        opened, letter, closed = match.group(1), match.group(2), match.group(3)
        if letter not in letters or bool(opened) != bool(closed):
            continue
        wrapped = bool(opened) or match.group(0).rstrip().endswith(("**", "$", "}"))
        if not _stands_alone(text, match.end(), wrapped):
            continue
        tail = text[match.end() : match.end() + 12]
        if re.match(r"\s*(?:,|/|or\b|and\b)\s*[\(\[]?[A-Z]\b", tail):  # "B or C", "B, D": no single answer
            continue
        if best is None or match.start() > best[0]:
            best = (match.start(), letter)
    for match in _VERDICT_RE.finditer(text):
        opened, letter, closed = match.groups()
        if letter in letters and bool(opened) == bool(closed) and (best is None or match.start() > best[0]):
            before = text[: match.start()].rstrip()
            if not re.search(r"(?i:\b(?:not|if|whether)\s*$)", before):
                best = (match.start(), letter)
    return best[1] if best else None


def _option_matching(value: str, options: Sequence[str], letters: str) -> str | None:
    """The letter of the single option whose text equals ``value`` (normalised, or as numbers), else None."""
    target = normalize_answer(_clean(value))
    if not target:
        return None
    hits = []
    for letter, option in zip(letters, options, strict=False):
        text = normalize_answer(_clean(str(option)))
        if text == target:
            hits.append(letter)
            continue
        try:
            if math.isclose(float(text), float(target), rel_tol=1e-9, abs_tol=1e-12):
                hits.append(letter)
        except ValueError:
            pass
    return hits[0] if len(hits) == 1 else None


def extract_choice(text: str, letters: str = DEFAULT_LETTERS, options: Sequence[str] | None = None) -> str | None:
    """The option letter ``text`` commits to, or None (see the module docstring for the rules)."""
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        letter = _letter_of(boxed, letters)
        if letter is not None:
            return letter
    letter = _statement_letter(text, letters)
    if letter is not None:
        return letter
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines:
        last = lines[-1].strip()
        letter = _letter_of(last, letters)
        if letter is not None and not re.match(r"^[A-Z][.:)]?\s+[a-z]", _clean(last)):
            return letter
    if boxed is not None and options:
        return _option_matching(boxed, options, letters)
    return None


def grade_choice(
    completion: str, answer: object, options: Sequence[str] | None = None, letters: str | None = None
) -> bool:
    """Whether ``completion`` picks the reference letter ``answer``. ``letters`` defaults to one letter per
    option when ``options`` are given, else A-E."""
    letters = letters or (option_letters(len(options)) if options else DEFAULT_LETTERS)
    reference = normalize_choice(answer, letters)
    if reference is None:
        raise ValueError(f"reference answer {answer!r} is not one of the letters {letters!r}")
    return extract_choice(completion, letters, options) == reference


# ------------------------------------------------------------------------------------------------ problems


def grade_problem(problem: Mapping[str, object], completion: str) -> bool:
    """One problem dict: ``question_type == "multiple_choice"`` goes by letter (``answer``, ``options``,
    ``letters``), anything else through the math grader against ``answer``."""
    if problem.get("question_type") == "multiple_choice":
        options = [str(o) for o in problem.get("options") or ()]
        letters = str(problem.get("letters") or "") or None
        return grade_choice(completion, problem["answer"], options or None, letters)
    return grade_math(completion, str(problem["answer"]))


def _grade_encoded(completion: str, encoded: str) -> bool:
    """``grade_problem`` with the problem as JSON (picklable for the math grader's worker processes)."""
    return grade_problem(json.loads(encoded), completion)


def _reference(problem: Mapping[str, object]) -> dict[str, object]:
    keys = ("question_type", "answer", "options", "letters")
    return {k: problem[k] for k in keys if problem.get(k) is not None}


class ChoiceGrader:
    """Grades multiple-choice and free-form problems (see ``grade_problem``): ``grade`` in this process,
    ``grade_batch`` in worker processes with ``timeout_s`` per item (``workers=0``: in this process)."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, memory_limit_mb: int | None = None) -> None:
        self.workers, self.timeout_s, self.memory_limit_mb = workers, timeout_s, memory_limit_mb

    def grade(self, problem: Mapping[str, object], completion: str) -> bool:
        return grade_problem(problem, completion)

    def grade_batch(
        self, problems: Sequence[Mapping[str, object]], completions: Sequence[str]
    ) -> tuple[list[bool], GradingStats]:
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        pairs = [(c, json.dumps(_reference(p))) for p, c in zip(problems, completions, strict=True)]
        return grade_math_batch(
            pairs,
            workers=self.workers,
            timeout_s=self.timeout_s,
            grade_fn=_grade_encoded,
            memory_limit_mb=self.memory_limit_mb,
        )
