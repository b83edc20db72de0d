"""MultiPL-E loading and grading with real toolchains: for every language a tiny problem in MultiPL-E's layout
(prompt, tests, stop tokens) with a correct, a wrong and an early-exit completion. A language whose toolchain is
missing here must come back as a reported ``RunnerUnavailable`` (and the test is skipped with that reason), never
as failed completions. Nothing in the sandbox is mocked."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dft_lightning.evaluation.benchmarks.multipl_e import (
    MultiPLEBenchmark,
    MultiPLEGrade,
    MultiPLEGrader,
    load_multipl_e,
    multipl_e_program,
    truncate_at_stop,
)
from dft_lightning.evaluation.runners import (
    RUNNERS,
    RunnerUnavailable,
    available_languages,
    check_available,
    get_runner,
    run_source,
)

# One problem ("add two numbers") per language, in the shape MultiPL-E's translators produce.
ROWS = {
    "py": {
        "prompt": (
            'def add(x: int, y: int) -> int:\n    """Add two numbers x and y\n    >>> add(2, 3)\n    5\n    """\n'
        ),
        "tests": (
            "def check(candidate):\n    assert candidate(0, 1) == 1\n    assert candidate(2, 3) == 5\n"
            "    assert candidate(-7, 7) == 0\n\ndef test_check():\n    check(add)\n\ntest_check()\n"
        ),
        "stop_tokens": ["\ndef", "\n#", "\nif", "\nclass"],
    },
    "js": {
        "prompt": "//Add two numbers x and y\n// >>> add(2, 3)\n// 5\nfunction add(x, y){\n",
        "tests": (
            "const assert = require('node:assert');\n\n\nfunction test() {\n  let candidate = add;\n"
            "  assert.deepEqual(candidate(0, 1),1);\n  assert.deepEqual(candidate(2, 3),5);\n"
            "  assert.deepEqual(candidate(-7, 7),0);\n}\n\ntest();"
        ),
        "stop_tokens": ["\nfunction ", "\n/*", "\n//", "\nconsole.log"],
    },
    "cpp": {
        "prompt": (
            "#include<assert.h>\n#include<bits/stdc++.h>\n// Add two numbers x and y\n// >>> add((2), (3))\n"
            "// (5)\nlong add(long x, long y) {\n"
        ),
        "tests": (
            "}\nint main() {\n    auto candidate = add;\n    assert(candidate((0), (1)) == (1));\n"
            "    assert(candidate((2), (3)) == (5));\n    assert(candidate((-7), (7)) == (0));\n}\n"
        ),
        "stop_tokens": ["\n}"],
    },
    "java": {
        "prompt": (
            "import java.util.*;\nimport java.lang.reflect.*;\nimport java.security.*;\nimport java.math.*;\n"
            "import java.io.*;\nimport java.util.stream.*;\nclass Problem {\n    // Add two numbers x and y\n"
            "    // >>> add((2l), (3l))\n    // (5l)\n    public static long add(long x, long y) {\n"
        ),
        "tests": (
            "    }\n    public static void main(String[] args) {\n    assert(add((0l), (1l)) == (1l));\n"
            "    assert(add((2l), (3l)) == (5l));\n    assert(add((-7l), (7l)) == (0l));\n    }\n\n}\n"
        ),
        "stop_tokens": ["\n    }\n"],
    },
    "php": {
        "prompt": "<?php\n// Add two numbers x and y\n// >>> add(2, 3)\n// 5\nfunction add($x, $y) {\n",
        "tests": (
            "function candidate(...$args) {\n    return add(...$args);\n}\n\nfunction test(): void {\n"
            '    if (candidate(0, 1) !== 1) { throw new Exception("Test failed!"); }\n'
            '    if (candidate(2, 3) !== 5) { throw new Exception("Test failed!"); }\n'
            '    if (candidate(-7, 7) !== 0) { throw new Exception("Test failed!"); }\n}\n\ntest();'
        ),
        "stop_tokens": ["\nfunction", "\n?>", "\n//", "\n#"],
    },
    "sh": {
        "prompt": "#!/bin/bash\n# Add two numbers x and y\n#\n# $1 is an integer\n# $2 is an integer\nadd() {\n",
        "tests": (
            '}\n\ncandidate() {\n    add "$@"\n}\n\nset -e\nrun_test() {\n    [[ $(candidate "0" "1") = "1" ]]\n'
            '    [[ $(candidate "2" "3") = "5" ]]\n    [[ $(candidate "-7" "7") = "0" ]]\n}\n\nrun_test'
        ),
        "stop_tokens": ["\n}"],
    },
    "pl": {
        "prompt": "# Add two numbers x and y\n# >>> add(2, 3)\n# 5\nsub add {\n    my($x, $y) = @_;\n",
        "tests": (
            "use Test::Deep;\n\n\nsub testhumaneval {\n    my $candidate = \\&add;\n"
            + "".join(
                f'        if(eq_deeply($candidate->({a}, {b}),{c})) {{\n        print "ok!" }}else{{\n'
                "        exit 1;\n        }\n"
                for a, b, c in ((0, 1, 1), (2, 3, 5), (-7, 7, 0))
            )
            + "}\n\ntesthumaneval();"
        ),
        "stop_tokens": ["\nsub", "\n#", "\n\n"],
    },
}
# Perl without Test::Deep, so the perl runner itself is exercised where that module is not installed.
PERL_PLAIN = {
    **ROWS["pl"],
    "tests": (
        "sub testhumaneval {\n    my $candidate = \\&add;\n"
        '    if ($candidate->(0, 1) == 1) { print "ok!" } else { exit 1; }\n'
        '    if ($candidate->(2, 3) == 5) { print "ok!" } else { exit 1; }\n'
        "}\n\ntesthumaneval();"
    ),
}
# (correct, wrong, exits with status 0 before the tests finish)
COMPLETIONS = {
    "py": ("    return x + y\n", "    return x - y\n", "    import os; os._exit(0)\n"),
    "js": ("  return x + y;\n}\n", "  return x - y;\n}\n", "  process.exit(0);\n}\n"),
    "cpp": ("    return x + y;\n}\n", "    return x - y;\n}\n", "    exit(0);\n}\n"),
    "java": (
        "        return x + y;\n    }\n",
        "        return x - y;\n    }\n",
        "        System.exit(0); return 0;\n    }\n",
    ),
    "php": ("    return $x + $y;\n}\n", "    return $x - $y;\n}\n", "    exit(0);\n}\n"),
    "sh": ("    echo $(( $1 + $2 ))\n}\n", "    echo $(( $1 - $2 ))\n}\n", "    exit 0\n}\n"),
    "pl": ("    return $x + $y;\n}\n", "    return $x - $y;\n}\n", "    exit 0;\n}\n"),
}


def _problem(language: str, row: dict | None = None, name: str = "HumanEval_53_add") -> dict:
    return {"id": f"{language}/{name}", "name": name, "language": language, **(row or ROWS[language])}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _missing_runner(language: str) -> dict:
    """A runner table in which ``language`` needs a tool that no machine has."""
    fake = dataclasses.replace(RUNNERS[language], tools=("dft-no-such-compiler",))
    return {**RUNNERS, language: fake}


# ------------------------------------------------------------------------------------------------ loading


def test_loader_normalises_rows_and_names_bad_ones(tmp_path: Path) -> None:
    rows = [
        {"name": "HumanEval_53_add", "language": lang, "doctests": "transform", **row}
        for lang, row in ROWS.items()
        if lang in ("py", "cpp")
    ]
    rows[1]["stop_tokens"] = json.dumps(rows[1]["stop_tokens"])  # some exports store the list as a JSON string
    rows.append({**rows[0], "name": "HumanEval_0_other", "language": "python"})
    path = _write_jsonl(tmp_path / "multipl_e.jsonl", rows)
    problems = load_multipl_e(path)
    assert [p["id"] for p in problems] == ["py/HumanEval_53_add", "cpp/HumanEval_53_add", "py/HumanEval_0_other"]
    assert problems[1]["stop_tokens"] == ["\n}"] and problems[2]["language"] == "py"
    assert problems[0]["doctests"] == "transform"  # extra fields are kept
    assert [p["id"] for p in load_multipl_e(path, languages=["c++"])] == ["cpp/HumanEval_53_add"]
    assert len(load_multipl_e(path, limit=1)) == 2  # the limit is per language

    broken = _write_jsonl(tmp_path / "broken.jsonl", [rows[0], {k: v for k, v in rows[0].items() if k != "tests"}])
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 1: missing field\(s\) \['tests'\]"):
        load_multipl_e(broken)
    duplicate = _write_jsonl(tmp_path / "dup.jsonl", [rows[0], rows[0]])
    with pytest.raises(ValueError, match="duplicate problem 'py/HumanEval_53_add'"):
        load_multipl_e(duplicate)


def test_truncation_and_program_layout() -> None:
    assert truncate_at_stop("    return x;\n}\nint main() {}", ["\n}"]) == "    return x;"
    assert truncate_at_stop("a\n#b\ndef c", ["\ndef", "\n#"]) == "a"
    assert truncate_at_stop("no stop here", ["\n}"]) == "no stop here"

    cpp, placed = multipl_e_program(_problem("cpp"), COMPLETIONS["cpp"][0], "MARK")
    assert placed and cpp.startswith("#include <cstdio>\n#include<assert.h>")
    assert "    return x + y;\n}\nint main() {" in cpp  # the completion's own "}" was cut, the tests close it
    assert cpp.rstrip().endswith("std::fflush(stdout);\n}") and cpp.index("MARK") > cpp.rindex("assert(")

    java, placed = multipl_e_program(_problem("java"), COMPLETIONS["java"][0], "MARK")
    assert placed and java.rstrip().endswith("System.out.flush();\n    }\n\n}")

    odd = {**_problem("cpp"), "tests": "}\nint main() { return 0; }\n// trailing comment\n"}
    source, placed = multipl_e_program(odd, COMPLETIONS["cpp"][0], "MARK")
    assert not placed and "MARK" not in source  # unexpected shape: judged on the exit code alone


# ------------------------------------------------------------------------------------------ real toolchains


@pytest.mark.parametrize("language", sorted(ROWS))
def test_language_grades_for_real(language: str) -> None:
    row = PERL_PLAIN if language == "pl" else ROWS[language]
    problem = _problem(language, row)
    grader = MultiPLEGrader(workers=3)
    why_not = available_languages([language])[language]
    if why_not is not None:
        with pytest.raises(RunnerUnavailable) as caught:
            grader.grade(problem, COMPLETIONS[language][0])
        assert caught.value.language == language and caught.value.tool
        pytest.skip(f"reported as unavailable: {caught.value}")
    details: list[MultiPLEGrade] = []
    results, stats = grader.grade_batch([problem] * 3, list(COMPLETIONS[language]), details=details)
    failure = details[0].outcome.result
    assert results == [True, False, False], (failure.status, failure.stderr[-2000:])
    assert all(d.outcome.proved for d in details)
    if language != "sh":  # in Bash the candidate runs in a subshell, so its `exit 0` ends only that subshell
        early = details[2].outcome.result
        assert early.status == "ok" and early.returncode == 0  # exited "successfully", but the proof is missing
    assert (stats.items, stats.passed, stats.errors, stats.compile_errors) == (3, 1, 0, 0)
    assert stats.by_language == {language: [3, 1]}


def test_compile_errors_are_counted() -> None:
    for language in ("cpp", "java"):
        if available_languages([language])[language] is not None:
            continue
        problem = _problem(language)
        results, stats = MultiPLEGrader().grade_batch([problem], ["    return x +;\n}\n"])
        assert results == [False] and stats.compile_errors == 1, language


def test_perl_test_deep_is_required_or_used() -> None:
    if available_languages(["pl"])["pl"] is not None:
        pytest.skip("perl is not available")
    problem = _problem("pl")
    try:
        check_available("pl", problem["tests"])
    except RunnerUnavailable as exc:
        assert exc.tool == "Perl module Test::Deep"
        with pytest.raises(RunnerUnavailable, match="Test::Deep"):
            MultiPLEGrader().grade(problem, COMPLETIONS["pl"][0])
        pytest.skip(f"reported as unavailable: {exc}")
    results, _ = MultiPLEGrader().grade_batch([problem] * 2, list(COMPLETIONS["pl"][:2]))
    assert results == [True, False]


def test_java_needs_the_javatuples_jar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if available_languages(["java"])["java"] is not None:
        pytest.skip("java is not available")
    row = {**ROWS["java"], "prompt": ROWS["java"]["prompt"].replace("import java.io.*;", "import org.javatuples.*;")}
    problem = _problem("java", row)
    monkeypatch.setenv("DFT_JAVATUPLES_JAR", str(tmp_path / "absent.jar"))
    with pytest.raises(RunnerUnavailable) as caught:
        MultiPLEGrader().grade(problem, COMPLETIONS["java"][0])
    assert caught.value.tool == "javatuples jar" and "absent.jar" in str(caught.value)


# --------------------------------------------------------------------------------------- missing toolchains


def test_missing_toolchain_is_reported_never_graded_wrong() -> None:
    runners = _missing_runner("php")
    grader = MultiPLEGrader(runners=runners)
    with pytest.raises(RunnerUnavailable) as caught:
        grader.grade(_problem("php"), COMPLETIONS["php"][0])
    assert caught.value.tool == "dft-no-such-compiler" and "not found" in str(caught.value)
    with pytest.raises(RunnerUnavailable):
        grader.grade_batch([_problem("py"), _problem("php")], ["    return x + y\n"] * 2)
    with pytest.raises(RunnerUnavailable):
        get_runner("cobol")
    with pytest.raises(RunnerUnavailable, match="dft-no-such-compiler"):
        run_source(runners["php"], "<?php echo 1;")


def test_benchmark_skips_and_reports_missing_languages(tmp_path: Path) -> None:
    usable = [lang for lang in ("py", "js", "sh") if available_languages([lang])[lang] is None]
    rows = [{"name": "HumanEval_53_add", "language": lang, **ROWS[lang]} for lang in usable]
    rows += [{"name": f"HumanEval_{i}_add", "language": "php", **ROWS["php"]} for i in (1, 2)]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    grader = MultiPLEGrader(runners=_missing_runner("php"), workers=2)
    with pytest.raises(RunnerUnavailable):
        MultiPLEBenchmark.load(path, missing="raise", grader=grader)

    bench = MultiPLEBenchmark.load(path, grader=grader)
    assert bench.languages == usable and len(bench.problems) == len(usable)
    assert bench.skipped["php"].problems == 2 and bench.skipped["php"].tool == "dft-no-such-compiler"
    assert bench.prompts() == [ROWS[lang]["prompt"] for lang in usable]
    samples = [[COMPLETIONS[lang][0], COMPLETIONS[lang][1]] for lang in usable]
    results, stats = bench.grade_samples(samples)
    assert results == [[True, False]] * len(usable) and stats.items == 2 * len(usable)
    summary = bench.summary(results, ks=(1, 2))
    for lang in usable:
        assert summary["languages"][lang] == {"problems": 1, "avg@2": 0.5, "pass@1": 0.5, "pass@2": 1.0}
    assert summary["skipped"]["php"]["problems"] == 2 and summary["skipped"]["php"]["tool"] == "dft-no-such-compiler"
    py_only = MultiPLEBenchmark.load(path, languages=["python"], grader=grader)
    assert py_only.stop_sequences() == ROWS["py"]["stop_tokens"] and not py_only.skipped
