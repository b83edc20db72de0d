"""Math benchmark loaders and prompts, and the grader against the real benchmark files when present.

The real files live outside the repository (``../shared/benchmarks``); those tests skip when it is absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dft_lightning.evaluation.benchmarks.math import (
    PROMPT_TEMPLATES,
    GSM8KBenchmark,
    MathBenchmark,
    load_math_benchmark,
    rows_to_problems,
    to_messages,
    to_prompt,
)
from dft_lightning.evaluation.graders.math import MathGrader, grade_math_batch, is_equivalent, normalize_answer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "benchmarks"
REAL_FILES = {
    "math500": ("math500.jsonl", 500),
    "minerva": ("minerva_math.jsonl", 272),
    "olympiadbench": ("olympiadbench.jsonl", 675),
    "aime24": ("aime24.jsonl", 30),
    "amc23": ("amc23.jsonl", 40),
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------------- schemas


def test_each_schema_maps_to_uniform_problems(tmp_path: Path) -> None:
    cases = {
        "math500": (
            {"problem": "P", "solution": "S", "answer": r"\frac{1}{2}", "unique_id": "test/a/1.json"},
            "math500/test/a/1.json",
            r"\frac{1}{2}",
        ),
        "minerva": (
            {"problem": "P", "solution": r"x=\boxed{1.6} \mathrm{~cm}, not \boxed{2", "idx": 7},
            "minerva/7",
            "1.6",
        ),
        "olympiadbench": ({"id": 3, "question": "Q", "final_answer": "['$69$,$84$']"}, "olympiadbench/3", "69,84"),
        "aime24": ({"id": 60, "problem": "P", "answer": "025"}, "aime24/60", "025"),
        "amc23": ({"id": 0, "question": "Q", "answer": 27.0}, "amc23/0", "27"),
    }
    for name, (row, problem_id, answer) in cases.items():
        [problem] = load_math_benchmark(name, _write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        assert problem == {"id": problem_id, "question": row.get("question", row.get("problem")), "answer": answer}


def test_olympiadbench_lists_and_amc_fractions() -> None:
    rows = [
        {"id": 1, "question": "Q", "final_answer": ["$2$"]},
        {"id": 2, "question": "Q", "final_answer": ["$(1,2)$", "$(3,4)$"]},
        {"id": 3, "question": "Q", "final_answer": '["$x$"]', "context": "C"},
    ]
    problems = rows_to_problems("olympiadbench", rows)
    assert [p["answer"] for p in problems] == ["2", "(1,2), (3,4)", "x"]
    assert problems[2]["question"] == "C\nQ"
    [amc] = rows_to_problems("amc23", [{"problem": "P", "answer": 0.5}])
    assert amc["answer"] == "0.5" and amc["id"] == "amc23/0"


def test_missing_field_names_file_and_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "P", "answer": "1"}, {"problem": "P"}])
    with pytest.raises(ValueError, match=r"m\.jsonl: row 1 \(math500\): missing required field 'answer'"):
        load_math_benchmark("math500", path)
    path = _write_jsonl(tmp_path / "mv.jsonl", [{"problem": "P", "solution": "no box"}])
    with pytest.raises(ValueError, match=r"mv\.jsonl: row 0 \(minerva\).*boxed"):
        load_math_benchmark("minerva", path)
    with pytest.raises(ValueError, match="'question' or 'problem'"):
        rows_to_problems("amc23", [{"answer": 1.0}])


def test_json_file_unknown_names_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"test": [{"id": 1, "problem": "P", "answer": "3"}]}), encoding="utf-8")
    assert load_math_benchmark("aime24", path, limit=1)[0]["answer"] == "3"
    with pytest.raises(KeyError, match="unknown math benchmark"):
        rows_to_problems("nope", [])
    with pytest.raises(FileNotFoundError):
        load_math_benchmark("math500", tmp_path / "absent.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_math_benchmark("math500", bad)


GSM8K_ROWS = [  # GSM8K's schema: the worked solution, then "#### <answer>"
    {"question": "Tom has 3 bags of 412 marbles. How many marbles?", "answer": "3 * 412 = 1236\n#### 1,236"},
    {"question": "A shop sells 8 pens for $2. What do 36 pens cost?", "answer": "36 / 8 * 2 = 9\n#### 9"},
    {"question": "It is 5 degrees; it drops 12 degrees. What is it now?", "answer": "5 - 12 = -7\n#### -7"},
]


def test_gsm8k_reads_its_own_schema_and_grades_the_final_number(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K_ROWS)
    bench = GSM8KBenchmark(str(path))
    assert [p["answer"] for p in bench.problems] == ["1236", "9", "-7"]
    assert [p["id"] for p in bench.problems] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]
    assert bench.name == "gsm8k" and bench.prompt(bench.problems[0])[-1]["content"].startswith("Tom has 3 bags")
    nested, _ = bench.grade_samples([
        [r"So he has \boxed{1,236} marbles.", "The answer is 1236.", r"\boxed{1,263}"],
        ["#### 9", r"\boxed{9.0}", "#### 8"],
        [r"\boxed{-7}", r"\boxed{7}", "It is -7 degrees now."],
    ])
    assert nested == [[True, True, False], [True, True, False], [True, False, True]]
    broken = _write_jsonl(tmp_path / "broken.jsonl", [GSM8K_ROWS[0], {"question": "Q", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 1 \(gsm8k\): no '#### <answer>' in 'answer'"):
        GSM8KBenchmark(str(broken)).problems  # noqa: B018


# -------------------------------------------------------------------------------------------------- prompts


def test_prompt_templates() -> None:
    problem = {"id": "x", "question": r"What is $\{1\}$?", "answer": "1"}
    assert {"qwen-boxed", "qwen25-math-cot", "plain"} <= set(PROMPT_TEMPLATES)
    boxed = to_messages(problem, "qwen-boxed")
    assert boxed[-1] == {
        "role": "user",
        "content": "What is $\\{1\\}$?\nPlease reason step by step, and put your final answer within \\boxed{}.",
    }
    cot = to_messages(problem, "qwen25-math-cot")
    assert cot[0]["role"] == "system" and "\\boxed{}" in cot[0]["content"] and cot[1]["content"] == problem["question"]
    assert to_prompt(problem, "plain") == "Question: What is $\\{1\\}$?\nAnswer:"
    chatml = to_prompt(problem, "qwen25-math-cot")
    assert chatml.startswith("<|im_start|>system\n") and chatml.endswith("<|im_start|>assistant\n")
    assert to_prompt(problem, "qwen-boxed", apply_chat_template=lambda m: str(len(m))) == "2"
    with pytest.raises(KeyError, match="unknown prompt template"):
        to_messages(problem, "nope")


def test_harness_prompt_types_per_model_family() -> None:
    """qwen-boxed (Qwen), deepseek-math (DeepSeekMath), llama-base-boxed (LLaMA base): texts and stop strings."""
    from dft_lightning.evaluation.benchmarks.math import HARNESS_STOP

    problem = {"id": "x", "question": "What is $1+{1}$?", "answer": "2"}
    step = "Please reason step by step, and put your final answer within \\boxed{}."
    assert to_prompt(problem, "qwen-boxed") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\nWhat is $1+{{1}}$?\n{step}<|im_end|>\n<|im_start|>assistant\n")
    assert to_prompt(problem, "deepseek-math") == f"User: What is $1+{{1}}$?\n{step}\n\nAssistant:"
    llama = to_prompt(problem, "llama-base-boxed")
    assert llama.startswith("Question: What is $1+{1}$?\n") and llama.endswith("\nAnswer: Let's think step by step.")
    for name in ("qwen-boxed", "deepseek-math", "llama-base-boxed"):
        bench = MathBenchmark(name="toy", problems=[problem], template=name)
        assert set(HARNESS_STOP) <= set(bench.stop_sequences()), name
        assert isinstance(bench.prompts()[0], list) == (name == "qwen-boxed")  # raw strings for the base models
        assert bench.settings()["template"] == name
    assert "\n\nQuestion:" in MathBenchmark(problems=[problem], template="llama-base-boxed").stop_sequences()
    assert MathBenchmark(problems=[problem], template="plain").stop_sequences() == ("\nQuestion:",)


def test_benchmark_grades_nested_samples() -> None:
    problems = [{"id": "a", "question": "q", "answer": "2"}, {"id": "b", "question": "q", "answer": "0.5"}]
    bench = MathBenchmark(name="toy", problems=problems)
    nested, stats = bench.grade_samples([[r"\boxed{2}", r"\boxed{3}"], [r"\boxed{\frac12}", "it is 1/2"]])
    assert nested == [[True, False], [True, True]] and stats.items == 4
    assert bench.grade(bench.problems[0], "so 2") and len(bench.prompts()) == 2


def test_numeric_rule_from_load_and_spec(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "P", "answer": "50", "unique_id": "u"}])
    exact, qwen = MathBenchmark.load("math500", path), MathBenchmark.load("math500", path, numeric_rule="qwen")
    assert exact.grader.numeric_rule == "exact" and not exact.grade(exact.problems[0], r"\boxed{0.5}")
    assert qwen.grade(qwen.problems[0], r"\boxed{0.5}") and qwen.grade(qwen.problems[0], r"\boxed{5000}")
    with pytest.raises(ValueError, match="not both"):
        MathBenchmark.load("math500", path, numeric_rule="qwen", grader=MathGrader())
    from dft_lightning.evaluation.run import BenchmarkSpec

    assert BenchmarkSpec("demo", "math500", str(path)).build().grader.numeric_rule == "exact"
    assert BenchmarkSpec("demo", "math500", str(path), numeric_rule="qwen").build().grader.numeric_rule == "qwen"


# ------------------------------------------------------------------------------------- real benchmark files


def _same_answer(a: str, b: str) -> bool:
    """Rows whose answers are the same (string or number) are skipped as "wrong answer" donors."""
    na, nb = normalize_answer(a), normalize_answer(b)
    if na == nb:
        return True
    try:
        return abs(float(na) - float(nb)) < 1e-9
    except ValueError:
        return False


@pytest.fixture(scope="module")
def real_grades() -> dict[str, tuple[int, list[bool], list[bool]]]:
    """Every real benchmark's own answers and borrowed wrong answers, graded in one pool run."""
    if not SHARED.is_dir():
        pytest.skip(f"real benchmark files not found at {SHARED.resolve()}")
    pairs, spans = [], {}
    for name, (filename, _) in REAL_FILES.items():
        problems = load_math_benchmark(name, SHARED / filename)
        own = [(rf"Some working ... so the answer is \boxed{{{p['answer']}}}.", p["answer"]) for p in problems]
        wrong = []
        for i, problem in enumerate(problems):
            j = (i + 1) % len(problems)
            while _same_answer(problems[j]["answer"], problem["answer"]):
                j = (j + 1) % len(problems)
            wrong.append((rf"Some working ... so the answer is \boxed{{{problems[j]['answer']}}}.", problem["answer"]))
        spans[name] = (len(pairs), len(problems))
        pairs += own + wrong
    results, _ = grade_math_batch(pairs, workers=2, timeout_s=2.0)  # a cut-off item counts as wrong
    out = {}
    for name, (start, n) in spans.items():
        out[name] = (n, results[start : start + n], results[start + n : start + 2 * n])
    return out


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_benchmark_rows_load(name: str) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"real benchmark files not found at {SHARED.resolve()}")
    filename, rows = REAL_FILES[name]
    problems = load_math_benchmark(name, SHARED / filename)
    assert len(problems) == rows
    assert len({p["id"] for p in problems}) == rows
    assert all(p["question"] and p["answer"] for p in problems)


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_reference_answers_grade_correct(name: str, real_grades: dict) -> None:
    n, own, _ = real_grades[name]
    assert sum(own) == n, f"{name}: only {sum(own)}/{n} own answers graded correct"


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_other_rows_answers_grade_wrong(name: str, real_grades: dict) -> None:
    n, _, wrong = real_grades[name]
    assert sum(wrong) <= 0.02 * n, f"{name}: {sum(wrong)}/{n} borrowed answers graded correct"


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_numeric_answers_under_both_rules(name: str) -> None:
    """Integer golds: the next integer is wrong under the exact rule, and under the Qwen2.5-Math rule only
    where it is within relative 1e-4. Scientific-notation golds (``1.5e-3``) equal their LaTeX form."""
    if not SHARED.is_dir():
        pytest.skip(f"real benchmark files not found at {SHARED.resolve()}")
    golds = [p["answer"] for p in load_math_benchmark(name, SHARED / REAL_FILES[name][0])]
    integers = [g for g in golds if g.isdigit()]
    for gold in integers:
        neighbour = str(int(gold) + 1)
        assert is_equivalent(gold, gold, numeric_rule="qwen") and not is_equivalent(neighbour, gold), gold
        assert is_equivalent(neighbour, gold, numeric_rule="qwen") is (1 <= 1e-4 * (int(gold) + 1)), gold
    scientific = [m for g in golds if (m := re.fullmatch(r"(-?\d+(?:\.\d+)?)e(-?\d+)", g))]
    for m in scientific:
        latex = rf"{m.group(1)} \times 10^{{{m.group(2)}}}"
        assert is_equivalent(latex, m.group(0)) and is_equivalent(latex, m.group(0), numeric_rule="qwen"), latex
    assert integers or scientific or name == "olympiadbench"
