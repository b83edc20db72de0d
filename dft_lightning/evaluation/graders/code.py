"""Code grading for HumanEval-style problems: run the completion against the problem's tests in the sandbox.

The program is the usual one: ``prompt + completion + "\\n" + test + "\\n" + check(entry_point)``. A pass has
to be proven, not inferred from silence: after ``check(...)`` returns, the program writes a marker that is
random per run, and a completion passes only when the run exits with code 0 *and* that marker is on its
stdout. A completion that calls ``sys.exit(0)``, ``exit()``, ``os._exit(0)`` or raises ``SystemExit`` before
(or while) the asserts run therefore fails, as does one that times out, runs out of memory, floods the
output, or kills itself.

Runs go through ``dft_lightning.evaluation.sandbox`` (its own process group, temporary directory, scrubbed
environment, resource limits, unprivileged uid when the caller is root); the batch API fans out over a
thread pool, which is enough since every item is its own process. Pure Python, no torch.

What it does not handle: extracting code from chat answers (markdown fences, a repeated function header;
the completion must continue the prompt), other languages (the sandbox's ``run_command`` is ready for
them), and a completion written to defeat the check on purpose. The marker sits in the program's source,
and code running in the same interpreter can always find it (read its own file, walk the stack, patch
builtins), so the marker proves the tests *ran to the end*, not that the code is honest. Treat the
results as a benchmark score, not as a verdict on adversarial code; see ``docs/sandbox.md``.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dft_lightning.evaluation.sandbox import ExecutionResult, run_program
from dft_lightning.progress import advance

__all__ = [
    "CodeGrade",
    "CodeGradingStats",
    "HumanEvalGrader",
    "check_humaneval",
    "grade_humaneval",
    "grade_humaneval_batch",
    "humaneval_program",
]

DEFAULT_TIMEOUT_S = 10.0
_REQUIRED = ("prompt", "test", "entry_point")


@dataclass(frozen=True)
class CodeGrade:
    """One graded completion: the verdict and the sandbox run behind it (stdout, stderr, status, reason)."""

    passed: bool
    result: ExecutionResult


@dataclass
class CodeGradingStats:
    """What happened in one batch: items graded, passes, runs cut off by a time limit, killed runs (signal or
    output cap), sandbox errors (the program could not be started at all), and wall seconds."""

    items: int = 0
    passed: int = 0
    timeouts: int = 0
    killed: int = 0
    errors: int = 0
    seconds: float = 0.0

    @classmethod
    def of(cls, grades: Sequence[CodeGrade], seconds: float) -> CodeGradingStats:
        """Count passes and how the runs ended."""
        statuses = [g.result.status for g in grades]
        return cls(items=len(grades), passed=sum(g.passed for g in grades), timeouts=statuses.count("timeout"),
                   killed=statuses.count("killed"), errors=statuses.count("error"), seconds=seconds)


def _check_problem(problem: Mapping[str, object]) -> None:
    missing = [key for key in _REQUIRED if not isinstance(problem.get(key), str)]
    if missing:
        raise KeyError(f"problem {problem.get('task_id', '?')!r} lacks string field(s) {missing}")
    if not str(problem["entry_point"]).isidentifier():
        raise ValueError(f"problem {problem.get('task_id', '?')!r}: entry_point {problem['entry_point']!r}")


def humaneval_program(problem: Mapping[str, object], completion: str, marker: str) -> str:
    """The program that proves a pass: prompt, completion, tests, ``check(entry_point)``, then the marker.

    The marker is written straight to file descriptor 1 so that a completion which rebinds ``print`` or
    ``sys.stdout`` cannot swallow it by accident.
    """
    _check_problem(problem)
    proof = f"\n{marker}\n".encode()
    return (
        f"{problem['prompt']}{completion}\n\n"
        f"{problem['test']}\n\n"
        f"check({problem['entry_point']})\n"
        "import os as _dft_os\n"
        f"_dft_os.write(1, {proof!r})\n"
    )


def check_humaneval(
    problem: Mapping[str, object],
    completion: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    max_processes: int = 4,
) -> CodeGrade:
    """Grade one completion and keep the run's details."""
    marker = f"DFT-PASS-{secrets.token_hex(16)}"
    program = humaneval_program(problem, completion, marker)
    result = run_program(
        program,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
        max_processes=max_processes,
    )
    passed = result.status == "ok" and result.returncode == 0 and marker in result.stdout.splitlines()
    return CodeGrade(passed, result)


def grade_humaneval(problem: Mapping[str, object], completion: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True when ``completion`` (a continuation of ``problem["prompt"]``) passes the problem's tests."""
    return check_humaneval(problem, completion, timeout_s=timeout_s).passed


def grade_humaneval_batch(
    problems: Sequence[Mapping[str, object]],
    completions: Sequence[str],
    *,
    workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    max_processes: int = 4,
    details: list[CodeGrade] | None = None,
) -> tuple[list[bool], CodeGradingStats]:
    """``completions[i]`` against ``problems[i]``, ``workers`` sandboxed runs at a time (default: CPU count).

    Pass a list as ``details`` to receive every ``CodeGrade`` (in order), e.g. to save stderr with the
    generations. Worst-case memory is ``workers * max_processes * memory_mb`` MiB.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    for problem in problems:
        _check_problem(problem)
    started = time.monotonic()
    limits = dict(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
    workers = max(1, workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as pool:
        futures = [
            pool.submit(check_humaneval, p, c, max_processes=max_processes, **limits)
            for p, c in zip(problems, completions, strict=True)
        ]
        grades = []
        for future in futures:  # in order: the count moves as the first ones finish
            grades.append(future.result())
            advance()
    stats = CodeGradingStats.of(grades, time.monotonic() - started)
    if details is not None:
        details.extend(grades)
    return [g.passed for g in grades], stats


@dataclass
class HumanEvalGrader:
    """The HumanEval grader: ``grade(problem, completion)`` and ``grade_batch(problems, completions)``."""

    workers: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_mb: int = 1024
    max_output_bytes: int = 1 << 20
    max_processes: int = 4

    def _limits(self) -> dict:
        names = ("timeout_s", "memory_mb", "max_output_bytes", "max_processes")
        return {name: getattr(self, name) for name in names}

    def grade(self, problem: Mapping[str, object], completion: str) -> bool:
        return check_humaneval(problem, completion, **self._limits()).passed

    def grade_batch(
        self, problems: Sequence[Mapping[str, object]], completions: Sequence[str]
    ) -> tuple[list[bool], CodeGradingStats]:
        return grade_humaneval_batch(problems, completions, workers=self.workers, **self._limits())
