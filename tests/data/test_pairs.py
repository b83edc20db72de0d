"""PairDataModule: the builder's pair rows as chosen/rejected records that share a micro-batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dft_lightning.batch import IGNORE_INDEX
from dft_lightning.data.math import MathDataModule
from dft_lightning.data.pairs import PairDataModule, PairStepCollator
from dft_lightning.errors import DataError


def pair_rows(n: int) -> list[dict]:
    """Pair rows in the schema of ``tools/build_offline_rl.py --pairs`` (``OUT/pairs/part-*.jsonl``)."""
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i // 7 + 2
        rows.append({
            "prompt": f"What is ${a} + {b}$?", "chosen": f"We add: {a} + {b} = {a + b}. So $\\boxed{{{a + b}}}$.",
            "rejected": f"We add: {a} + {b} = {a + b + 1}" + " and so on" * (i % 3) + f". So $\\boxed{{{a + b + 1}}}$.",
            "answer": str(a + b), "question_id": f"train.jsonl:{i}", "index": i, "chosen_sample": 0,
            "rejected_sample": 1, "source": "synthetic_math", "level": None,
        })
    return rows


def write_pairs(path: Path, rows: list[dict], extra_lines: tuple[str, ...] = ()) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return str(path)


def make(train: str, **kwargs) -> PairDataModule:
    data = PairDataModule(train=train, tokenizer="tiny:qwen2", cache=False, **kwargs)
    data.setup("fit")
    return data


def test_the_chosen_record_is_the_training_row_of_the_same_response(tmp_path):
    """Same user turn (boxed instruction, system prompt) as MathDataModule's rejection rows: equal tokens."""
    rows = pair_rows(4)
    pairs = write_pairs(tmp_path / "out" / "pairs" / "part-00000-of-00001.jsonl", rows)
    train = write_pairs(tmp_path / "out" / "train" / "part-00000-of-00001.jsonl", [
        {"problem": r["prompt"], "response": r["chosen"], "verified": True} for r in rows])
    for system in (None, "You are a helpful assistant."):
        kw = {"prompt_style": "boxed", "system_prompt": system, "batch_size": 2}
        sft = MathDataModule(train=train, source_format="rejection", tokenizer="tiny:qwen2", cache=False, **kw)
        sft.setup("fit")
        dpo = make(str(Path(pairs).parent), **kw)
        records = dpo.datasets["train"]
        assert len(records) == 8
        for k, row in enumerate(sft.datasets["train"]):
            chosen, rejected = records[2 * k], records[2 * k + 1]
            assert (chosen["input_ids"], chosen["labels"]) == (row["input_ids"], row["labels"])
            assert chosen["row_id"].endswith(":chosen") and rejected["row_id"].endswith(":rejected")
            first = next(i for i, t in enumerate(rejected["labels"]) if t != IGNORE_INDEX)
            assert rejected["input_ids"][:first] == chosen["input_ids"][:first]  # the same prompt
            assert rejected["input_ids"] != chosen["input_ids"]
    assert "Please reason step by step" in dpo.tokenizer.decode(records[0]["input_ids"])


def test_bad_pairs_are_counted_drops_and_strict_names_the_row(tmp_path):
    good = pair_rows(3)
    bad = [
        {"prompt": "What is 1 + 1?", "chosen": "2"},                                   # no rejected
        {"prompt": "What is 1 + 1?", "rejected": "3"},                                 # no chosen
        {"prompt": "What is 1 + 1?", "chosen": "It is 2.", "rejected": "It is 2."},    # identical
        {"prompt": "What is 1 + 1?", "chosen": "It is 2.", "rejected": " "},           # empty
        {"prompt": "What is 1 + 1?", "chosen": "It is 2.", "rejected": "no " * 400},   # over-long
        {"prompt": "What is 1 + 1?", "chosen": ["not", "turns"], "rejected": "3"},     # bad type
    ]
    path = write_pairs(tmp_path / "pairs.jsonl", good + bad, extra_lines=("{not json",))
    data = make(path, batch_size=2, max_length=200)
    report = data.reports["train"]
    assert (report.read, report.kept) == (10, 3) and len(data.datasets["train"]) == 6
    assert dict(report.dropped) == {"missing_field": 2, "identical_pair": 1, "empty_response": 1, "overlong": 1,
                                    "bad_type": 1, "malformed_json": 1}
    assert report.examples["identical_pair"] == [f"{path}:6"] or report.examples["identical_pair"][0].endswith(":6")
    assert len(report.response_lengths) == 6  # both records of each kept pair
    with pytest.raises(DataError, match=r"dropped: missing_field .*data.strict"):
        make(path, batch_size=2, max_length=200, strict=True)
    # truncation that leaves both records the same is a drop too
    same_start = write_pairs(tmp_path / "same.jsonl", [
        *good, {"prompt": "Hi", "chosen": "a b c d e f g h " * 30 + "yes", "rejected": "a b c d e f g h " * 30 + "no"}])
    cut = make(same_start, batch_size=2, max_length=60, overlong="truncate")
    assert cut.reports["train"].dropped["identical_pair"] == 1


def test_packing_is_refused_and_batch_size_counts_pairs(tmp_path):
    with pytest.raises(DataError, match="packing is not supported"):
        PairDataModule(train="x.jsonl", packing=True)
    path = write_pairs(tmp_path / "pairs.jsonl", pair_rows(5))
    with pytest.raises(DataError, match=r"batch_size=6 pairs but only 5 training pairs"):
        make(path, batch_size=6)


def steps_of(data: PairDataModule, rank: int = 0, world: int = 1, epoch: int = 0) -> list:
    data._world = lambda: (rank, world)  # noqa: SLF001 - the loader of one rank of `world`
    loader = data._loader("train", shuffle=True, drop_last=True, global_batch=data.batch_size)
    loader.batch_sampler.set_epoch(epoch)
    return list(loader)


def test_a_pairs_two_records_share_a_micro_batch_under_shuffling_accumulation_and_ranks(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", pair_rows(24))
    data = make(path, batch_size=8, micro_batch_size=3)  # 8 pairs a step in micro-batches of 3, 3, 2 pairs
    epochs = [steps_of(data, epoch=e) for e in range(3)]
    orders = []
    for steps in epochs:
        seen = []
        for step in steps:
            assert [mb.num_pairs() for mb in step] == [3, 3, 2]
            for mb in step:
                assert mb.input_ids.shape[0] == 2 * mb.num_pairs()
                for c, r in mb.pairs.tolist():
                    chosen, rejected = mb.row_ids[c], mb.row_ids[r]
                    assert chosen.endswith(":chosen") and rejected == chosen.replace(":chosen", ":rejected")
                    assert bool(mb.target_mask[c].any()) and bool(mb.target_mask[r].any())
                    assert torch.equal(mb.sequence_ids[c][mb.attention_mask[c].bool()], torch.full_like(
                        mb.sequence_ids[c][mb.attention_mask[c].bool()], c))
                    seen.append(chosen)
        assert sorted(seen) == sorted(r["row_id"] for r in data.datasets["train"][0::2])  # each pair once
        orders.append(seen)
    assert orders[0] != orders[1]  # shuffled per epoch
    # two ranks: each gets whole pairs, together the one-process step
    for step, (r0, r1) in zip(steps_of(data), zip(steps_of(data, 0, 2), steps_of(data, 1, 2), strict=True),
                              strict=True):
        def ids(micro_batches):
            return sorted(mb.row_ids[c] for mb in micro_batches for c, _ in mb.pairs.tolist())
        assert sorted(ids(r0) + ids(r1)) == ids(step) and not set(ids(r0)) & set(ids(r1))


def test_evaluation_filler_pairs_are_masked_and_in_no_pair(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", pair_rows(5))
    data = make(path, batch_size=2, micro_batch_size=2, val=path)
    steps = list(data.val_dataloader())
    assert [mb.num_pairs() for step in steps for mb in step] == [2, 2, 1]
    last = steps[-1][0]
    assert last.input_ids.shape[0] == 4 and last.row_ids[2:] == [None, None]
    assert not bool(last.target_mask[2:].any())
    collated = PairStepCollator(1, 0)([({"input_ids": [1, 2], "labels": [-100, 2], "row_id": None},
                                        {"input_ids": [1, 3], "labels": [-100, 3], "row_id": None})])
    assert collated[0].pairs.shape == (0, 2)


def test_cached_records_are_read_back_as_pairs_and_val_fraction_holds_out_whole_pairs(tmp_path, monkeypatch):
    monkeypatch.setenv("DFT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    path = write_pairs(tmp_path / "pairs.jsonl", pair_rows(10))
    built = PairDataModule(train=path, tokenizer="tiny:qwen2", batch_size=2, val_fraction=0.3)
    built.setup("fit")
    again = PairDataModule(train=path, tokenizer="tiny:qwen2", batch_size=2, val_fraction=0.3)
    again.setup("fit")
    assert again.datasets == built.datasets
    assert list((tmp_path / "cache").rglob("*.pt"))
    train, val = built.datasets["train"], built.datasets["val"]
    assert (len(train), len(val)) == (14, 6)
    for records in (train, val):
        assert [r["row_id"].rsplit(":", 1) for r in records[1::2]] == [
            [r["row_id"].rsplit(":", 1)[0], "rejected"] for r in records[0::2]]
