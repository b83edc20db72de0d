"""tools/compare.py: intervals, pooled seeds, paired counts and costs, against a direct computation."""

from __future__ import annotations

import json
import math

import compare
import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

T, F = True, False
# math: 6 problems x 4 samples; amc: 3 problems x 4 samples
A_SEED0 = {"math": [[T, T, F, F], [F, F, F, F], [T, T, T, T], [T, F, F, F], [F, F, F, F], [T, T, T, F]],
           "amc": [[F, F, F, F], [T, F, F, F], [T, T, F, F]]}
A_SEED1 = {"math": [[T, F, F, F], [F, F, F, T], [T, T, T, T], [F, F, F, F], [F, F, F, F], [T, T, F, F]],
           "amc": [[F, F, F, T], [F, F, F, F], [T, T, T, F]]}
B = {"math": [[T, T, T, F], [T, F, F, F], [T, T, T, T], [F, F, F, F], [T, T, F, F], [T, T, T, T]],
     "amc": [[F, F, F, F], [F, F, F, F], [T, T, T, T]]}


def write_eval(folder, grades, shards: int = 1):
    """An evaluation folder as ``evaluate`` writes it (``shards > 1``: the callback's ``rank-*`` parts)."""
    for bench, rows in grades.items():
        for rank in range(shards):
            part = folder / f"rank-{rank}" if shards > 1 else folder
            part.mkdir(parents=True, exist_ok=True)
            with (part / f"{bench}.jsonl").open("w") as f:
                for i in range(rank, len(rows), shards):
                    f.write(json.dumps({"id": f"{bench}/{i}", "answer": "1", "completions": ["x"] * len(rows[i]),
                                        "correct": rows[i], "finish_reasons": ["stop"] * len(rows[i])}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"metrics": {}}))
    return folder


def training_run(root, tokens, rates):
    """A CSVLogger training log with its evaluation folder beneath it, as the training callback lays them out."""
    logger = CSVLogger(root, name="csv")
    for step, (n, rate) in enumerate(zip(tokens, rates, strict=True)):
        logger.log_metrics({"train/supervised_tokens": n, "train/tokens_per_s": rate,
                            "train/tokens_seen": sum(tokens[: step + 1])}, step=step)
    logger.log_hyperparams({"objective": "DFT(min_weight=0.0)"})
    logger.save()
    return root / "csv" / "version_0" / "eval" / "step-3"


def bootstrap(values, resamples, seed, confidence=0.95):
    """The interval, computed directly: B resamples of n problems each, the mean of each, two percentiles."""
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = sorted(sum(values[j] for j in row) / len(row) for row in draws)
    return tuple(np.percentile(means, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2]))


def shares(*runs):
    """Per-problem share of correct samples over the given seeds' samples, pooled."""
    return [sum(sum(run[i]) for run in runs) / sum(len(run[i]) for run in runs) for i in range(len(runs[0]))]


def test_intervals_pooled_seeds_paired_counts_and_cost_equal_a_direct_computation(tmp_path):
    a0 = write_eval(training_run(tmp_path / "a0", [100, 120, 80], [10.0, 20.0, 40.0]), A_SEED0)
    a1 = write_eval(training_run(tmp_path / "a1", [100, 100, 100], [50.0, 50.0, 50.0]), A_SEED1)
    b = write_eval(tmp_path / "b", B, shards=2)
    out = tmp_path / "out"
    result = compare.main([f"A={a0}", f"A={a1}", f"B={b}", "--bootstrap", "2000", "--seed", "7", "--out", str(out)])
    assert result["benchmarks"] == ["amc", "math"]
    for label, runs in (("A", (A_SEED0, A_SEED1)), ("B", (B,))):
        for bench in ("math", "amc"):
            values = shares(*(r[bench] for r in runs))
            entry = result["scores"][label][bench]
            assert entry["avg"] == pytest.approx(sum(values) / len(values))
            assert entry["interval"] == pytest.approx(bootstrap(values, 2000, 7))
            assert entry["samples_per_problem"] == [4 * len(runs)]
        math_means, amc_means = (
            np.random.default_rng(7).integers(0, n, size=(2000, n)) for n in (6, 3))  # the same draws per benchmark
        macro = (np.array(shares(*(r["math"] for r in runs)))[math_means].mean(1)
                 + np.array(shares(*(r["amc"] for r in runs)))[amc_means].mean(1)) / 2
        assert result["scores"][label]["mean"]["interval"] == pytest.approx(tuple(np.percentile(macro, [2.5, 97.5])))

    by_bench = {p["benchmark"]: p for p in result["paired"]}
    # math: A pooled = [3/8, 1/8, 1, 1/8, 0, 5/8], B = [3/4, 1/4, 1, 0, 1/2, 1]: fixed 4, broken 1, tied 1
    assert (by_bench["math"]["fixed"], by_bench["math"]["broken"], by_bench["math"]["ties"]) == (4, 1, 1)
    assert by_bench["math"]["p_value"] == pytest.approx(2 * (1 + 5) / 2**5)  # P(X <= 1), X ~ Bin(5, 1/2), two-sided
    # amc: A pooled = [1/8, 1/8, 5/8], B = [0, 0, 1]: fixed 1, broken 2
    assert (by_bench["amc"]["fixed"], by_bench["amc"]["broken"], by_bench["amc"]["ties"]) == (1, 2, 0)
    assert by_bench["amc"]["p_value"] == 1.0
    diff = [x - y for x, y in zip(shares(B["math"]), shares(A_SEED0["math"], A_SEED1["math"]), strict=True)]
    assert by_bench["math"]["difference"] == pytest.approx(sum(diff) / 6)
    assert by_bench["math"]["interval"] == pytest.approx(bootstrap(diff, 2000, 7))

    cost = {r["label"]: r["cost"] for r in result["runs"]}
    assert cost["B"] is None  # no training log above b
    assert cost["A"]["steps"] == 3 and cost["A"]["supervised_tokens"] == pytest.approx((300 + 300) / 2)
    assert cost["A"]["train_seconds"] == pytest.approx(((10 + 6 + 2) + 6) / 2)
    assert cost["A"]["objective"] == "DFT(min_weight=0.0)"

    text = (out / "compare.md").read_text()
    assert "| B vs A | math | 6 | 4 | 1 | 1 |" in text
    lo, hi = result["scores"]["B"]["math"]["interval"]
    assert f"{100 * result['scores']['B']['math']['avg']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]" in text
    assert json.loads((out / "compare.json").read_text())["paired"] == json.loads(json.dumps(result["paired"]))
    image = np.asarray(Image.open(out / "compare.png").convert("RGB")).astype(int)
    assert image.std() > 10 and (np.abs(image - (255, 127, 14)).sum(-1) < 30).sum() > 200


def test_sign_test_and_bad_folders(tmp_path, capsys):
    from instruments_common import run_main

    assert compare.sign_test(0, 0) == 1.0
    assert compare.sign_test(10, 0) == pytest.approx(2 / 2**10)
    assert compare.sign_test(3, 7) == pytest.approx(2 * sum(math.comb(10, i) for i in range(4)) / 2**10)
    with pytest.raises(SystemExit):
        run_main(compare.main, [f"A={tmp_path / 'none'}", "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip().endswith("none: no such evaluation folder")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "math.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(SystemExit):
        run_main(compare.main, [f"A={tmp_path / 'bad'}", "--out", str(tmp_path / "o")])
    assert "math.jsonl:1: not a generation row with 'correct' grades" in capsys.readouterr().err
