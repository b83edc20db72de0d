"""HumanEval loading and grading: canonical solutions all pass, empty bodies all fail, and a completion that
exits with code 0 before (or while) the asserts run is not a pass. Every test bounds the evaluator's time."""

from __future__ import annotations

import gzip
import json
import re
import time

import pytest

from dft_lightning.evaluation.benchmarks.code import HumanEvalBenchmark, load_humaneval
from dft_lightning.evaluation.graders.code import (
    CodeGrade,
    HumanEvalGrader,
    check_humaneval,
    grade_humaneval,
    grade_humaneval_batch,
)

WORKERS = 8
TIMEOUT_S = 10.0
SLACK_S = 4.0
BATCH_BOUND_S = 120.0  # 164 sandboxed runs, 8 at a time, on a small CI machine


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return load_humaneval()


@pytest.fixture(scope="module")
def add(problems) -> dict:
    """HumanEval/53 (``add(x, y)``): short tests, a one-line solution."""
    (problem,) = [p for p in problems if p["task_id"] == "HumanEval/53"]
    return problem


def test_loader_returns_the_164_problems(problems):
    assert len(problems) == 164
    assert len({p["task_id"] for p in problems}) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    for p in problems:
        assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(p)
        assert "def check(candidate)" in p["test"] and p["entry_point"].isidentifier()


def test_loader_reads_user_files_and_names_bad_rows(tmp_path, problems):
    plain, zipped = tmp_path / "he.jsonl", tmp_path / "he.jsonl.gz"
    lines = "".join(json.dumps(p) + "\n" for p in problems[:3])
    plain.write_text(lines)
    zipped.write_bytes(gzip.compress(lines.encode()))
    assert load_humaneval(plain) == load_humaneval(zipped) == problems[:3]
    assert load_humaneval(plain, limit=2) == problems[:2]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(problems[0]) + "\n" + json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: .*canonical_solution"):
        load_humaneval(broken)


def _assert_bounded(details: list[CodeGrade], took: float) -> None:
    assert took < BATCH_BOUND_S
    assert max(d.result.duration_s for d in details) < TIMEOUT_S + SLACK_S


def test_canonical_solutions_pass_all(problems):
    details: list[CodeGrade] = []
    start = time.monotonic()
    results, stats = grade_humaneval_batch(
        problems, [p["canonical_solution"] for p in problems], workers=WORKERS, timeout_s=TIMEOUT_S, details=details
    )
    failures = {p["task_id"]: d.result.reason for p, d in zip(problems, details, strict=True) if not d.passed}
    assert sum(results) == 164, failures
    assert (stats.items, stats.passed, stats.timeouts, stats.killed, stats.errors) == (164, 164, 0, 0, 0)
    _assert_bounded(details, time.monotonic() - start)


@pytest.mark.parametrize("body", ["    pass\n", ""], ids=["pass", "empty"])
def test_prompt_only_bodies_pass_none(problems, body):
    details: list[CodeGrade] = []
    start = time.monotonic()
    results, stats = grade_humaneval_batch(
        problems, [body] * len(problems), workers=WORKERS, timeout_s=TIMEOUT_S, details=details
    )
    assert sum(results) == 0, [p["task_id"] for p, ok in zip(problems, results, strict=True) if ok]
    assert stats.errors == 0  # they ran and failed; the sandbox did not just refuse them
    _assert_bounded(details, time.monotonic() - start)


EARLY_EXITS = {
    "sys.exit-at-module-level": "    return 0\nimport sys\nsys.exit(0)\n",
    "os._exit-at-module-level": "    return 0\nimport os\nos._exit(0)\n",
    "exit()-at-module-level": "    return 0\nexit()\n",
    "sys.exit-inside-check": "    import sys\n    sys.exit(0)\n",
    "os._exit-inside-check": "    import os\n    os._exit(0)\n",
    "raise-SystemExit-inside-check": "    raise SystemExit(0)\n",
    "exit-from-atexit-hook": "    return 0\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
}


@pytest.mark.parametrize("completion", EARLY_EXITS.values(), ids=EARLY_EXITS.keys())
def test_exit_code_zero_before_the_asserts_is_not_a_pass(add, completion):
    grade, took = _timed_check(add, completion)
    assert not grade.passed, grade.result
    # The attack worked at the process level (the run looks clean), which is what a naive grader would trust.
    assert grade.result.status == "ok" and grade.result.returncode == 0, grade.result
    assert took < TIMEOUT_S + SLACK_S


def _timed_check(problem, completion, **kwargs):
    start = time.monotonic()
    grade = check_humaneval(problem, completion, timeout_s=kwargs.pop("timeout_s", TIMEOUT_S), **kwargs)
    return grade, time.monotonic() - start


def test_marker_from_an_earlier_run_does_not_pass(add):
    honest, _ = _timed_check(add, add["canonical_solution"])
    assert honest.passed
    (old_marker,) = re.findall(r"DFT-PASS-[0-9a-f]+", honest.result.stdout)
    replay = f"    return 0\nimport os\nos.write(1, b'\\n{old_marker}\\n')\nos._exit(0)\n"
    grade, took = _timed_check(add, replay)
    assert old_marker in grade.result.stdout and grade.result.returncode == 0
    assert not grade.passed
    assert took < TIMEOUT_S + SLACK_S


def test_wrong_solution_fails_and_right_one_passes(add):
    start = time.monotonic()
    assert grade_humaneval(add, "    return x - y\n") is False
    assert grade_humaneval(add, "    return x + y\n") is True
    assert HumanEvalGrader(timeout_s=TIMEOUT_S).grade(add, "    return y + x\n") is True
    assert time.monotonic() - start < 3 * (TIMEOUT_S + SLACK_S)


def test_hanging_completion_times_out(add):
    grade, took = _timed_check(add, "    while True:\n        pass\n", timeout_s=1.5)
    assert not grade.passed and grade.result.status == "timeout", grade.result
    assert took < 1.5 + SLACK_S


def test_flooding_completion_fails_at_the_output_cap(add):
    flood = "    import sys\n    while True:\n        sys.stdout.write('x' * 65536)\n"
    grade, took = _timed_check(add, flood, max_output_bytes=100_000)
    assert not grade.passed and grade.result.status == "killed" and grade.result.output_truncated
    assert took < SLACK_S


def test_benchmark_nests_samples_per_problem(problems):
    bench = HumanEvalBenchmark(problems=problems[:2], grader=HumanEvalGrader(workers=4, timeout_s=TIMEOUT_S))
    assert bench.prompts() == [problems[0]["prompt"], problems[1]["prompt"]]
    samples = [[problems[0]["canonical_solution"], "    pass\n"], ["    return []\n"]]
    start = time.monotonic()
    nested, stats = bench.grade_samples(samples)
    assert nested == [[True, False], [False]] and stats.items == 3
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    with pytest.raises(ValueError, match="2 problems but 1"):
        bench.grade_samples(samples[:1])
