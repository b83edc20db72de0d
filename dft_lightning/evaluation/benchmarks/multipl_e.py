"""MultiPL-E: HumanEval (and MBPP) translated to other languages, graded by running each language's tests.

A row is MultiPL-E's as published (hub ``nuprl/MultiPL-E``, configs ``humaneval-<lang>`` / ``mbpp-<lang>``,
split ``test``): ``name`` (``HumanEval_53_add``), ``language`` (``cpp``, ``js``, ...), ``prompt`` (imports,
doc comment and the function header the model continues), ``tests`` (the test suite, written to follow the
completion), ``stop_tokens`` (where a completion ends; a list, or a JSON string of one) and extra fields
(``doctests``, ``original``, ``prompt_terminology``) that are kept as they are. The program is MultiPL-E's:
``prompt + completion + "\\n" + tests``, with the completion first cut at its earliest stop token, as
MultiPL-E does before evaluation. This matters: in C++ or Bash the stop token is ``"\\n}"`` and the tests begin
with the ``}`` that closes the function, so an uncut completion would not compile.

Grading goes through ``dft_lightning.evaluation.runners`` (one sandboxed run per completion, per-language
limits, a random marker proving the tests ran to the end). A language whose toolchain or library is missing is
never graded as wrong: ``grade`` raises ``RunnerUnavailable``, and ``MultiPLEBenchmark.load`` either raises
(``missing="raise"``) or sets those problems aside in ``skipped`` (``missing="skip"``, the default, logged as a
warning) so ``summary`` reports, per language, the metrics of what ran and the count of what did not.

Sources: a local ``.jsonl``/``.json``/``.parquet`` file of rows, or a hub dataset id, read by
``dft_lightning.rows``; for ``nuprl/MultiPL-E`` give ``languages=[...]`` and the configs ``humaneval-<lang>``
are read one by one.

Prompts: ``prompt_style`` ``completion`` (MultiPL-E's raw prompts and stop tokens), ``chat`` (an instruction and
the stub in the problem's language; the code is taken from the reply's fenced block and fitted to the stub before
the stop tokens cut it, see ``benchmarks.code_chat``) or ``auto`` (default: ``chat`` for chat models).

Not handled: languages without a runner (``runners.RUNNERS`` lists them), and MultiPL-E's per-language output
checks (its PHP and Perl evaluators also look for "PHP Parse error" / "ERROR" in the output; here exit code and
marker decide).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dft_lightning.evaluation.benchmarks.code import CodeBenchmark
from dft_lightning.evaluation.benchmarks.code_chat import PromptStyle
from dft_lightning.evaluation.metrics import summarize
from dft_lightning.evaluation.runners import (
    RUNNERS,
    Runner,
    RunnerUnavailable,
    RunOutcome,
    canonical_language,
    check_available,
    get_runner,
    run_source,
)
from dft_lightning.evaluation.sandbox import Limits
from dft_lightning.rows import looks_local, read_rows

__all__ = [
    "MULTIPL_E_FIELDS",
    "MULTIPL_E_HUB_ID",
    "MultiPLEBenchmark",
    "MultiPLEGrade",
    "MultiPLEGrader",
    "MultiPLEStats",
    "SkippedLanguage",
    "known_languages",
    "load_multipl_e",
    "multipl_e_program",
    "truncate_at_stop",
]

logger = logging.getLogger(__name__)

MULTIPL_E_FIELDS = ("name", "language", "prompt", "tests", "stop_tokens")
MULTIPL_E_HUB_ID = "nuprl/MultiPL-E"

# ------------------------------------------------------------------------------------------------- loading


def _stop_tokens(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: 'stop_tokens' is a string but not a JSON list ({exc.msg})") from None
    if not isinstance(value, list | tuple) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"{where}: 'stop_tokens' must be a list of non-empty strings, got {value!r}")
    return list(value)


def _to_problem(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [k for k in MULTIPL_E_FIELDS if row.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    wrong = [k for k in ("name", "language", "prompt", "tests") if not isinstance(row[k], str)]
    if wrong:
        raise ValueError(f"{where}: field(s) {wrong} must be strings")
    language = canonical_language(row["language"])
    return {
        **row,
        "id": f"{language}/{row['name']}",
        "language": language,
        "stop_tokens": _stop_tokens(row["stop_tokens"], where),
    }


def load_multipl_e(
    source: str | Path = MULTIPL_E_HUB_ID,
    *,
    languages: Iterable[str] | None = None,
    dataset: str = "humaneval",
    split: str = "test",
    subset: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """MultiPL-E problems from a local file or the hub, in source order.

    ``languages`` filters rows (local files) or, for a hub id without ``subset``, picks the configs
    ``f"{dataset}-{language}"``. ``limit`` keeps the first ``limit`` problems *per language*. Each problem is the
    row plus ``id`` (``"<language>/<name>"``), the canonical ``language`` and ``stop_tokens`` as a list.
    Problem ids must be unique.
    """
    wanted = [canonical_language(x) for x in languages] if languages is not None else None
    if not looks_local(source) and subset is None and wanted:
        configs: list[str | None] = [f"{dataset}-{lang}" for lang in wanted]
    else:
        configs = [subset]
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    per_language: Counter[str] = Counter()
    for config in configs:
        rows = read_rows(source, key="multipl_e", split=split, name=config)
        label = str(Path(source).expanduser()) if looks_local(source) else f"{source}[{config or split}]"
        for index, (_, row) in enumerate(rows):
            problem = _to_problem(row, f"{label}: row {index}")
            language = problem["language"]
            if wanted is not None and language not in wanted:
                continue
            if limit is not None and per_language[language] >= limit:
                continue
            if problem["id"] in seen:
                raise ValueError(f"{label}: row {index}: duplicate problem {problem['id']!r}")
            seen.add(problem["id"])
            per_language[language] += 1
            problems.append(problem)
    if not problems:
        raise ValueError(f"{source}: no MultiPL-E problems" + (f" for languages {wanted}" if wanted else ""))
    return problems


# ------------------------------------------------------------------------------------------------- grading


def truncate_at_stop(completion: str, stop_tokens: Sequence[str]) -> str:
    """``completion`` up to (not including) the earliest occurrence of any stop token."""
    cut = min((i for i in (completion.find(t) for t in stop_tokens if t) if i >= 0), default=len(completion))
    return completion[:cut]


def multipl_e_program(
    problem: Mapping[str, Any], completion: str, marker: str | None = None, *, truncate: bool = True
) -> tuple[str, bool]:
    """The program MultiPL-E runs (``prompt + completion + "\\n" + tests``), with the proof marker placed when
    given; returns (source, marker placed)."""
    if truncate:
        completion = truncate_at_stop(completion, problem["stop_tokens"])
    runner = get_runner(problem["language"])
    return runner.program(problem["prompt"], completion, problem["tests"], marker)


@dataclass(frozen=True)
class MultiPLEGrade:
    """One graded completion: the verdict and the run behind it (``outcome.result`` has stdout/stderr)."""

    passed: bool
    outcome: RunOutcome


@dataclass
class MultiPLEStats:
    """A batch: items, passes, runs cut off by a time limit, killed runs, sandbox errors, programs that did not
    compile, runs judged without the marker (tests of an unexpected shape), per-language (items, passed), and
    wall seconds."""

    items: int = 0
    passed: int = 0
    timeouts: int = 0
    killed: int = 0
    errors: int = 0
    compile_errors: int = 0
    unproved: int = 0
    by_language: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class MultiPLEGrader:
    """Grades MultiPL-E completions. ``limits`` overrides a language's default limits (``{"cpp": Limits(...)}``);
    ``runners`` replaces the runner table (default ``runners.RUNNERS``); ``workers`` runs at a time."""

    workers: int | None = None
    truncate: bool = True
    limits: dict[str, Limits] = field(default_factory=dict)
    runners: dict[str, Runner] | None = None

    def runner(self, problem: Mapping[str, Any]) -> Runner:
        return get_runner(problem["language"], self.runners)

    def unavailable(self, problem: Mapping[str, Any]) -> RunnerUnavailable | None:
        """Why ``problem`` cannot be graded here (toolchain or library missing), or None when it can."""
        try:
            runner = self.runner(problem)
            check_available(runner, f"{problem['prompt']}\n{problem['tests']}")
        except RunnerUnavailable as exc:
            return exc
        return None

    def check(self, problem: Mapping[str, Any], completion: str, truncate: bool | None = None) -> MultiPLEGrade:
        """Grade one completion, keeping the run (``truncate``: cut at the stop tokens; default ``self.truncate``).
        Raises ``RunnerUnavailable`` when the language cannot run."""
        runner = self.runner(problem)
        cut = self.truncate if truncate is None else truncate
        text = truncate_at_stop(completion, problem["stop_tokens"]) if cut else completion
        marker = f"DFT-PASS-{secrets.token_hex(16)}"
        source, placed = runner.program(problem["prompt"], text, problem["tests"], marker)
        limits = self.limits.get(runner.language)
        outcome = run_source(runner, source, marker=marker if placed else None, limits=limits)
        return MultiPLEGrade(outcome.passed, outcome)

    def grade(self, problem: Mapping[str, Any], completion: str) -> bool:
        return self.check(problem, completion).passed

    def grade_batch(
        self,
        problems: Sequence[Mapping[str, Any]],
        completions: Sequence[str],
        details: list[MultiPLEGrade] | None = None,
        truncate: Sequence[bool | None] | None = None,
    ) -> tuple[list[bool], MultiPLEStats]:
        """``completions[i]`` against ``problems[i]`` (``truncate[i]``: see ``check``). Every language is checked
        before anything runs, so a missing toolchain raises ``RunnerUnavailable`` instead of turning into
        failures."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        checked: set[int] = set()
        for problem in problems:  # samples repeat their problem: probe each distinct problem once
            if id(problem) not in checked:
                checked.add(id(problem))
                missing = self.unavailable(problem)
                if missing is not None:
                    raise missing
        started = time.monotonic()
        workers = max(1, self.workers or os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="multipl-e") as pool:
            grades = list(pool.map(self.check, problems, completions, truncate or [None] * len(problems)))
        stats = MultiPLEStats(items=len(grades), seconds=time.monotonic() - started)
        for problem, grade in zip(problems, grades, strict=True):
            status = grade.outcome.result.status
            stats.passed += grade.passed
            stats.timeouts += status == "timeout"
            stats.killed += status == "killed"
            stats.errors += status == "error"
            stats.compile_errors += grade.outcome.compile_error
            stats.unproved += not grade.outcome.proved
            counts = stats.by_language.setdefault(problem["language"], [0, 0])
            counts[0] += 1
            counts[1] += grade.passed
        if details is not None:
            details.extend(grades)
        return [g.passed for g in grades], stats


# ----------------------------------------------------------------------------------------------- benchmark


@dataclass(frozen=True)
class SkippedLanguage:
    """Problems of one language set aside because something they need is missing here."""

    language: str
    problems: int
    tool: str
    reason: str


class MultiPLEBenchmark(CodeBenchmark):
    """MultiPL-E: problems in several languages, graded by each language's runner; ``skipped`` lists the
    languages that cannot run here (filled when the problems are read).

    Args:
        source: a local file of MultiPL-E rows or a hub id (default ``nuprl/MultiPL-E``).
        languages: the languages to run (local files: a filter; the hub: the configs ``<dataset>-<lang>``).
        dataset: ``humaneval`` or ``mbpp`` (hub configs).
        split: hub split.
        subset: one hub configuration instead of ``languages``.
        limit: the first ``limit`` problems *per language*.
        missing: a language whose toolchain is missing: ``skip`` (counted in ``skipped``) or ``raise``.
        prompt_style: ``completion``, ``chat`` or ``auto`` (see ``benchmarks.code_chat``).
        grader: a ``MultiPLEGrader`` of your own (limits, runners, workers).
        name: the label in metric names.
        problems: ready problems instead of reading ``source`` (checked against the toolchains all the same).
    """

    name = "multipl_e"

    def __init__(
        self, source: str | Path = MULTIPL_E_HUB_ID, *, languages: Iterable[str] | None = None,
        dataset: str = "humaneval", split: str = "test", subset: str | None = None, limit: int | None = None,
        missing: Literal["skip", "raise"] = "skip", prompt_style: PromptStyle = "auto",
        grader: MultiPLEGrader | None = None, name: str | None = None,
        problems: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        if missing not in ("skip", "raise"):
            raise ValueError(f"missing must be 'skip' or 'raise', got {missing!r}")
        self.name = name or type(self).name
        super().__init__(prompt_style)
        self.source, self.languages_wanted = source or MULTIPL_E_HUB_ID, list(languages) if languages else None
        self.dataset, self.split, self.subset, self.limit, self.missing = dataset, split, subset, limit, missing
        self.grader = grader or MultiPLEGrader()
        self.skipped: dict[str, SkippedLanguage] = {}
        self._given = list(problems) if problems is not None else None

    @classmethod
    def load(cls, source: str | Path = MULTIPL_E_HUB_ID, **kwargs: Any) -> MultiPLEBenchmark:
        """The benchmark with its problems read and every language checked now (``kwargs``: the other constructor
        arguments)."""
        bench = cls(source, **kwargs)
        bench.problems  # noqa: B018 - read now, so a bad source or (missing="raise") a missing toolchain fails here
        return bench

    def load_problems(self) -> list[dict[str, Any]]:
        """The problems whose languages run here (see ``check_toolchains``)."""
        if self._given is not None:
            problems = self._given
        else:
            problems = load_multipl_e(self.source, languages=self.languages_wanted, dataset=self.dataset,
                                      split=self.split, subset=self.subset, limit=self.limit)
        return self._runnable(problems, self.missing)

    def check_toolchains(self, missing: Literal["skip", "raise"] = "skip") -> dict[str, SkippedLanguage]:
        """Probe what each problem needs. ``"raise"``: the first ``RunnerUnavailable``. ``"skip"``: problems that
        cannot run leave ``problems`` and are counted in ``skipped`` per language, with the missing tool."""
        self.problems = self._runnable(self.problems, missing)
        return self.skipped

    def _runnable(self, problems: Sequence[dict[str, Any]], missing: str) -> list[dict[str, Any]]:
        if missing not in ("skip", "raise"):
            raise ValueError(f"missing must be 'skip' or 'raise', got {missing!r}")
        kept, dropped = [], {}
        for problem in problems:
            reason = self.grader.unavailable(problem)
            if reason is None:
                kept.append(problem)
            elif missing == "raise":
                raise reason
            else:
                dropped.setdefault(problem["language"], []).append(reason)
        for language, reasons in dropped.items():
            previous = self.skipped.get(language)
            count = len(reasons) + (previous.problems if previous else 0)
            self.skipped[language] = SkippedLanguage(language, count, reasons[0].tool, str(reasons[0]))
            logger.warning("%s: %d %s problem(s) skipped: %s", self.name, len(reasons), language, reasons[0])
        return kept

    @property
    def languages(self) -> list[str]:
        """Languages of the problems that will run, in first-seen order."""
        return list(dict.fromkeys(p["language"] for p in self.problems))

    def language(self, problem: Mapping[str, Any]) -> str:
        return problem["language"]

    def stop_sequences(self) -> Sequence[str]:
        """Completion style: the stop tokens shared by every problem (safe to pass to the engine for the whole
        benchmark; grading cuts each completion at its own problem's stop tokens anyway). Chat: none."""
        if self.style == "chat":
            return ()
        sets = [set(p["stop_tokens"]) for p in self.problems]
        common = set.intersection(*sets) if sets else set()
        return [t for t in (self.problems[0]["stop_tokens"] if self.problems else []) if t in common]

    def grade(self, problem: Mapping[str, Any], completion: str) -> bool:
        return self.grade_batch([problem], [completion])[0][0]

    def grade_batch(self, problems: Sequence[Any], completions: Sequence[str]) -> tuple[list[bool], MultiPLEStats]:
        """Completion style: as the grader does. Chat: the code fitted to the stub; Python code (a whole definition
        appended after the stub) is not cut at the stop tokens, the bodies of brace languages are."""
        texts = [self.completion(p, c) for p, c in zip(problems, completions, strict=True)]
        truncate = [p["language"] != "py" if self.style == "chat" else None for p in problems]
        return self.grader.grade_batch(problems, texts, truncate=truncate)

    def summary(self, results: Sequence[Sequence[bool]], ks: Iterable[int] = (1,)) -> dict[str, Any]:
        """Metrics per language (``avg@n``, ``pass@k``, ``problems``) over the graded problems, and the skipped
        languages with their problem counts and the missing tool."""
        if len(results) != len(self.problems):
            raise ValueError(f"{self.name}: {len(self.problems)} problems but {len(results)} result lists")
        per_language: dict[str, list[Sequence[bool]]] = {}
        for problem, row in zip(self.problems, results, strict=True):
            per_language.setdefault(problem["language"], []).append(row)
        ks = tuple(ks)
        return {
            "languages": {lang: {"problems": len(rows), **summarize(rows, ks)} for lang, rows in per_language.items()},
            "skipped": {
                lang: {"problems": s.problems, "tool": s.tool, "reason": s.reason} for lang, s in self.skipped.items()
            },
        }


def known_languages() -> list[str]:
    """Languages with a runner (whether or not their toolchain is installed here)."""
    return sorted(RUNNERS)
