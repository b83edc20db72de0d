"""Math grader: answer extraction, equivalence, and the process pool's time limit and failure paths."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dft_lightning.evaluation.graders.math import (
    MathGrader,
    extract_answer,
    extract_boxed,
    grade_math,
    grade_math_batch,
    is_equivalent,
    normalize_answer,
)

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{\frac{a}{b^{2}}}$.", r"\frac{a}{b^{2}}"),
        (r"\boxed{\left\{ x \mid x^{2} > 1 \right\}}", r"\left\{ x \mid x^{2} > 1 \right\}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{3}", "3"),
        (r"\fbox{42}", "42"),
        (r"\framebox{204} minutes", "204"),
        (r"The answer is $\boxed 5$.", "5"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{\begin{pmatrix} 1 \\ 2 \\\end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \\\end{pmatrix}"),
        (r"\boxed{ 7 } and the truncated \boxed{\frac{1}{", "7"),
        (r"\boxed{}", ""),
    ],
)
def test_extract_boxed(text: str, expected: str) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text", ["no box here 12", r"\boxed{never closed", r"\boxedx{1}"])
def test_extract_boxed_none(text: str) -> None:
    assert extract_boxed(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"Long work. \boxed{9} is what we get.", "9"),
        (r"Therefore, the answer is $\frac{1}{2}$.", r"\frac{1}{2}"),
        ("So the final answer is 12. I hope it is correct.", "12"),
        ("The answer is: 3.5", "3.5"),
        ("so the answer is 12, which is even.", "12"),
        ("The answer is $(1, 2)$ because both work", "(1, 2)"),
        ("Answer: $\\$18.90$", "18.90"),
        ("We get 3 apples, then 40 more, so 43 in total", "43"),
        ("a fraction like 3/4 at the end", "3/4"),
        ("negative numbers: -17", "-17"),
        ("no digits anywhere", None),
        ("", None),
    ],
)
def test_extract_answer_fallbacks(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_box_wins_over_answer_is() -> None:
    assert extract_answer(r"The answer is 4. Wait, recheck: \boxed{5}. The answer is 4?") == "5"


# ----------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("27", "27.0"),
        ("27.0", "27"),
        ("025", "25"),
        ("0.5", r"\frac12"),
        (r"\dfrac{1}{2}", "0.5"),
        ("1/2", r"\frac{1}{2}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"10\text{ inches}", "10"),
        (r"90^\circ", "90"),
        (r"50\%", "50"),
        ("$1,000$", "1000"),
        (r"\$32,\!348", "32348"),
        ("x=5", "5"),
        ("C", r"\text{(C)}"),
        (r"4.5 \times 10^{33}", "4.5e33"),
        (r"\sqrt{8}", r"2\sqrt{2}"),
        ("x^2+1", "1+x^2"),
        (r"\frac{1}{2(n+1)}", r"\frac{1}{2 n+2}"),
        ("84, 69", "69, 84"),
        (r"\pi/2", r"\frac{\pi}{2}"),
        ("12.", "12"),
        ("52_{8}", "52_8"),
    ],
)
def test_equivalent(prediction: str, reference: str) -> None:
    assert is_equivalent(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("3", "4"),
        ("27.1", "27"),
        ("y=5", "x=5"),
        (r"\frac{1}{3}", "0.33"),
        ("x^2-1", "x^2+1"),
        ("(1,2)", "(2,1)"),
        ("", "1"),
        (r"2^{1009}", "6"),
        ("10112", "1011_2"),
    ],
)
def test_not_equivalent(prediction: str, reference: str) -> None:
    assert not is_equivalent(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference", "exact", "qwen"),
    [
        # integers are exact under the default rule; the Qwen2.5-Math rule has relative 1e-4 for all numbers
        ("1234568", "1234567", False, True),
        ("1234567", "1234567.0", True, True),
        ("26.9999", "27", False, True),
        ("1235", "1234", False, False),
        # a long exact decimal: a wrong last digit is wrong; a longer answer rounding to the gold is right
        ("3.14159266", "3.14159265", False, True),
        ("3.14159265358", "3.14159265", True, True),
        ("3.1416", "3.14159265", False, True),
        ("1.25", "1.2", False, False),
        ("1.24", "1.2", False, False),  # extra digits on a short gold are not rounding: wrong
        ("0.54", "0.5", False, False),
        ("1.20001", "1.2", True, True),
        # scientific notation golds against LaTeX powers of ten
        (r"1.5 \times 10^{-3}", "1.5e-3", True, True),
        (r"3\times10^{8}", "3e8", True, True),
        (r"10^{8}", "1e8", True, True),
        (r"10^{8}", "3e8", False, False),
        (r"-2.75 \cdot 10^{11}", "-2.75e11", True, True),
        ("0.0015", "1.5e-3", True, True),
        (r"2.998 \times 10^{8}", "3e8", False, False),
        (r"2.6 \times 10^{8}", "3e8", False, False),
        (r"1.6 \times 10^{-3}", "1.5e-3", False, False),
        (r"1.5 \times 10^{3}", "1.5e-3", False, False),
        # code-style golds against their LaTeX and numeric forms
        (r"\frac{1}{4}", "1./4", True, True),
        ("0.25", "1./4", True, True),
        (r"-\frac{1}{3}", "-1./3", True, True),
        (r"-\frac{3}{2}", "-3./2", True, True),
        (r"\frac{\sqrt{2}}{2}", "np.sqrt(2)/2", True, True),
        (r"\frac{\pi}{2}", "math.pi/2", True, True),
        (r"\arcsin\left(\frac{10}{13}\right)", "np.arcsin(10/13)", True, True),
        (r"e^{2}", "np.exp(2)", True, True),
        ("x^{3}+1", "x**3 + 1", True, True),
        (r"\frac{1}{3}", "1./4", False, False),
        (r"\sqrt{3}/2", "np.sqrt(2)/2", False, False),
        # decimals for fractions need six significant digits; percent variants only under the qwen rule
        ("0.333333", r"\frac13", True, True),
        ("0.3333", r"\frac13", False, True),
        ("0.5", "50", False, True),
        ("5000", "50", False, True),
        ("500", "50", False, False),
    ],
)
def test_numeric_rules(prediction: str, reference: str, exact: bool, qwen: bool) -> None:
    assert is_equivalent(prediction, reference) is exact
    assert is_equivalent(prediction, reference, numeric_rule="exact") is exact
    assert is_equivalent(prediction, reference, numeric_rule="qwen") is qwen


def test_code_style_golds_are_rewritten_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    reference = f"np.sqrt(open({str(marker)!r}, 'w').close())"
    assert not is_equivalent("1", reference) and not is_equivalent("1", f"__import__('os').remove({str(marker)!r})")
    assert not marker.exists()


def test_unknown_numeric_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="numeric_rule"):
        is_equivalent("1", "1", numeric_rule="loose")
    with pytest.raises(ValueError, match="numeric_rule"):
        MathGrader(numeric_rule="loose")


def test_normalize_answer_is_cheap_and_canonical() -> None:
    assert normalize_answer(r" $\left(1, \dfrac{1}{2}\right)$. ") == r"(1,\frac{1}{2})"
    assert normalize_answer(r"\text{Devon}") == "Devon"


def test_grade_math_end_to_end() -> None:
    assert grade_math(r"... so the answer is \boxed{\frac{3}{4}}.", "0.75")
    assert not grade_math(r"... so the answer is \boxed{\frac{3}{5}}.", "0.75")
    assert not grade_math("I do not know.", "0.75")


def test_grader_module_does_not_import_torch() -> None:
    code = "import sys, dft_lightning.evaluation.graders.math; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=60)


# ------------------------------------------------------------------------------------------------ the pool


def _hang_on_marker(completion: str, reference: str) -> bool:
    """Grade normally, except that "HANG" never finishes, "EXIT"/"RAISE" kill or break the worker and "ALLOC"
    asks for 8 GiB."""
    if completion == "HANG":
        while True:
            time.sleep(0.05)
    if completion == "EXIT":
        os._exit(3)
    if completion == "RAISE":
        raise RuntimeError("grader bug")
    if completion == "ALLOC":
        return len(bytearray(8 * 1024**3)) > 0
    return grade_math(completion, reference)


def test_pool_matches_in_process_and_keeps_order() -> None:
    pairs = [(rf"\boxed{{{i}}}", str(i if i % 3 else i + 1)) for i in range(40)]
    results, stats = grade_math_batch(pairs, workers=2, timeout_s=5.0)
    assert results == [grade_math(c, r) for c, r in pairs]
    assert (stats.items, stats.timeouts, stats.errors) == (40, 0, 0)


def test_pool_cuts_off_a_hung_item_and_carries_on() -> None:
    pairs = [(r"\boxed{1}", "1"), ("HANG", "1"), (r"\boxed{2}", "2"), ("HANG", "2"), (r"\boxed{4}", "3")]
    pairs += [(r"\boxed{5}", "5")] * 10
    start = time.monotonic()
    results, stats = grade_math_batch(pairs, workers=2, timeout_s=1.0, grade_fn=_hang_on_marker)
    elapsed = time.monotonic() - start
    assert results == [True, False, True, False, False] + [True] * 10
    assert stats.timeouts == 2 and stats.errors == 0
    assert elapsed < 30  # two 1 s cut-offs plus worker start-ups, never the hang itself


def test_pool_survives_dead_and_raising_workers() -> None:
    pairs = [("EXIT", "1"), (r"\boxed{1}", "1"), ("RAISE", "1"), (r"\boxed{2}", "2")]
    results, stats = grade_math_batch(pairs, workers=2, timeout_s=5.0, grade_fn=_hang_on_marker)
    assert results == [False, True, False, True]
    assert stats.errors == 2 and stats.timeouts == 0


def test_pool_memory_limit_fails_the_item() -> None:
    pairs = [("ALLOC", "1"), (r"\boxed{1}", "1")]
    results, stats = grade_math_batch(pairs, workers=1, timeout_s=10.0, grade_fn=_hang_on_marker, memory_limit_mb=2048)
    assert results == [False, True] and stats.errors == 1


def test_pool_times_out_real_sympy_work() -> None:
    # comparing these two equations makes sympy work for several seconds on a laptop-class CPU
    slow = (
        r"\boxed{m l \ddot{\theta}(t)-m g \sin \theta(t)=f(t) \cos \theta(t)}",
        r"\frac{d^{2} v_{o}}{d t^{2}}+\frac{v_{o}}{L C}=\frac{v_{i}}{L C}",
    )
    start = time.monotonic()
    results, stats = grade_math_batch([slow, (r"\boxed{1}", "1")], workers=2, timeout_s=0.5)
    assert results == [False, True]
    assert stats.timeouts <= 1
    assert time.monotonic() - start < 30


def test_in_process_mode_and_empty_batch() -> None:
    results, stats = grade_math_batch([(r"\boxed{1}", "1"), ("RAISE", "1")], workers=0, grade_fn=_hang_on_marker)
    assert results == [True, False] and stats.errors == 1
    results, stats = grade_math_batch([], workers=2)
    assert results == [] and stats.items == 0


def test_math_grader_contract() -> None:
    grader = MathGrader(workers=2, timeout_s=5.0)
    problem = {"id": "p1", "question": "1+1?", "answer": "2"}
    assert grader.grade(problem, r"\boxed{2}")
    assert not grader.grade(problem, r"\boxed{3}")
    results, stats = grader.grade_batch([problem, problem], [r"\boxed{2}", "so it is 3"])
    assert results == [True, False] and stats.items == 2
    with pytest.raises(KeyError, match="p2"):
        grader.grade({"id": "p2", "question": "?"}, "1")
    with pytest.raises(ValueError, match="completions"):
        grader.grade_batch([problem], [])


def test_math_grader_numeric_rule_reaches_the_pool() -> None:
    problem = {"id": "p", "question": "?", "answer": "1234567"}
    completions = [r"\boxed{1234568}", r"\boxed{1234567}"]
    qwen = MathGrader(workers=1, timeout_s=10.0, numeric_rule="qwen")
    assert qwen.grade(problem, completions[0]) and not MathGrader().grade(problem, completions[0])
    results, stats = qwen.grade_batch([problem, problem], completions)
    assert results == [True, True] and stats.errors == 0
