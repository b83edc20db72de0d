"""Chat encoding: exactly the assistant tokens are supervised; drops are counted, errors name culprits."""

from __future__ import annotations

import json

import pytest

from dft_lightning.data.chat import ChatEncoder, DropRow, FieldMap, to_messages
from dft_lightning.data.module import ChatDataModule
from dft_lightning.errors import DataError
from tests.conftest import write_rows

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5.\nThe answer is $\\boxed{5}$."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "5 x 4 = 20."},
]


def supervised_runs(ids, labels):
    """Maximal runs of consecutive supervised token ids."""
    runs, current = [], []
    for tok, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_only_assistant_turns_and_end_of_turn_are_supervised(tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer, max_length=1024)
    ids, labels, truncated = encoder.encode(CONVERSATION)
    assert not truncated
    runs = [tiny_tokenizer.decode(r) for r in supervised_runs(ids, labels)]
    assert runs == [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    # The token sequence is the template's own tokenisation (minus the trailing newline).
    rendered = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == tiny_tokenizer(rendered.rstrip(), add_special_tokens=False)["input_ids"]


def test_eos_is_appended_when_template_does_not_end_turns_with_it(tiny_tokenizer):
    tiny_tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tiny_tokenizer.eos_token = "<|endoftext|>"
    ids, labels, _ = ChatEncoder(tiny_tokenizer, max_length=1024).encode(CONVERSATION[:3])
    assert ids[-1] == labels[-1] == tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tiny_tokenizer.decode(supervised_runs(ids, labels)[-1]).endswith("<|im_end|><|endoftext|>")


def test_overlong_rows_drop_or_truncate(tiny_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    with pytest.raises(DropRow) as info:
        ChatEncoder(tiny_tokenizer, max_length=64, overlong="drop").encode(messages)
    assert info.value.reason == "overlong"
    ids, labels, truncated = ChatEncoder(tiny_tokenizer, max_length=64, overlong="truncate").encode(messages)
    assert truncated and len(ids) == 64 and any(t != -100 for t in labels)
    with pytest.raises(DropRow, match="overlong"):  # truncation that leaves no response token
        ChatEncoder(tiny_tokenizer, max_length=8, overlong="truncate").encode(messages)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "q"}, "missing_field"),
        ({"prompt": "q", "response": "   "}, "empty_response"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "bad_role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "empty_response"),
        ({"messages": "not a list"}, "bad_messages"),
        ({"prompt": 3, "response": "x"}, "bad_type"),
        (["a", "list"], "not_an_object"),
    ],
)
def test_bad_rows_name_their_reason(row, reason):
    with pytest.raises(DropRow) as info:
        to_messages(row, FieldMap())
    assert info.value.reason == reason


def make_module(tiny_dir, train, **kwargs):
    kwargs.setdefault("batch_size", 2)
    return ChatDataModule(train=str(train), tokenizer=str(tiny_dir), **kwargs)


def test_report_counts_every_drop_by_reason(tmp_path, tiny_dir):
    good = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    bad = [{"prompt": "q"}, {"prompt": "q", "response": ""}, {"prompt": "q", "response": "long " * 400}]
    path = write_rows(tmp_path / "train.jsonl", good + bad, extra_lines=["{not json"])
    dm = make_module(tiny_dir, path, max_length=128)
    dm.setup("fit")
    report = dm.reports["train"]
    assert (report.read, report.kept) == (9, 5)
    assert dict(report.dropped) == {"missing_field": 1, "empty_response": 1, "overlong": 1, "malformed_json": 1}
    assert report.examples["malformed_json"] == ["train.jsonl:9"]
    assert report.examples["missing_field"] == ["train.jsonl:6"]
    summary = report.summary()
    assert "dropped overlong: 1" in summary and "train.jsonl:8" in summary
    assert len(dm.datasets["train"]) == 5


def test_strict_mode_names_the_row(tmp_path, tiny_dir):
    path = write_rows(tmp_path / "t.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": ""}])
    with pytest.raises(DataError, match=r"t.jsonl:2 dropped: empty_response"):
        make_module(tiny_dir, path, strict=True, batch_size=1).setup("fit")


def test_field_missing_everywhere_is_a_config_error(tmp_path, tiny_dir):
    path = write_rows(tmp_path / "t.jsonl", [{"problem": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match=r"field 'prompt' missing in all 3 rows \(row fields: answer, problem\)"):
        make_module(tiny_dir, path).setup("fit")


def test_missing_file_and_empty_result(tmp_path, tiny_dir):
    with pytest.raises(DataError, match=r"data.train: data file not found: .*nope.jsonl"):
        make_module(tiny_dir, tmp_path / "nope.jsonl").setup("fit")
    path = write_rows(tmp_path / "t.jsonl", [{"prompt": "q", "response": " "}, {"prompt": "q"}, {"prompt": "x"}])
    with pytest.raises(DataError, match=r"no usable rows: 3 read, all dropped \(.*empty_response: 1"):
        make_module(tiny_dir, path).setup("fit")


def test_batch_larger_than_data_is_an_error(tmp_path, tiny_dir):
    path = write_rows(tmp_path / "t.jsonl", [{"prompt": "q", "response": "a"}] * 3)
    with pytest.raises(DataError, match="data.batch_size=8 but only 3 training rows"):
        make_module(tiny_dir, path, batch_size=8).setup("fit")


def test_json_array_files_and_sampling_are_deterministic(tmp_path, tiny_dir):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(rows))
    picks = []
    for _ in range(2):
        dm = make_module(tiny_dir, path, max_samples=10, seed=3, cache=False)  # sample twice, not read back
        dm.setup("fit")
        picks.append([r["row_id"] for r in dm.datasets["train"]])
    assert picks[0] == picks[1] and len(picks[0]) == 10
    other = make_module(tiny_dir, path, max_samples=10, seed=4)
    other.setup("fit")
    assert [r["row_id"] for r in other.datasets["train"]] != picks[0]


def test_max_samples_counts_kept_rows_not_drawn_ones(tmp_path, tiny_dir):
    good = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    bad = [{"prompt": f"bad{i}"} for i in range(20)]  # missing response: dropped
    path = write_rows(tmp_path / "t.jsonl", [r for pair in zip(good, bad, strict=True) for r in pair])
    dm = make_module(tiny_dir, path, max_samples=12, seed=7)
    dm.setup("fit")
    report, rows = dm.reports["train"], dm.datasets["train"]
    assert report.kept == len(rows) == 12  # exactly as asked, although half of the source is unusable
    assert report.read == 12 + report.dropped["missing_field"] and report.read < 40  # stopped once 12 were kept
    lines = [int(r["row_id"].split(":")[1]) for r in rows]
    assert lines == sorted(lines) and all(n % 2 == 1 for n in lines)  # source order, good rows only
    assert "max_samples 12 of 40 source rows" in report.summary()
    with pytest.warns(UserWarning, match=r"data.max_samples=30 but only 20 of the source's 40 rows are usable"):
        short = make_module(tiny_dir, path, max_samples=30, seed=7)
        short.setup("fit")
    assert len(short.datasets["train"]) == 20
