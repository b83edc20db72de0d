"""CodeDataModule: UltraFeedback best-completion selection, exact supervision, counted drops, sampling."""

from __future__ import annotations

import pytest

from dft_lightning.data.chat import DropRow
from dft_lightning.data.code import CodeDataModule, FeedbackFields, best_completion, mean_rating, rating_value
from dft_lightning.errors import DataError
from tests.conftest import write_rows

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def rated(response, *ratings, **extra):
    """A completion in UltraFeedback's layout; ``ratings`` in ``ASPECTS`` order."""
    annotations = {a: {"Rating": r, "Rationale": "..."} for a, r in zip(ASPECTS, ratings, strict=False)}
    return {"model": "m", "response": response, "annotations": annotations, **extra}


def make_module(tiny_dir, train, **kwargs):
    kwargs.setdefault("batch_size", 2)
    return CodeDataModule(train=str(train), tokenizer=str(tiny_dir), **kwargs)


def assert_supervised_exactly(tokenizer, row, messages):
    """The row is the template's tokenisation of ``messages``; exactly the final assistant turn is supervised."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(rendered.rstrip(), add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == ids
    prefix = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert row["labels"] == [-100] * n_prefix + ids[n_prefix:]
    assert tokenizer.decode(ids[n_prefix:]) == messages[-1]["content"] + "<|im_end|>"


# -- selection --------------------------------------------------------------------------------
def test_rating_values():
    assert rating_value("4") == 4.0 and rating_value(" 3 ") == 3.0 and rating_value(5) == 5.0
    for bad in ("N/A", "", None, "nan", True, {"Rating": "4"}):
        assert rating_value(bad) is None


def test_na_ratings_are_left_out_of_the_mean():
    assert mean_rating(rated("x", "5", "N/A", "3", "N/A")["annotations"]) == 4.0
    assert mean_rating(rated("x", "N/A", "N/A", "N/A", "N/A")["annotations"]) is None
    assert mean_rating({}) is None and mean_rating(None) is None
    # Only the named aspects count.
    assert mean_rating(rated("x", "5", "1", "1", "1")["annotations"], aspects=["helpfulness"]) == 5.0


def test_best_completion_ignores_na_instead_of_counting_it_as_zero():
    completions = [rated("a", "4", "4", "3", "3"), rated("b", "5", "N/A", "4", "N/A")]
    assert best_completion(completions) == (1, 4.5)  # with N/A as 0, "b" would score 2.25


def test_completions_without_a_numeric_rating_are_skipped():
    completions = [rated("all n/a", "N/A", "N/A", "N/A", "N/A"), {"response": "no annotations"},
                   rated("rated", "2", "2", "2", "2"), "not a dict"]
    assert best_completion(completions) == (2, 2.0)


def test_ties_go_to_the_first_completion():
    completions = [rated("low", "1", "1", "1", "1"), rated("first", "4", "4", "4", "4"),
                   rated("second", "5", "3", "4", "4"), rated("third", "4", "N/A", "4", "4")]
    assert best_completion(completions) == (1, 4.0)


def test_empty_responses_are_skipped_and_unrated_rows_raise():
    completions = [rated("   ", "5", "5", "5", "5"), rated("ok", "3", "3", "3", "3")]
    assert best_completion(completions) == (1, 3.0)
    with pytest.raises(DropRow) as info:
        best_completion([rated("", "5", "5", "5", "5")])
    assert info.value.reason == "empty_response"
    with pytest.raises(DropRow) as info:
        best_completion([rated("x", "N/A", "N/A", "N/A", "N/A"), {"response": "y", "annotations": {}}])
    assert info.value.reason == "no_rated_completion"


def test_aspects_and_field_names_change_the_winner():
    completions = [rated("helpful", "5", "1", "1", "1"), rated("honest", "1", "5", "5", "5")]
    assert best_completion(completions)[0] == 1
    assert best_completion(completions, aspects=["helpfulness"])[0] == 0
    renamed = [{"text": "only", "scores": {"overall": {"score": 3}}}]
    fields = FeedbackFields(response="text", annotations="scores", rating="score")
    assert best_completion(renamed, fields) == (0, 3.0)


# -- the module -------------------------------------------------------------------------------
ULTRA = [
    {"source": "evol_instruct", "instruction": "Write a Python function that adds two numbers.",
     "models": ["a", "b", "c"],
     "completions": [rated("def add(a, b):\n    return a - b", "2", "3", "2", "1"),
                     rated("def add(a, b):\n    return a + b", "5", "N/A", "5", "4"),
                     rated("print(1 + 2)", "3", "3", "3", "3")]},
    {"source": "sharegpt", "instruction": "Reverse a string in Python.",
     "completions": [rated("Use s[::-1].", "4", "4", "4", "4"), rated("Use reversed(s).", "4", "4", "4", "4")]},
    {"source": "ultrachat", "instruction": "Sum a list.",
     "completions": [rated("N/A everywhere", "N/A", "N/A", "N/A", "N/A"), rated("sum(xs)", "1", "1", "1", "1")]},
]
ULTRA_EXPECTED = {1: ("Write a Python function that adds two numbers.", "def add(a, b):\n    return a + b"),
                  2: ("Reverse a string in Python.", "Use s[::-1]."),
                  3: ("Sum a list.", "sum(xs)")}


def test_best_completion_is_supervised_exactly(tmp_path, tiny_dir, tiny_tokenizer):
    dm = make_module(tiny_dir, write_rows(tmp_path / "uf.jsonl", ULTRA))
    dm.setup("fit")
    rows = {int(r["row_id"].rsplit(":", 1)[1]): r for r in dm.datasets["train"]}
    assert sorted(rows) == [1, 2, 3]
    for line, (instruction, response) in ULTRA_EXPECTED.items():
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        assert_supervised_exactly(tiny_tokenizer, rows[line], messages)


def test_system_prompt_and_template_apply(tmp_path, tiny_dir, tiny_tokenizer):
    dm = make_module(tiny_dir, write_rows(tmp_path / "uf.jsonl", ULTRA), system_prompt="You write code.",
                     prompt_template="Task: {prompt}")
    dm.setup("fit")
    row = next(r for r in dm.datasets["train"] if r["row_id"].endswith(":2"))
    messages = [{"role": "system", "content": "You write code."},
                {"role": "user", "content": "Task: Reverse a string in Python."},
                {"role": "assistant", "content": "Use s[::-1]."}]
    assert_supervised_exactly(tiny_tokenizer, row, messages)


def test_every_bad_row_kind_is_counted(tmp_path, tiny_dir):
    bad = [
        {"instruction": "q", "completions": [rated("a", "N/A", "N/A", "N/A", "N/A")]},
        {"instruction": "q", "completions": [{"response": "a", "annotations": {}}]},
        {"instruction": "q", "completions": []},
        {"instruction": "q", "completions": "not a list"},
        {"completions": [rated("a", "5", "5", "5", "5")]},
        {"instruction": "   ", "completions": [rated("a", "5", "5", "5", "5")]},
        {"instruction": ["q"], "completions": [rated("a", "5", "5", "5", "5")]},
        {"instruction": "q", "completions": [rated("", "5", "5", "5", "5")]},
        {"instruction": "q", "completions": [rated("long " * 400, "5", "5", "5", "5")]},
    ]
    path = write_rows(tmp_path / "uf.jsonl", ULTRA + bad, extra_lines=["{broken"])
    dm = make_module(tiny_dir, path, max_length=256)
    dm.setup("fit")
    report = dm.reports["train"]
    assert (report.read, report.kept) == (13, 3)
    assert dict(report.dropped) == {"no_rated_completion": 2, "no_completions": 2, "missing_field": 1,
                                    "empty_prompt": 1, "bad_type": 1, "empty_response": 1, "overlong": 1,
                                    "malformed_json": 1}
    assert report.examples["no_rated_completion"] == ["uf.jsonl:4", "uf.jsonl:5"]
    assert "dropped no_rated_completion: 2" in report.summary()


def test_sampling_is_deterministic(tmp_path, tiny_dir):
    rows = [{"instruction": f"Task {i}", "completions": [rated(f"answer {i}", "4", "4", "4", "4")]}
            for i in range(40)]
    path = write_rows(tmp_path / "uf.jsonl", rows)
    picks = []
    for seed in (7, 7, 8):
        dm = make_module(tiny_dir, path, num_samples=10, seed=seed)
        dm.setup("fit")
        assert dm.reports["train"].read == 10
        picks.append([r["row_id"] for r in dm.datasets["train"]])
    assert picks[0] == picks[1] and len(picks[0]) == 10
    assert picks[2] != picks[0]


def test_dropped_prompts_do_not_count_towards_num_samples(tmp_path, tiny_dir):
    rows = [{"instruction": f"Task {i}", "completions": [rated(f"answer {i}", *(["4"] if i % 2 else ["N/A"]) * 4)]}
            for i in range(40)]
    dm = make_module(tiny_dir, write_rows(tmp_path / "uf.jsonl", rows), num_samples=12, seed=5)
    dm.setup("fit")
    report = dm.reports["train"]
    assert report.kept == 12 and report.read == 12 + report.dropped["no_rated_completion"] > 12


def test_missing_field_everywhere_is_a_config_error(tmp_path, tiny_dir):
    path = write_rows(tmp_path / "uf.jsonl", [{"prompt": "q", "chosen": "a"}] * 3)
    with pytest.raises(DataError, match=r"field 'instruction' missing in all 3 rows \(row fields: chosen, prompt\)"):
        make_module(tiny_dir, path).setup("fit")


def test_bad_knobs_raise_at_construction():
    with pytest.raises(DataError, match="num_samples"):
        CodeDataModule(train="x.jsonl", num_samples=0)
    with pytest.raises(DataError, match="aspects"):
        CodeDataModule(train="x.jsonl", aspects=[])
