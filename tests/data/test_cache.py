"""The tokenised-row cache: a hit gives back exactly what tokenising gives; anything that changes the rows
misses; batching settings do not; damaged entries are rebuilt; ``cache=False`` writes nothing."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from dft_lightning.data.module import ChatDataModule
from tests.conftest import write_rows


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DFT_LIGHTNING_CACHE", str(root))
    return root / "tokenised"


def rows_of(tmp_path):
    good = [{"prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}."} for i in range(12)]
    return write_rows(tmp_path / "train.jsonl", [*good, {"prompt": "no response"}], extra_lines=["{broken"])


def setup(tiny_dir, path, **kwargs):
    kwargs.setdefault("batch_size", 2)
    dm = ChatDataModule(train=str(path), tokenizer=str(tiny_dir), **kwargs)
    dm.setup("fit")
    return dm


def entries(cache_dir):
    return sorted(cache_dir.rglob("*.pt")) if cache_dir.exists() else []


def test_a_hit_returns_the_tokenised_rows_and_report_without_tokenising(tmp_path, tiny_dir, cache_dir, monkeypatch):
    path = rows_of(tmp_path)
    first = setup(tiny_dir, path, max_length=64, overlong="truncate")
    assert len(entries(cache_dir)) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the second run must read the cache")

    monkeypatch.setattr(ChatDataModule, "tokenise", no_tokenising)
    second = setup(tiny_dir, path, max_length=64, overlong="truncate", batch_size=4, micro_batch_size=1)
    assert second.datasets["train"] == first.datasets["train"]
    a, b = first.reports["train"], second.reports["train"]
    assert (b.read, b.kept, b.truncated, dict(b.dropped)) == (a.read, a.kept, a.truncated, dict(a.dropped))
    assert b.examples == a.examples and b.prompt_lengths == a.prompt_lengths and b.summary() == a.summary()
    assert dict(b.dropped) == {"missing_field": 1, "malformed_json": 1}


def test_strict_holds_for_rows_read_back_from_the_cache(tmp_path, tiny_dir, cache_dir, monkeypatch):
    from dft_lightning.errors import DataError

    path = rows_of(tmp_path)
    with pytest.raises(DataError) as uncached:
        setup(tiny_dir, path, strict=True, cache=False)
    setup(tiny_dir, path)  # a lenient run caches the rows and counts the drops
    clean = tmp_path / "clean"
    clean.mkdir()
    clean_rows = setup(tiny_dir, write_rows(clean / "train.jsonl", [{"prompt": "1?", "response": "1."}] * 4))
    assert len(entries(cache_dir)) == 2

    def no_tokenising(*args, **kwargs):
        raise AssertionError("a strict run reads the same entry")

    monkeypatch.setattr(ChatDataModule, "tokenise", no_tokenising)
    with pytest.raises(DataError) as cached:
        setup(tiny_dir, path, strict=True)
    assert str(cached.value) == str(uncached.value)
    assert str(cached.value).startswith("data.train: row train.jsonl:13 dropped: missing_field")
    assert setup(tiny_dir, clean / "train.jsonl", strict=True).datasets["train"] == clean_rows.datasets["train"]


def test_what_changes_the_rows_misses(tmp_path, tiny_dir, cache_dir):
    path = rows_of(tmp_path)
    original = setup(tiny_dir, path).datasets["train"]
    setup(tiny_dir, path, max_length=44, overlong="truncate")  # another setting
    setup(tiny_dir, path, prompt_template="Q: {prompt}")  # another conversion
    setup(tiny_dir, path, max_samples=5, seed=1)  # another sample
    jinja = tmp_path / "turns.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    setup(tiny_dir, path, chat_template=str(jinja))
    jinja.write_text("{% for m in messages %}{{ m['role'] }} says {{ m['content'] }}\n{% endfor %}")
    edited = setup(tiny_dir, path, chat_template=str(jinja)).datasets["train"]  # the same file, edited
    assert len(entries(cache_dir)) == 6
    uncached = setup(tiny_dir, path, chat_template=str(jinja), cache=False).datasets["train"]
    assert len(edited) == 12 and edited == uncached
    stat = path.stat()
    path.write_text(path.read_text().replace("It is 0.", "Zero."))  # the data changed
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = setup(tiny_dir, path).datasets["train"]
    assert len(entries(cache_dir)) == 7
    assert changed[0]["input_ids"] != original[0]["input_ids"] and changed[1:] == original[1:]


def test_another_tokenizer_misses(tmp_path, tiny_dir, cache_dir):
    import shutil

    path = rows_of(tmp_path)
    setup(tiny_dir, path)
    copy = shutil.copytree(tiny_dir, tmp_path / "same-tokenizer")
    setup(copy, path)  # the same tokenizer elsewhere: a hit
    assert len(entries(cache_dir)) == 1
    template = copy / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))  # another chat template
    setup(copy, path)
    assert len(entries(cache_dir)) == 2


def test_damaged_entry_is_rebuilt_and_cache_false_writes_nothing(tmp_path, tiny_dir, cache_dir):
    path = rows_of(tmp_path)
    first = setup(tiny_dir, path)
    [entry] = entries(cache_dir)
    entry.write_bytes(b"not a torch file")
    again = setup(tiny_dir, path)
    assert again.datasets["train"] == first.datasets["train"]
    assert entry.stat().st_size > 100  # rewritten
    other = tmp_path / "other"
    other.mkdir()
    setup(tiny_dir, rows_of(other), cache=False)
    assert entries(cache_dir) == [entry]


def test_a_data_module_of_your_own_is_keyed_by_its_code(tmp_path, tiny_dir, cache_dir):
    import importlib.util
    import sys

    path = rows_of(tmp_path)
    module_file = tmp_path / "my_data.py"

    def load(response_suffix):
        module_file.write_text(
            "from dft_lightning.data.module import ChatDataModule\n"
            "class MyData(ChatDataModule):\n"
            "    def row_to_messages(self, row):\n"
            "        return [{'role': 'user', 'content': row['prompt']},\n"
            f"                {{'role': 'assistant', 'content': row.get('response', '') + {response_suffix!r}}}]\n"
        )
        spec = importlib.util.spec_from_file_location("my_data", module_file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["my_data"] = mod
        spec.loader.exec_module(mod)
        dm = mod.MyData(train=str(path), tokenizer=str(tiny_dir), batch_size=2)
        dm.setup("fit")
        return dm.datasets["train"]

    try:
        first, second = load(""), load(" Done.")
    finally:
        sys.modules.pop("my_data", None)
    assert len(entries(cache_dir)) == 2 and first[0]["input_ids"] != second[0]["input_ids"]


class SlowData(ChatDataModule):
    """Tokenises slowly and records whether it did."""

    tokenised = False

    def row_to_messages(self, row):
        time.sleep(0.05)
        return super().row_to_messages(row)

    def tokenise(self, *args, **kwargs):
        self.tokenised = True
        return super().tokenise(*args, **kwargs)


def _build_in_child(cache_root, train, tokenizer, queue):
    os.environ["DFT_LIGHTNING_CACHE"] = cache_root
    dm = SlowData(train=train, tokenizer=tokenizer, batch_size=2)
    dm.setup("fit")
    queue.put((dm.tokenised, [r["input_ids"] for r in dm.datasets["train"]]))


def test_concurrent_processes_tokenise_once(tmp_path, tiny_dir, cache_dir):
    """As ranks starting together: one tokenises, the other waits for the lock and reads its entry."""
    path = rows_of(tmp_path)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_build_in_child, args=(str(cache_dir.parent), str(path), str(tiny_dir), queue))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sorted(tokenised for tokenised, _ in results) == [False, True]
    assert results[0][1] == results[1][1] and len(results[0][1]) == 12
    assert len(entries(cache_dir)) == 1


def test_an_unwritable_cache_warns_and_the_run_goes_on(tmp_path, tiny_dir, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("DFT_LIGHTNING_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match=r"data.train: tokenised rows not cached .*data.cache=false"):
        dm = setup(tiny_dir, rows_of(tmp_path))
    assert len(dm.datasets["train"]) == 12
