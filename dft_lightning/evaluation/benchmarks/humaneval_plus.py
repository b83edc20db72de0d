"""HumanEval+ (EvalPlus): the 164 HumanEval problems with many more tests, graded in the sandbox.

A problem is an EvalPlus row (``HumanEvalPlus.jsonl`` of the EvalPlus releases, or the hub dataset
``evalplus/humanevalplus``): ``task_id``, ``prompt``, ``entry_point``, ``canonical_solution``, ``test`` and,
in the release files, ``base_input`` / ``plus_input`` (lists of argument lists: the original tests' inputs and
the added ones) and ``atol`` (float tolerance, 0 when exact). In recent releases ``test`` is a complete
harness: ``import numpy as np``, an ``assertion(out, exp, atol)`` helper, and ``check(candidate)`` looping over
``inputs`` and precomputed ``results`` (base and plus together). Rows load from a ``.jsonl``/``.jsonl.gz`` path
(through ``benchmarks.code.load_humaneval``, so the same checks and error messages apply) or a hub id
(``datasets`` is imported only then).

Two harnesses, chosen with ``HumanEvalPlusGrader(harness=...)``; both run through ``graders.code``'s program
and its per-run marker (a pass needs exit code 0 *and* the marker printed after ``check`` returned):

* ``"test"`` (default): the row's own ``test`` field. It imports numpy, which the sandbox's interpreter (the
  system ``python3`` when the evaluator is root) may lack: that is checked once per interpreter and reported
  as ``RunnerUnavailable(tool="numpy")``, never as failed completions. Install ``python3-numpy``, pass
  ``python=`` (an interpreter the sandbox uid can execute), or use the other harness.
* ``"inputs"``: a generated ``check`` that calls the candidate and the canonical solution (exec'd in its own
  namespace, inside the same sandboxed process) on every input of ``base_input`` (``inputs="base"``) or
  ``base_input + plus_input`` (``inputs="plus"``), each call on a deep copy, and compares: equal (``==``), or,
  for a number or list of numbers, within ``atol`` plus a relative 1e-7 (``atol`` becomes 1e-6 when it is 0
  and the expected value is a float or a list of floats; NaN matches NaN). ``find_zero`` (HumanEval/32) also
  accepts any x where the polynomial is within that tolerance of 0. It needs only the standard library and
  follows what EvalPlus's own evaluator does (expected outputs from the canonical solution, the same float
  rule).

Not handled: EvalPlus's per-input time limits (derived from the canonical solution's speed: here one wall-clock
limit covers the whole problem, so a correct but slow solution can pass here and time out there), its special
oracles other than ``find_zero``, MBPP+, and completions written to defeat the check (see ``docs/sandbox.md``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dft_lightning.errors import MissingFileError
from dft_lightning.evaluation.benchmarks.code import HUMANEVAL_FIELDS, HumanEvalBenchmark, load_humaneval
from dft_lightning.evaluation.benchmarks.code_chat import PromptStyle
from dft_lightning.evaluation.graders.code import (
    CodeGrade,
    CodeGradingStats,
    check_humaneval,
    humaneval_program,
)
from dft_lightning.evaluation.runners import RunnerUnavailable
from dft_lightning.evaluation.sandbox import run_command, run_program, sandbox_python
from dft_lightning.rows import looks_local, read_rows

__all__ = [
    "HUMANEVAL_PLUS_HUB_ID",
    "HumanEvalPlusBenchmark",
    "HumanEvalPlusGrader",
    "inputs_harness",
    "load_humaneval_plus",
]

HUMANEVAL_PLUS_HUB_ID = "evalplus/humanevalplus"
_NUMPY_RE = re.compile(r"^\s*(?:import\s+numpy|from\s+numpy\s+import)\b", re.MULTILINE)

# ------------------------------------------------------------------------------------------------- loading


def _plus_fields(row: dict[str, Any], where: str) -> dict[str, Any]:
    for key in ("base_input", "plus_input"):
        value = row.get(key)
        if isinstance(value, str):  # some exports store the lists as JSON text
            try:
                value = row[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: {key!r} is a string but not JSON ({exc.msg})") from None
        if value is not None and not (isinstance(value, list) and all(isinstance(a, list) for a in value)):
            raise ValueError(f"{where}: {key!r} must be a list of argument lists")
    atol = row.get("atol")
    try:
        row["atol"] = float(atol) if atol not in (None, "") else 0.0
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'atol' must be a number, got {atol!r}") from None
    return row


def load_humaneval_plus(
    source: str | Path = HUMANEVAL_PLUS_HUB_ID, *, split: str = "test", limit: int | None = None
) -> list[dict[str, Any]]:
    """HumanEval+ problems from a ``.jsonl``/``.jsonl.gz`` file or a hub dataset id, in source order.

    Every row needs the HumanEval fields; ``base_input``/``plus_input`` (when present) must be lists of
    argument lists; ``atol`` becomes a float (0.0 when absent).
    """
    path = Path(source).expanduser()
    if looks_local(source):
        if not path.is_file():
            raise MissingFileError(f"HumanEval+ file not found: {path}")
        return [_plus_fields(row, f"{path}: {row['task_id']}") for row in load_humaneval(path, limit=limit)]
    problems: list[dict[str, Any]] = []
    for row_id, row in read_rows(source, key="humaneval_plus", split=split):
        missing = [k for k in HUMANEVAL_FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{row_id}: missing or non-string field(s) {missing}")
        problems.append(_plus_fields(row, row_id))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"{source}[{split}]: no problems")
    return problems


# ------------------------------------------------------------------------------------------------ harness

_HARNESS = """
import copy as _dft_copy
import json as _dft_json
import math as _dft_math

_DFT_INPUTS = _dft_json.loads({inputs!r})
_DFT_ATOL = {atol!r}
_DFT_REFERENCE = {reference!r}


def _dft_numbers(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    return None


def _dft_close(out, exp, atol):
    try:
        if out == exp:
            return True
    except Exception:
        return False
    if atol == 0 and (isinstance(exp, float) or (
        isinstance(exp, (list, tuple)) and all(isinstance(v, float) for v in exp)
    )):
        atol = 1e-6
    got, expected = _dft_numbers(out), _dft_numbers(exp)
    if atol == 0 or got is None or expected is None or len(got) != len(expected):
        return False
    return all(
        g == e or (g != g and e != e) or abs(g - e) <= atol + 1e-7 * abs(e) for g, e in zip(got, expected)
    )


def check(candidate):
    namespace = {{"__name__": "_dft_reference"}}
    exec(compile(_DFT_REFERENCE, "<canonical_solution>", "exec"), namespace)
    reference = namespace[{entry_point!r}]
    for index, args in enumerate(_DFT_INPUTS):
        expected = reference(*_dft_copy.deepcopy(args))
        out = candidate(*_dft_copy.deepcopy(args))
        ok = _dft_close(out, expected, _DFT_ATOL)
        if not ok and {find_zero!r}:
            try:
                value = sum(c * _dft_math.pow(out, i) for i, c in enumerate(args[0]))
                ok = abs(value) <= (_DFT_ATOL or 1e-6)
            except (TypeError, ValueError, OverflowError):
                ok = False
        assert ok, f"input #{{index}}: got {{repr(out)[:200]}}, expected {{repr(expected)[:200]}}"
"""


def inputs_harness(problem: Mapping[str, Any], inputs: Literal["base", "plus"] = "plus") -> str:
    """A ``check(candidate)`` comparing the candidate with the canonical solution on the problem's inputs."""
    if inputs not in ("base", "plus"):
        raise ValueError(f"inputs must be 'base' or 'plus', got {inputs!r}")
    keys = ("base_input",) if inputs == "base" else ("base_input", "plus_input")
    missing = [k for k in keys if not isinstance(problem.get(k), list)]
    if missing:
        raise ValueError(f"{problem.get('task_id', '?')}: harness='inputs' needs {missing} (EvalPlus release files)")
    args = [a for k in keys for a in problem[k]]
    return _HARNESS.format(
        inputs=json.dumps(args),
        atol=float(problem.get("atol") or 0.0),
        reference=f"{problem['prompt']}{problem['canonical_solution']}",
        entry_point=problem["entry_point"],
        find_zero=problem["entry_point"] == "find_zero",
    )


# ------------------------------------------------------------------------------------------------- grading

_numpy_lock = threading.Lock()
_numpy_ok: dict[str, str | None] = {}


def _numpy_problem(python: str) -> str | None:
    """None when ``python`` imports numpy inside the sandbox, else why not (probed once per interpreter)."""
    with _numpy_lock:
        if python not in _numpy_ok:
            probe = run_command([python, "-E", "-s", "-c", "import numpy; print('ok')"])
            _numpy_ok[python] = None if probe.ok and probe.stdout.strip() == "ok" else probe.stderr.strip()[-300:]
        return _numpy_ok[python]


@dataclass
class HumanEvalPlusGrader:
    """HumanEval+ grading (see the module docstring for ``harness`` and ``inputs``). ``python`` picks the
    sandbox interpreter (default ``sandbox_python()``); the other fields are the per-run limits."""

    harness: Literal["test", "inputs"] = "test"
    inputs: Literal["base", "plus"] = "plus"
    python: str | None = None
    workers: int | None = None
    timeout_s: float = 20.0
    memory_mb: int = 1024
    max_output_bytes: int = 1 << 20
    max_processes: int = 4

    def __post_init__(self) -> None:
        if self.harness not in ("test", "inputs"):
            raise ValueError(f"harness must be 'test' or 'inputs', got {self.harness!r}")

    def runnable(self, problem: Mapping[str, Any]) -> dict[str, Any]:
        """``problem`` with the ``test`` that will run. Raises ``RunnerUnavailable`` when the harness needs numpy
        and the sandbox interpreter lacks it, ``ValueError`` when ``inputs`` lacks its fields."""
        if self.harness == "inputs":
            return {**problem, "test": inputs_harness(problem, self.inputs)}
        if _NUMPY_RE.search(problem["test"]):
            python = self.python or sandbox_python()
            why = _numpy_problem(python)
            if why is not None:
                raise RunnerUnavailable(
                    "python",
                    "numpy",
                    f"{python} in the sandbox: {why.splitlines()[-1] if why else 'import failed'}; install "
                    "python3-numpy, pass python=<interpreter with numpy>, or use harness='inputs'",
                )
        return dict(problem)

    def check(self, problem: Mapping[str, Any], completion: str) -> CodeGrade:
        """Grade one completion and keep the run (stdout, stderr, status)."""
        runnable = self.runnable(problem)
        if self.python is None:
            return check_humaneval(
                runnable,
                completion,
                timeout_s=self.timeout_s,
                memory_mb=self.memory_mb,
                max_output_bytes=self.max_output_bytes,
                max_processes=self.max_processes,
            )
        marker = f"DFT-PASS-{secrets.token_hex(16)}"  # same proof as graders.code, with another interpreter
        result = run_program(
            humaneval_program(runnable, completion, marker),
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            max_output_bytes=self.max_output_bytes,
            max_processes=self.max_processes,
            python=self.python,
        )
        passed = result.status == "ok" and result.returncode == 0 and marker in result.stdout.splitlines()
        return CodeGrade(passed, result)

    def grade(self, problem: Mapping[str, Any], completion: str) -> bool:
        return self.check(problem, completion).passed

    def grade_batch(
        self,
        problems: Sequence[Mapping[str, Any]],
        completions: Sequence[str],
        details: list[CodeGrade] | None = None,
    ) -> tuple[list[bool], CodeGradingStats]:
        """``completions[i]`` against ``problems[i]``, ``workers`` sandboxed runs at a time. The harness is
        checked for every problem before anything runs."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        for problem in {id(p): p for p in problems}.values():
            self.runnable(problem)
        started = time.monotonic()
        workers = max(1, self.workers or os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval-plus") as pool:
            grades = list(pool.map(self.check, problems, completions))
        stats = CodeGradingStats.of(grades, time.monotonic() - started)
        if details is not None:
            details.extend(grades)
        return [g.passed for g in grades], stats


class HumanEvalPlusBenchmark(HumanEvalBenchmark):
    """HumanEval+: problems from ``source`` (default: the hub's ``evalplus/humanevalplus``), the HumanEval+
    grader; prompts, prompt styles and grading as for HumanEval.

    Args: as ``HumanEvalBenchmark``, plus ``split`` (hub split); ``grader`` is a ``HumanEvalPlusGrader``.
    """

    name = "humaneval_plus"

    def __init__(
        self, source: str | Path | None = HUMANEVAL_PLUS_HUB_ID, *, split: str = "test", limit: int | None = None,
        prompt_style: PromptStyle = "auto", grader: HumanEvalPlusGrader | None = None, name: str | None = None,
        problems: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(source or HUMANEVAL_PLUS_HUB_ID, limit=limit, prompt_style=prompt_style,
                         grader=grader or HumanEvalPlusGrader(), name=name, problems=problems)
        self.split = split

    @classmethod
    def load(
        cls, source: str | Path | None = HUMANEVAL_PLUS_HUB_ID, *, limit: int | None = None, **kwargs: Any
    ) -> HumanEvalPlusBenchmark:
        """The benchmark with its problems read and checked now (``kwargs``: the other constructor arguments)."""
        bench = cls(source, limit=limit, **kwargs)
        bench.problems  # noqa: B018 - read now, so a bad source or a harness that cannot run fails here
        return bench

    def load_problems(self) -> list[dict[str, Any]]:
        """The problems, once the grader's harness is known to run them here."""
        problems = load_humaneval_plus(self.source, split=self.split, limit=self.limit)
        for problem in problems:
            self.grader.runnable(problem)
        return problems
