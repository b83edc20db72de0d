"""Multimodal benchmarks (MathVerse, MathVision, WeMath) on small local files in each source's schema, with real
PNG images, and the rule-based choice grader: which letters it takes, and which prose it refuses to read as one."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from dft_lightning.evaluation.benchmarks.multimodal import (
    MultimodalBenchmark,
    load_image,
    load_multimodal_benchmark,
    parse_option_string,
    prompt_text,
)
from dft_lightning.evaluation.graders.choice import (
    ChoiceGrader,
    extract_choice,
    grade_choice,
    normalize_choice,
    option_letters,
)

# ------------------------------------------------------------------------------------------- choice letters

TAKEN = [
    (r"so the answer is $\boxed{D}$", "D"),
    (r"\boxed{\text{(B)}}", "B"),
    (r"\boxed{B. 60^\circ}", "B"),
    ("The answer is (B).", "B"),
    ("Answer: C", "C"),
    ("**Answer:** $D$", "D"),
    ("So the answer is **B**", "B"),
    ("Thus, the answer is: (A)", "A"),
    ("The answer is A.", "A"),
    ("Therefore the answer is A", "A"),
    ("Answer: A, since x = 2", "A"),
    ("the correct option is B", "B"),
    ("Hence option (C).", "C"),
    ("Option A is wrong. B is correct.", "B"),
    ("Since ABC is equilateral, the answer is C", "C"),
    ("I think A is not correct, the answer is D", "D"),
    ("Answer:\n\nB", "B"),
    ("...reasoning...\nB", "B"),
    ("...reasoning...\n(B) 60°", "B"),
    ("...reasoning...\n**C**", "C"),
    ("(E)", "E"),
]
REFUSED = [
    "The answer is A triangle has three sides.",  # the article, not option A
    "A circle has radius 3, so the area is 9 pi",
    "The distance from point B to line AC is 5",
    "answer: In the figure, the angle is 30 degrees",
    "The answer is B or C.",
    "Answer: A, B and C are collinear",
    "the answer is A and B",
    r"\boxed{60^\circ}",  # a value, and no options to match it against
    "",
]


@pytest.mark.parametrize(("text", "letter"), TAKEN)
def test_choice_letters_taken(text: str, letter: str) -> None:
    assert extract_choice(text) == letter


@pytest.mark.parametrize("text", REFUSED)
def test_prose_is_not_read_as_a_choice(text: str) -> None:
    assert extract_choice(text) is None


def test_letter_sets_references_and_option_values() -> None:
    assert option_letters(4) == "ABCD"
    assert extract_choice("The answer is E", letters="ABCD") is None  # not an option of this problem
    assert [normalize_choice(x) for x in ("B", "(b)", "c.", "Option D", "F", "60")] == ["B", "B", "C", "D", None, None]
    options = ["30°", "60°", "90°"]
    assert extract_choice(r"\boxed{60^\circ}", "ABC", options) == "B"
    assert extract_choice(r"\boxed{60}", "ABC", ["30", "60.0", "90"]) == "B"
    assert extract_choice(r"\boxed{45}", "ABC", options) is None
    assert grade_choice(r"\boxed{(C)}", "C", options) and not grade_choice("Answer: A", "(c)", options)
    with pytest.raises(ValueError, match="not one of the letters"):
        grade_choice("Answer: A", "60", options)


def test_option_strings() -> None:
    assert parse_option_string("A. 3; B. 4; C. five; D. 6; E. No correct answer") == [
        "3",
        "4",
        "five",
        "6",
        "No correct answer",
    ]
    assert parse_option_string("(A) 1; (B) 2") == ["1", "2"]
    assert parse_option_string("B. 3; C. 4") == [] and parse_option_string("just text") == []


# ------------------------------------------------------------------------------------------------ loaders


def _png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def mathverse_file(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(_png("red"))
    base = {"problem_index": "1", "metadata": {"subject": "plane geometry"}, "image": "images/1.png"}
    rows = [
        {
            **base,
            "sample_index": "1",
            "problem_version": "Text Dominant",
            "question": "In the figure, AB is parallel to CD. Find angle 2.\nChoices:\nA:55°\nB:35°\nC:45°\nD:25°",
            "answer": "B",
            "question_type": "multi-choice",
            "query_cot": "Please first conduct reasoning, and then answer the question. Find angle 2.",
        },
        {
            **base,
            "sample_index": "2",
            "problem_version": "Vision Only",
            "question": "Find the length of AB.",
            "answer": "5",
            "question_type": "free-form",
            "query_cot": "Find AB.",
        },
    ]
    return _jsonl(tmp_path / "mathverse_testmini.jsonl", rows)


def test_mathverse_schema(mathverse_file: Path) -> None:
    mc, free = load_multimodal_benchmark("mathverse", mathverse_file)
    assert mc["id"] == "mathverse/1" and mc["question_type"] == "multiple_choice"
    assert mc["letters"] == "ABCD" and mc["answer"] == "B" and mc["options"] == []  # choices live in the question
    assert mc["images"] == [str(mathverse_file.parent / "images" / "1.png")]
    assert mc["meta"]["problem_version"] == "Text Dominant" and mc["meta"]["metadata"]["subject"] == "plane geometry"
    assert free["question_type"] == "free_form" and free["answer"] == "5" and free["letters"] == ""
    assert load_image(mc["images"][0]).size == (8, 6)
    [cot, _] = load_multimodal_benchmark("mathverse", mathverse_file, fields={"question": "query_cot"})
    assert cot["question"].startswith("Please first conduct reasoning")


def test_mathvision_schema_from_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": "7",
            "question": "Which number is in the box? <image1>",
            "options": ["1", "2", "3", "4", "5"],
            "image": "images/7.jpg",
            "decoded_image": {"bytes": _png("blue"), "path": "7.jpg"},
            "answer": "C",
            "solution": None,
            "level": 2,
            "subject": "arithmetic",
        },
        {
            "id": "8",
            "question": "What fraction is shaded?",
            "options": [],
            "image": "images/8.jpg",
            "decoded_image": {"bytes": _png("green"), "path": "8.jpg"},
            "answer": "\\frac{1}{2}",
            "solution": None,
            "level": 3,
            "subject": "arithmetic",
        },
        {
            "id": "9",
            "question": "How many sides?",
            "options": ["3", "4", "5"],
            "image": "images/9.jpg",
            "decoded_image": {"bytes": _png("white"), "path": "9.jpg"},
            "answer": "4",  # an option's text instead of its letter
            "solution": None,
            "level": 1,
            "subject": "counting",
        },
    ]
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), folder / "testmini-00000-of-00001.parquet")
    problems = load_multimodal_benchmark("MathVision", folder)  # the directory: files of split "test" only
    assert [p["id"] for p in problems] == ["mathvision/7", "mathvision/8", "mathvision/9"]
    mc, free, by_text = problems
    assert mc["question_type"] == "multiple_choice" and mc["letters"] == "ABCDE" and mc["answer"] == "C"
    assert isinstance(mc["images"][0], bytes) and load_image(mc["images"][0]).size == (8, 6)
    assert mc["meta"] == {"level": 2, "subject": "arithmetic"}
    assert free["question_type"] == "free_form" and free["answer"] == "\\frac{1}{2}"
    assert by_text["answer"] == "B" and by_text["letters"] == "ABC"
    assert len(load_multimodal_benchmark("mathvision", folder, split="testmini")) == 1


def test_wemath_schema_and_image_checks(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(_png("black"))
    row = {
        "ID": "2steps_1",
        "split": "testmini",
        "knowledge concept": "Properties of parallelograms",
        "question": "As shown in the figure, what is the perimeter?",
        "option": "A. 3; B. 4; C. 5; D. 6; E. No correct answer",
        "answer": "B",
        "image_path": "img.png",
        "key": "2-1",
        "question number": 1,
    }
    [problem] = load_multimodal_benchmark("wemath", _jsonl(tmp_path / "wemath.jsonl", [row]))
    assert problem["id"] == "wemath/2steps_1" and problem["options"][-1] == "No correct answer"
    assert problem["letters"] == "ABCDE" and problem["answer"] == "B" and problem["meta"]["key"] == "2-1"
    assert "E. No correct answer" in prompt_text(problem) and "\\boxed{A}" in prompt_text(problem)

    missing = _jsonl(tmp_path / "missing.jsonl", [{**row, "image_path": "absent.png"}])
    with pytest.raises(ValueError, match=r"wemath: row 0: image 'absent.png' not found"):
        load_multimodal_benchmark("wemath", missing)
    assert load_multimodal_benchmark("wemath", missing, check_images=False)[0]["images"][0].endswith("absent.png")
    with pytest.raises(ValueError, match="no answer"):
        load_multimodal_benchmark("wemath", _jsonl(tmp_path / "noanswer.jsonl", [{**row, "answer": ""}]))
    with pytest.raises(KeyError, match="unknown multimodal benchmark"):
        load_multimodal_benchmark("mmmu", missing)


# -------------------------------------------------------------------------------------------- benchmark


def test_benchmark_prompts_messages_and_grading(mathverse_file: Path) -> None:
    bench = MultimodalBenchmark.load("mathverse", mathverse_file, grader=ChoiceGrader(workers=1, timeout_s=30))
    texts = bench.texts()
    assert texts[0].startswith("In the figure") and "letter of the correct option" in texts[0]
    assert texts[1].endswith("put your final answer within \\boxed{}.")
    [turn] = bench.messages()[0]
    assert turn["role"] == "user" and turn["content"][0] == {"type": "image", "image": bench.problems[0]["images"][0]}
    assert turn["content"][-1] == {"type": "text", "text": texts[0]}

    samples = [
        [r"Angle 2 equals 35 degrees, so $\boxed{B}$", "The answer is (A).", "A circle is drawn through A and B."],
        [r"AB = \boxed{5}", r"\boxed{5.0}", "The length is 7"],
    ]
    results, stats = bench.grade_samples(samples)  # the math grader's process pool, one worker
    assert results == [[True, False, False], [True, True, False]]
    assert stats.items == 6 and stats.timeouts == 0 and stats.errors == 0
    assert bench.grade(bench.problems[0], "Answer: B") and not bench.grade(bench.problems[1], "Answer: B")
    assert bench.breakdown(results) == {
        "multiple_choice": {"problems": 1, "accuracy": 1 / 3},
        "free_form": {"problems": 1, "accuracy": 2 / 3},
    }
    assert set(bench.breakdown(results, "problem_version")) == {"Text Dominant", "Vision Only"}
