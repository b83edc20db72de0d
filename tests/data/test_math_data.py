"""MathDataModule: NuminaMath-CoT, OpenR1 and rejection-sampled rows become exactly-supervised chats."""

from __future__ import annotations

import pytest

from dft_lightning.data.math import BOXED_SUFFIX, MathDataModule, MathFields
from dft_lightning.errors import DataError
from tests.conftest import write_rows

LUFFY_SYSTEM = "Your task is to think before answering."


def make_module(tiny_dir, train, **kwargs):
    kwargs.setdefault("batch_size", 2)
    return MathDataModule(train=str(train), tokenizer=str(tiny_dir), **kwargs)


def chat(problem, response, system=None):
    messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": response}]
    return ([{"role": "system", "content": system}] if system else []) + messages


def assert_supervised_exactly(tokenizer, row, messages):
    """The row is the template's tokenisation of ``messages``; exactly the final assistant turn is supervised."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(rendered.rstrip(), add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == ids
    prefix = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert row["labels"] == [-100] * n_prefix + ids[n_prefix:]
    assert tokenizer.decode(ids[n_prefix:]) == messages[-1]["content"] + "<|im_end|>"


def by_line(dm):
    """Kept training rows keyed by their line number in the source file."""
    return {int(r["row_id"].rsplit(":", 1)[1]): r for r in dm.datasets["train"]}


NUMINA = [
    {"source": "synthetic_math", "problem": "What is 2 + 3?", "solution": "2 + 3 = 5, so $\\boxed{5}$.",
     "messages": [{"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "2 + 3 = 5, so $\\boxed{5}$."}]},
    {"source": "amc_aime", "messages": [{"role": "user", "content": "What is 4 times 5?"},
                                        {"role": "assistant", "content": "4 times 5 is 20.\n\\boxed{20}"}]},
    {"source": "olympiads", "problem": "Solve x + 1 = 3.", "solution": "Subtract 1: x = 2. $\\boxed{2}$"},
]


@pytest.mark.parametrize("style", ["raw", "boxed"])
def test_numina_rows_supervise_exactly_the_solution(tmp_path, tiny_dir, tiny_tokenizer, style):
    dm = make_module(tiny_dir, write_rows(tmp_path / "numina.jsonl", NUMINA), prompt_style=style)
    dm.setup("fit")
    assert (dm.reports["train"].read, dm.reports["train"].kept) == (3, 3)
    expected = {1: ("What is 2 + 3?", "2 + 3 = 5, so $\\boxed{5}$."),
                2: ("What is 4 times 5?", "4 times 5 is 20.\n\\boxed{20}"),
                3: ("Solve x + 1 = 3.", "Subtract 1: x = 2. $\\boxed{2}$")}
    rows = by_line(dm)
    for line, (problem, solution) in expected.items():
        user = f"{problem}\n{BOXED_SUFFIX}" if style == "boxed" else problem
        assert_supervised_exactly(tiny_tokenizer, rows[line], chat(user, solution))


def test_boxed_suffix_is_the_paper_instruction():
    assert BOXED_SUFFIX == "Please reason step by step, and put your final answer within \\boxed{}."


def test_numina_sampling_is_deterministic(tmp_path, tiny_dir):
    rows = [{"problem": f"What is {i} + 1?", "solution": f"It is {i + 1}."} for i in range(40)]
    path = write_rows(tmp_path / "numina.jsonl", rows)
    picks = []
    for seed in (3, 3, 4):
        dm = make_module(tiny_dir, path, num_samples=10, seed=seed)
        dm.setup("fit")
        assert dm.reports["train"].read == 10
        picks.append([r["row_id"] for r in dm.datasets["train"]])
    assert picks[0] == picks[1] and len(picks[0]) == 10
    assert picks[2] != picks[0]


def test_dropped_rows_do_not_count_towards_num_samples(tmp_path, tiny_dir):
    rows = [{"question": f"What is {i} + 1?", "response": f"It is {i + 1}.", "verified": i % 2 == 0}
            for i in range(40)]
    dm = make_module(tiny_dir, write_rows(tmp_path / "r.jsonl", rows), source_format="rejection",
                     num_samples=12, seed=5)
    dm.setup("fit")
    report = dm.reports["train"]
    assert report.kept == 12 and report.read == 12 + report.dropped["unverified"] > 12
    assert all(int(r["row_id"].split(":")[1]) % 2 == 1 for r in dm.datasets["train"])  # 1-based lines


def test_numina_drops_are_counted(tmp_path, tiny_dir):
    rows = NUMINA + [
        {"source": "x", "solution": "no problem here"},
        {"problem": "q?", "solution": "   "},
        {"problem": "   ", "solution": "a"},
        {"problem": 3, "solution": "a"},
        {"problem": "q?", "solution": "long " * 400},
    ]
    dm = make_module(tiny_dir, write_rows(tmp_path / "n.jsonl", rows, extra_lines=["{oops"]), max_length=128)
    dm.setup("fit")
    report = dm.reports["train"]
    assert (report.read, report.kept) == (9, 3)
    assert dict(report.dropped) == {"missing_field": 1, "empty_response": 1, "empty_prompt": 1, "bad_type": 1,
                                    "overlong": 1, "malformed_json": 1}
    assert report.examples["missing_field"] == ["n.jsonl:4"]
    assert report.examples["malformed_json"] == ["n.jsonl:9"]


LUFFY_TRACE = "<think>\nx + 1 = 3 so x = 2.\n</think>\nThe answer is $\\boxed{2}$."
OPENR1 = [
    # LUFFY's copy: prompt and target are chat turns; the copy's system turn is not kept.
    {"data_source": "openr1", "prompt": [{"role": "system", "content": LUFFY_SYSTEM},
                                         {"role": "user", "content": "Solve x + 1 = 3."}],
     "target": [{"role": "assistant", "content": LUFFY_TRACE}], "reward_model": {"ground_truth": "2", "style": "rule"}},
    # OpenR1-Math-220k: the first trace flagged correct (and complete) is used.
    {"problem": "What is 6 / 2?", "generations": ["6 / 2 = 4", "6 / 2 = 3, so \\boxed{3}", "also 3"],
     "correctness_math_verify": [False, True, True], "is_reasoning_complete": [True, True, True]},
    {"problem": "What is 3 - 1?", "generations": ["3 - 1 = 2 but then", "3 - 1 = 2. \\boxed{2}"],
     "correctness_math_verify": [True, True], "is_reasoning_complete": [False, True]},
    # No correctness field: the first trace.
    {"problem": "What is 1 + 1?", "generations": ["1 + 1 = 2. \\boxed{2}", "two"]},
]
OPENR1_EXPECTED = {
    1: ("Solve x + 1 = 3.", LUFFY_TRACE),
    2: ("What is 6 / 2?", "6 / 2 = 3, so \\boxed{3}"),
    3: ("What is 3 - 1?", "3 - 1 = 2. \\boxed{2}"),
    4: ("What is 1 + 1?", "1 + 1 = 2. \\boxed{2}"),
}


def test_openr1_rows_pick_the_verified_trace_and_supervise_it_exactly(tmp_path, tiny_dir, tiny_tokenizer):
    dm = make_module(tiny_dir, write_rows(tmp_path / "openr1.jsonl", OPENR1), source_format="openr1")
    dm.setup("fit")
    rows = by_line(dm)
    assert sorted(rows) == [1, 2, 3, 4]
    for line, (problem, trace) in OPENR1_EXPECTED.items():
        assert_supervised_exactly(tiny_tokenizer, rows[line], chat(problem, trace))


def test_openr1_system_prompt_replaces_the_copies_own(tmp_path, tiny_dir, tiny_tokenizer):
    dm = make_module(tiny_dir, write_rows(tmp_path / "o.jsonl", OPENR1[:2]), source_format="openr1",
                     system_prompt="Think first.")
    dm.setup("fit")
    assert_supervised_exactly(tiny_tokenizer, by_line(dm)[1], chat("Solve x + 1 = 3.", LUFFY_TRACE, "Think first."))


def test_openr1_drops_are_counted_by_reason(tmp_path, tiny_dir, tiny_tokenizer):
    long_trace = "x = 2. " * 60
    n_long = len(tiny_tokenizer(long_trace, add_special_tokens=False)["input_ids"])
    bad = [
        {"problem": "p1", "generations": ["a", "b"], "correctness_math_verify": [False, False]},
        {"problem": "p2", "generations": ["a"], "correctness_math_verify": []},
        {"problem": "p3", "generations": ["a", "b"], "correctness_math_verify": [True, True],
         "is_reasoning_complete": [False, False]},
        {"problem": "p4", "generations": [long_trace], "correctness_math_verify": [True]},
        {"problem": "p5", "generations": ["a"], "correctness_math_verify": ["perhaps"]},
        {"problem": "p6", "solution": "only the reference solution"},
        {"prompt": [{"role": "system", "content": "s"}], "target": [{"role": "assistant", "content": "t"}]},
        {"problem": "p8", "target": "single trace", "correctness_math_verify": False},
    ]
    path = write_rows(tmp_path / "o.jsonl", OPENR1 + bad)
    dm = make_module(tiny_dir, path, source_format="openr1", max_trace_tokens=n_long - 1)
    dm.setup("fit")
    report = dm.reports["train"]
    assert (report.read, report.kept) == (12, 4)
    assert dict(report.dropped) == {"incorrect": 3, "incomplete": 1, "trace_too_long": 1, "bad_flag": 1,
                                    "missing_field": 1, "bad_type": 1}
    assert report.examples["incorrect"] == ["o.jsonl:5", "o.jsonl:6", "o.jsonl:12"]
    assert report.examples["trace_too_long"] == ["o.jsonl:8"]
    # At exactly the limit the trace is kept; without a limit too.
    for limit in (n_long, None):
        dm = make_module(tiny_dir, path, source_format="openr1", max_trace_tokens=limit)
        dm.setup("fit")
        assert "trace_too_long" not in dm.reports["train"].dropped and 8 in by_line(dm)


def test_openr1_field_names_are_configurable(tmp_path, tiny_dir, tiny_tokenizer):
    rows = [{"question": f"q{i}?", "traces": ["bad", f"good {i}"], "judge": [0, 1]} for i in range(3)]
    fields = MathFields(problem="question", response="traces", correct="judge")
    dm = make_module(tiny_dir, write_rows(tmp_path / "o.jsonl", rows), source_format="openr1", fields=fields)
    dm.setup("fit")
    assert dm.reports["train"].kept == 3
    assert_supervised_exactly(tiny_tokenizer, by_line(dm)[2], chat("q1?", "good 1"))
    # An empty name switches the correctness check off: the first trace is used.
    off = make_module(tiny_dir, tmp_path / "o.jsonl", source_format="openr1",
                      fields=MathFields(problem="question", response="traces", correct=""))
    off.setup("fit")
    assert_supervised_exactly(tiny_tokenizer, by_line(off)[1], chat("q0?", "bad"))


REJECTION = [
    {"question": "What is 2 + 2?", "response": "2 + 2 = 4. \\boxed{4}", "verified": True},
    {"prompt": "What is 9 - 3?", "response": "9 - 3 = 6. \\boxed{6}"},
    {"question": "What is 5 + 5?", "response": "5 + 5 = 10. \\boxed{10}", "correct": 1},
]


@pytest.mark.parametrize("style", ["raw", "boxed"])
def test_rejection_rows_supervise_exactly_the_verified_response(tmp_path, tiny_dir, tiny_tokenizer, style):
    dm = make_module(tiny_dir, write_rows(tmp_path / "r.jsonl", REJECTION), source_format="rejection",
                     prompt_style=style)
    dm.setup("fit")
    rows = by_line(dm)
    for line, row in enumerate(REJECTION, start=1):
        problem = row.get("question", row.get("prompt"))
        user = f"{problem}\n{BOXED_SUFFIX}" if style == "boxed" else problem
        assert_supervised_exactly(tiny_tokenizer, rows[line], chat(user, row["response"]))


def test_rejection_drops_are_counted_by_reason(tmp_path, tiny_dir):
    bad = [
        {"question": "q", "response": "r", "verified": False},
        {"question": "q", "response": "r", "correct": "false"},
        {"question": "q", "response": "r", "verified": "maybe"},
        {"question": "q"},
        {"question": "q", "response": ""},
    ]
    path = write_rows(tmp_path / "r.jsonl", REJECTION + bad, extra_lines=["not json"])
    dm = make_module(tiny_dir, path, source_format="rejection")
    dm.setup("fit")
    report = dm.reports["train"]
    assert (report.read, report.kept) == (9, 3)
    assert dict(report.dropped) == {"unverified": 2, "bad_flag": 1, "missing_field": 1, "empty_response": 1,
                                    "malformed_json": 1}
    assert report.examples["unverified"] == ["r.jsonl:4", "r.jsonl:5"]
    assert "dropped unverified: 2" in report.summary()


def test_wrong_format_for_the_data_is_a_config_error(tmp_path, tiny_dir):
    path = write_rows(tmp_path / "numina.jsonl", [{"problem": "q", "solution": "a"}] * 3)
    with pytest.raises(DataError, match=r"field 'target' or field 'generations' missing in all 3 rows"):
        make_module(tiny_dir, path, source_format="openr1").setup("fit")


def test_bad_knobs_raise_at_construction(tmp_path):
    with pytest.raises(DataError, match="source_format"):
        MathDataModule(train="x.jsonl", source_format="gsm8k")
    with pytest.raises(DataError, match="prompt_style"):
        MathDataModule(train="x.jsonl", prompt_style="fancy")
    with pytest.raises(DataError, match="num_samples"):
        MathDataModule(train="x.jsonl", num_samples=0)
