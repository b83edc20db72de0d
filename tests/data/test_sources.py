"""The one row reader (``dft_lightning.rows``): file layouts, row ids, counted bad rows, and both of its users."""

from __future__ import annotations

import gzip
import json

import pytest

from dft_lightning.data.module import ChatDataModule
from dft_lightning.errors import DataError
from dft_lightning.rows import BadRow, SourceNotFoundError, iter_rows, looks_local, read_rows
from tests.conftest import write_rows

ROWS = [{"prompt": "q0", "response": "a0"}, {"prompt": "q1", "response": "a1"}]


def _read(source, **kwargs):
    return list(iter_rows(source, key="data.train", **kwargs))


def test_json_lines_keep_line_numbers_and_mark_bad_rows(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", ROWS, extra_lines=("", "{oops", '["a", "list"]', "7"))
    rows = _read(path)
    assert rows[:2] == [("t.jsonl:1", ROWS[0]), ("t.jsonl:2", ROWS[1])]
    assert [(row_id, row.reason) for row_id, row in rows[2:]] == [
        ("t.jsonl:4", "malformed_json"), ("t.jsonl:5", "not_an_object"), ("t.jsonl:6", "not_an_object")]
    assert rows[3][1] == BadRow("not_an_object", "list") and "property name" in rows[2][1].detail
    with pytest.raises(DataError, match=r"^bench: t\.jsonl:4: not valid JSON \(Expecting property name"):
        read_rows(path, key="bench")


def test_json_arrays_wrapped_lists_json_lines_gzip_and_parquet_read_the_same(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([*ROWS, 3]))
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"version": "1.0", "test": ROWS}))
    lines = write_rows(tmp_path / "l.json", ROWS)  # JSON lines in a .json file, as datasets' to_json writes them
    single = tmp_path / "one.json"
    single.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}))  # one row, not a wrapper
    zipped = tmp_path / "z.jsonl.gz"
    zipped.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    assert _read(array)[:2] == [("a.json:0", ROWS[0]), ("a.json:1", ROWS[1])]
    assert _read(array)[2] == ("a.json:2", BadRow("not_an_object", "int"))
    assert [r for _, r in _read(wrapped)] == [r for _, r in _read(lines)] == [r for _, r in _read(zipped)] == ROWS
    assert [r for _, r in _read(tmp_path / "p.parquet")] == ROWS
    assert _read(single) == [("one.json:1", {"messages": [{"role": "user", "content": "x"}]})]
    assert _read(zipped)[0][0] == "z.jsonl.gz:1"


def test_directories_missing_sources_and_hub_failures_are_one_line_errors(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    write_rows(folder / "b.jsonl", ROWS[1:])
    write_rows(folder / "sub" / "a.jsonl", ROWS[:1])
    (folder / "notes.txt").write_text("not rows")
    assert [r for _, r in _read(folder)] == [ROWS[1], ROWS[0]]  # sorted paths: b.jsonl < sub/a.jsonl
    with pytest.raises(SourceNotFoundError, match=r"data.train: data file not found: .*nope\.jsonl") as missing:
        _read(tmp_path / "nope.jsonl")
    assert isinstance(missing.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .json/.jsonl/.parquet files in directory"):
        _read(tmp_path / "empty")
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2")
    with pytest.raises(DataError, match=r"broken\.json is not valid JSON"):
        _read(broken)
    assert looks_local("x.parquet") and looks_local("./x") and not looks_local("org/dataset")
    with pytest.raises(DataError, match=r"^bench: could not load 'dft-no-such-org/none' as a local file or hub"):
        read_rows("dft-no-such-org/none", key="bench", split="test")


def test_the_data_module_counts_the_readers_bad_rows(tmp_path, tiny_dir):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([*ROWS, ["not", "a", "row"], {"prompt": "q2", "response": "a2"}]))
    module = ChatDataModule(train=str(path), tokenizer=str(tiny_dir), batch_size=1, cache=False)
    module.setup("fit")
    report = module.reports["train"]
    assert (report.read, report.kept) == (4, 3)
    assert dict(report.dropped) == {"not_an_object": 1} and report.examples["not_an_object"] == ["train.json:2"]
    strict = ChatDataModule(train=str(path), tokenizer=str(tiny_dir), batch_size=1, cache=False, strict=True)
    with pytest.raises(DataError, match=r"train.json:2 dropped: not_an_object"):
        strict.setup("fit")
