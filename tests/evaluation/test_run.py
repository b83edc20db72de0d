"""Evaluation runner, the ``evaluate`` command and the training callback, end to end on real graders."""

from __future__ import annotations

import json

import pytest

from dft_lightning.data.synthetic import generate, write_jsonl
from dft_lightning.evaluation.benchmarks.code import load_humaneval
from dft_lightning.evaluation.engine_base import unpack_request
from dft_lightning.evaluation.engines import Completion, Engine, HFEngine
from dft_lightning.evaluation.run import BenchmarkSpec, EngineSpec, Sampling, evaluate_model
from tests.conftest import REPO, read_metrics, run_cli


class AnswerKey(Engine):
    """An engine that answers every prompt from the answer key (a key found in its text; image chats: their
    text part): the scoring path must then give 1.0."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def generate_many(self, requests):
        out = []
        for request in requests:
            prompts, params, _ = unpack_request(request)
            per_prompt = []
            for prompt in prompts:
                text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
                if isinstance(text, list):  # an image + text chat
                    text = next(part["text"] for part in text if part["type"] == "text")
                answer = next(a for key, a in self.answers.items() if key in text)
                per_prompt.append([Completion(answer, (), "stop")] * params.n)
            out.append(per_prompt)
        return out


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    return write_jsonl(generate("test", 6, seed=3), tmp_path_factory.mktemp("bench") / "test.jsonl")


def test_a_perfect_engine_scores_one_and_everything_is_written(tmp_path, demo_file):
    rows = [json.loads(line) for line in demo_file.read_text().splitlines()]
    humaneval = load_humaneval(limit=3)
    answers = {r["problem"]: f"So the answer is \\boxed{{{r['answer']}}}." for r in rows}
    answers.update({p["prompt"]: p["canonical_solution"] for p in humaneval})
    specs = [BenchmarkSpec(name="demo", kind="math500", source=str(demo_file)), BenchmarkSpec("humaneval", limit=3)]
    metrics = evaluate_model("unused", specs, AnswerKey(answers), Sampling(n=2), output_dir=str(tmp_path), step=7)
    assert metrics["eval/demo/avg@2"] == metrics["eval/humaneval/avg@2"] == metrics["eval/mean/avg"] == 1.0
    assert metrics["eval/demo/pass@2"] == 1.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 7 and summary["metrics"] == metrics
    lines = (tmp_path / "demo.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["correct"] == [True, True]


def test_shards_add_up_to_the_unsharded_metrics(tmp_path, demo_file):
    from dft_lightning.evaluation.run import combine_totals, metrics_from_totals

    rows = [json.loads(line) for line in demo_file.read_text().splitlines()]
    # right on every other problem, so shards see different accuracies
    answers = {r["problem"]: f"\\boxed{{{int(r['answer']) + i % 2}}}" for i, r in enumerate(rows)}
    specs = [BenchmarkSpec("demo", "math500", str(demo_file))]
    whole = evaluate_model("unused", specs, AnswerKey(answers), Sampling(n=2), output_dir=None)
    parts = []
    for index in range(4):  # 6 problems over 4 shards: uneven shares
        out = tmp_path / f"shard-{index}"
        evaluate_model("unused", specs, AnswerKey(answers), Sampling(n=2), output_dir=str(out), shard=(index, 4))
        parts.append(json.loads((out / "summary.json").read_text())["totals"])
    assert whole["eval/demo/avg@2"] == 0.5
    assert metrics_from_totals(combine_totals(parts)) == whole


def test_sampled_shards_repeat_the_unsharded_generations(tmp_path, demo_file, tiny_dir):
    """Temperature 1: two shards with another batch size give every problem the completions of one run."""
    specs = [BenchmarkSpec("demo", "math500", str(demo_file), limit=5)]
    sampling = Sampling(n=2, temperature=1.0, max_tokens=6, seed=3)

    def completions(folder):
        rows = [json.loads(line) for line in (folder / "demo.jsonl").read_text().splitlines()]
        return {r["id"]: r["completions"] for r in rows}

    evaluate_model("tiny", specs, HFEngine(tiny_dir, batch_size=4, device="cpu"), sampling,
                   output_dir=str(tmp_path / "whole"))
    whole = completions(tmp_path / "whole")
    sharded, engine = {}, HFEngine(tiny_dir, batch_size=3, device="cpu")
    for index in range(2):
        out = tmp_path / f"shard-{index}"
        evaluate_model("tiny", specs, engine, sampling, output_dir=str(out), shard=(index, 2))
        sharded.update(completions(out))
    assert len(whole) == 5 and sharded == whole
    assert len({text for texts in whole.values() for text in texts}) > 5, "sampled completions should differ"


def test_wrong_answers_score_zero(demo_file):
    rows = [json.loads(line) for line in demo_file.read_text().splitlines()]
    answers = {r["problem"]: f"\\boxed{{{int(r['answer']) + 1}}}" for r in rows}
    metrics = evaluate_model("unused", [BenchmarkSpec("demo", "math500", str(demo_file))], AnswerKey(answers),
                             Sampling(n=1))
    assert metrics["eval/demo/avg@1"] == 0.0


def test_real_engine_and_unknown_kind(tmp_path, demo_file, tiny_dir):
    specs = [BenchmarkSpec("demo", "math500", str(demo_file), limit=2)]
    metrics = evaluate_model(str(tiny_dir), specs, EngineSpec(kind="hf", batch_size=4),
                             Sampling(n=2, temperature=0.0, max_tokens=8), output_dir=str(tmp_path))
    assert 0.0 <= metrics["eval/demo/avg@2"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "demo.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["completions"]) == 2 for r in rows)
    assert rows[0]["completions"][0] == rows[0]["completions"][1]  # greedy


def test_evaluate_command_prints_a_table_and_rejects_bad_input(tmp_path, demo_file):
    config = REPO / "conf" / "eval" / "tiny.yaml"
    result = run_cli(["evaluate", "--config", str(config), f"--output_dir={tmp_path}"], cwd=tmp_path,
                     env={"DFT_DEMO_TEST": str(demo_file)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo_math" in result.stdout and "humaneval" in result.stdout and (tmp_path / "summary.json").is_file()
    bad = run_cli(["evaluate", "--model=tiny:qwen2", "--benchmarks=[{name: nope}]"], cwd=tmp_path)
    assert bad.returncode == 2 and "unknown benchmark 'nope'" in bad.stdout + bad.stderr


def test_callback_logs_accuracy_before_and_after_training(tmp_path):
    (tmp_path / "eval.yaml").write_text("""
trainer:
  callbacks:
    - class_path: dft_lightning.evaluation.callback.EvaluationCallback
      init_args:
        benchmarks: [{name: held_out, kind: math500, source: "data:val", limit: 2}]
        before_training: true
        every_n_steps: 2
        engine: {kind: hf, batch_size: 4}
        sampling: {n: 1, temperature: 0.0, max_tokens: 8}
""")
    result = run_cli(["fit", "--config", str(REPO / "conf" / "tiny.yaml"), "--config", str(tmp_path / "eval.yaml"),
                      f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
                      f"--data.init_args.data_dir={tmp_path / 'data'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(tmp_path)
    steps = [int(r["step"]) for r in rows if r.get("eval/held_out/avg@1")]
    assert steps == [0, 2]  # before training, at step 2 (the end evaluation is not repeated)
    assert [(int(r["step"]), float(r["eval/failed"])) for r in rows if r.get("eval/failed")] == [(0, 0.0), (2, 0.0)]
    assert sorted(p.name for p in tmp_path.rglob("eval/step-*")) == ["step-0", "step-2"]
    assert not list(tmp_path.rglob("eval/step-0/model"))  # weights removed, results kept
    assert list(tmp_path.rglob("eval/step-2/held_out.jsonl"))


def test_multipl_e_through_the_runner_reports_missing_toolchains(tmp_path):
    from dft_lightning.evaluation.runners import check_available
    from tests.evaluation.test_multipl_e import COMPLETIONS, ROWS, _problem, _write_jsonl

    languages = ["py", "sh", "php"]
    rows = [_problem(lang) for lang in languages]
    path = _write_jsonl(tmp_path / "multipl_e.jsonl", rows)
    answers = {ROWS[lang]["prompt"]: COMPLETIONS[lang][0] for lang in languages}
    spec = BenchmarkSpec("multipl_e", source=str(path), languages=languages)
    metrics = evaluate_model("unused", [spec], AnswerKey(answers), Sampling(n=1), output_dir=str(tmp_path / "out"))
    missing = []
    for lang in languages:
        try:
            check_available(lang, ROWS[lang]["prompt"])
        except Exception:  # noqa: BLE001 - a RunnerUnavailable names the missing tool
            missing.append(lang)
    assert metrics["eval/multipl_e/avg@1"] == 1.0
    assert metrics.get("eval/multipl_e/skipped_problems", 0.0) == len(missing)
    totals = json.loads((tmp_path / "out" / "summary.json").read_text())["totals"]["multipl_e"]
    assert totals["problems"] == len(languages) - len(missing)


def test_plain_template_sends_raw_text(demo_file):
    seen = []

    class Recorder(AnswerKey):
        def generate_many(self, requests):
            seen.extend(requests)
            return super().generate_many(requests)

    rows = [json.loads(line) for line in demo_file.read_text().splitlines()]
    answers = {r["problem"]: f"{r['answer']}" for r in rows}
    spec = BenchmarkSpec("demo", "math500", str(demo_file), template="plain")
    metrics = evaluate_model("unused", [spec], Recorder(answers), Sampling(n=1))
    prompts, params, indices = seen[0]
    assert indices == list(range(len(prompts)))
    assert all(isinstance(p, str) and p.startswith("Question: ") for p in prompts)
    assert params.stop == ("\nQuestion:",)
    assert metrics["eval/demo/avg@1"] == 1.0  # last-number fall-back grades a bare answer
