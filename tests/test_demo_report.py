"""The demo's data splits and the pieces of its closing report (the whole report: tests/test_demo.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dft_lightning.data.demo import DemoMathDataModule
from dft_lightning.data.synthetic import generate
from dft_lightning.demo_report import DemoReport, low_share, paired_counts, read_grades


def test_splits_share_no_problem_and_keep_their_files(tmp_path):
    dm = DemoMathDataModule(num_train=40, num_heldout=20, num_dev=20, num_test=10, tokenizer="tiny:qwen2",
                            data_dir=str(tmp_path))
    dm.prepare_data()
    texts = {split: [json.loads(line)["problem"] for line in (tmp_path / f"{split}.jsonl").open()]
             for split in ("train", "dev", "heldout", "test")}
    assert {k: len(v) for k, v in texts.items()} == {"train": 40, "dev": 20, "heldout": 20, "test": 10}
    everything = [t for v in texts.values() for t in v]
    assert len(set(everything)) == len(everything)
    assert dm.val.endswith("heldout.jsonl") and dm.test.endswith("test.jsonl")
    # heldout and dev come from the training templates (two steps), test from the harder ones (three)
    assert all("doubled" not in t for t in texts["heldout"] + texts["dev"])
    assert all("doubled" in t for t in texts["test"])
    # the same files whether or not one was written before (heldout is drawn after dev, excluding it)
    (tmp_path / "heldout.jsonl").unlink()
    dm.prepare_data()
    assert [json.loads(line)["problem"] for line in (tmp_path / "heldout.jsonl").open()] == texts["heldout"]
    # without a heldout split the validation set is the harder one, as before
    plain = DemoMathDataModule(num_train=8, num_test=4, tokenizer="tiny:qwen2", data_dir=str(tmp_path / "p"))
    assert plain.val.endswith("test.jsonl")


def test_generate_excludes_and_rejects_unknown_splits():
    train = generate("train", 30, 0)
    dev = generate("dev", 30, 0, exclude=[r["problem"] for r in train])
    assert not {r["problem"] for r in train} & {r["problem"] for r in dev}
    assert generate("train", 5, 0) == train[:5]  # the training stream is unchanged by the new splits
    with pytest.raises(ValueError, match="split must be one of"):
        generate("validation", 3)


def test_paired_counts_against_a_direct_count(tmp_path):
    rng = np.random.default_rng(0)
    before = {f"p{i}": bool(rng.random() < 0.3) for i in range(50)}
    after = {f"p{i}": bool(rng.random() < 0.6) for i in range(50)}
    after["only-after"] = True  # not in both: not counted
    counts = paired_counts(before, after)
    common = [f"p{i}" for i in range(50)]
    assert counts == {
        "problems": 50, "before": sum(before[p] for p in common), "after": sum(after[p] for p in common),
        "fixed": sum(1 for p in common if after[p] and not before[p]),
        "broken": sum(1 for p in common if before[p] and not after[p]),
    }
    assert counts["after"] - counts["before"] == counts["fixed"] - counts["broken"]


def test_read_grades_takes_each_problems_first_sample(tmp_path):
    path = tmp_path / "heldout.jsonl"
    rows = [{"id": "a", "correct": [True, False]}, {"id": 7, "correct": [False]}, {"id": "c", "correct": []}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_grades(path) == {"a": True, "7": False, "c": False}


def test_the_reading_follows_the_numbers():
    base = {"objective": "DFT", "evaluation": {"heldout": {"before": 1, "after": 20}}}
    rose = DemoReport.reading({**base, "val_nll": {"before": 1.0, "after": 1.4}})
    assert any("NLL rose while accuracy rose" in line for line in rose)
    fell = DemoReport.reading({**base, "val_nll": {"before": 1.0, "after": 0.5}})
    assert not any("NLL rose" in line for line in fell) and not any("min_weight =" in line for line in fell)
    floored = DemoReport.reading({**base, "objective_args": {"min_weight": 0.2}})
    assert any("min_weight = 0.2" in line for line in floored)
    flat = DemoReport.reading({"objective": "SFT", "evaluation": {"heldout": {"before": 3, "after": 3}}})
    assert any("did not rise" in line for line in flat) and not any("DFT weights" in line for line in flat)
    assert low_share(np.array([0.001, 0.5, 0.009, 0.9])) == 0.5
    with pytest.raises(ValueError, match="rows must be at least 1"):
        DemoReport(rows=0)
