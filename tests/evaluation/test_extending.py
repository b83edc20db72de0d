"""A benchmark of the user's own, in a file outside the package, chosen by ``class_path`` / ``init_args``: through
``evaluate_model``, the ``evaluate`` command (in-process) and a training run's ``EvaluationCallback`` (whose
evaluation child gets the benchmark list as JSON); and the one-line errors of a wrong class or argument."""

from __future__ import annotations

import json
import sys

import pytest

from dft_lightning.errors import UserError
from dft_lightning.evaluation.callback import EvaluationCallback
from dft_lightning.evaluation.engine_base import unpack_request
from dft_lightning.evaluation.engines import Completion, Engine
from dft_lightning.evaluation.run import BenchmarkSpec, Sampling, evaluate_model
from dft_lightning.evaluation.run import main as evaluate_main
from tests.conftest import REPO, read_metrics, run_cli, write_rows
from tests.evaluation.test_math_benchmarks import GSM8K_ROWS

USER_MODULE = '''
from dft_lightning.evaluation.benchmarks import Benchmark
from dft_lightning.rows import read_rows


class Capitals(Benchmark):
    """Name the capital of a country; right when the reply holds it."""

    name = "capitals"
    group_keys = ("continent",)

    def __init__(self, source: str, instruction: str = "Answer with one word."):
        self.source, self.instruction = source, instruction

    def load_problems(self):
        return [{"id": row_id, **row} for row_id, row in read_rows(self.source, key=self.name)]

    def prompt(self, problem):
        return [{"role": "user", "content": f"What is the capital of {problem['country']}? {self.instruction}"}]

    def grade(self, problem, completion):
        return problem["capital"].lower() in completion.lower()


class NotABenchmark:
    pass
'''
ROWS = [
    {"country": "France", "capital": "Paris", "continent": "Europe"},
    {"country": "Kenya", "capital": "Nairobi", "continent": "Africa"},
    {"country": "Peru", "capital": "Lima", "continent": "America"},
    {"country": "Spain", "capital": "Madrid", "continent": "Europe"},
]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``my_benchmarks.py`` in a folder of its own, on ``sys.path`` here and on ``PYTHONPATH`` for children."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "my_benchmarks.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    yield folder
    sys.modules.pop("my_benchmarks", None)


@pytest.fixture
def rows_file(tmp_path):
    return write_rows(tmp_path / "capitals.jsonl", ROWS)


class Replies(Engine):
    """Answers every chat prompt with the text of the first key found in it."""

    def __init__(self, replies):
        self.replies, self.prompts = replies, []

    def generate_many(self, requests):
        out = []
        for request in requests:
            prompts, params, _ = unpack_request(request)
            self.prompts.extend(prompts)
            out.append([[Completion(next(v for k, v in self.replies.items() if k in self._text(p)), (), "stop")]
                        * params.n for p in prompts])
        return out

    @staticmethod
    def _text(prompt):
        return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def test_a_users_benchmark_is_scored_and_broken_down(tmp_path, user_module, rows_file):
    replies = {"France": "Paris.", "Kenya": "Mombasa", "Peru": "It is Lima", "Spain": "madrid"}
    engine = Replies(replies)
    spec = {"class_path": "my_benchmarks.Capitals", "init_args": {"source": str(rows_file), "instruction": "Be brief."}}
    metrics = evaluate_model("unused", [spec], engine, Sampling(n=2), output_dir=str(tmp_path / "out"))
    assert metrics["eval/capitals/avg@2"] == 0.75 and metrics["eval/capitals/pass@2"] == 0.75
    assert all(p[0]["content"].endswith("? Be brief.") for p in engine.prompts)  # init_args reached the class
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["breakdown"]["capitals"]["continent=Europe"]["avg@2"] == 1.0
    assert summary["breakdown"]["capitals"]["continent=Africa"]["avg@2"] == 0.0
    assert summary["benchmarks"][0]["class_path"] == "my_benchmarks.Capitals"
    rows = [json.loads(line) for line in (tmp_path / "out" / "capitals.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["capitals.jsonl:1", "capitals.jsonl:2", "capitals.jsonl:3", "capitals.jsonl:4"]
    named = evaluate_model("unused", [{**spec, "name": "capitals_2", "limit": 2}], Replies(replies), Sampling(n=1))
    assert named == {"eval/capitals_2/avg@1": 0.5, "eval/capitals_2/pass@1": 0.5, "eval/capitals_2/timeouts": 0.0,
                     "eval/mean/avg": 0.5}  # limit without a limit argument: the first problems


def test_the_evaluate_command_takes_class_path_and_init_args(tmp_path, user_module, rows_file, tiny_dir, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(f"""
benchmarks:
  - class_path: my_benchmarks.Capitals
    init_args: {{source: {rows_file}, instruction: "One word."}}
  - {{name: gsm8k_local, kind: gsm8k, source: {write_rows(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)}, limit: 2}}
engine: {{kind: hf, batch_size: 8}}
sampling: {{n: 1, temperature: 0.0, max_tokens: 4}}
""")
    out = tmp_path / "out"
    evaluate_main(["--config", str(config), "--model", str(tiny_dir), f"--output_dir={out}"])
    assert "capitals" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["capitals"]["problems"] == 4 and summary["totals"]["gsm8k_local"]["problems"] == 2
    assert summary["benchmarks"][0]["init_args"] == {"source": str(rows_file), "instruction": "One word."}
    rows = [json.loads(line) for line in (out / "capitals.jsonl").read_text().splitlines()]
    # the user's grade decided every mark (the tiny random model's replies)
    assert [r["correct"] for r in rows] == [[ROWS[i]["capital"].lower() in r["completions"][0].lower()]
                                            for i, r in enumerate(rows)]
    for bad, message in [
        ("[{class_path: my_benchmarks.Capitals, init_args: {sourse: x.jsonl}}]",
         "benchmark 'my_benchmarks.Capitals': Capitals has no argument 'sourse'; it takes: source, instruction"),
        ("[{class_path: my_benchmarks.NotABenchmark}]", "is not a subclass of dft_lightning.evaluation.benchmarks"),
        ("[{class_path: no_such_module.Bench}]", "cannot import 'no_such_module.Bench'"),
        ("[{name: nope}]", "unknown benchmark 'nope'; give a class path (module.Class) or one of: math500"),
        ("[{kind: math500, class_path: math500}]", "give class_path or kind, not both"),
        ("[{class_path: humaneval, source: a.jsonl, init_args: {source: b.jsonl}}]", "source is set twice"),
        ("[{name: a, kind: humaneval}, {name: a, kind: humaneval_plus}]", "benchmark name(s) 'a' used twice"),
        ("[{name: humaneval, prompt_style: chatty}]", "Got value: chatty"),
    ]:
        with pytest.raises(SystemExit) as exit_code:
            evaluate_main(["--model", str(tiny_dir), "--benchmarks", bad, f"--output_dir={tmp_path / 'bad'}"])
        captured = capsys.readouterr()
        assert exit_code.value.code == 2 and message in captured.out + captured.err, (bad, captured)


def test_the_callback_checks_benchmarks_before_training(user_module, rows_file):
    good = {"class_path": "my_benchmarks.Capitals", "init_args": {"source": str(rows_file)}}
    assert EvaluationCallback([good, BenchmarkSpec("demo", "math500", "data:val")]).benchmarks[0].class_path
    with pytest.raises(UserError, match="Capitals has no argument 'sourse'"):
        EvaluationCallback([{"class_path": "my_benchmarks.Capitals", "init_args": {"sourse": "x"}}])
    with pytest.raises(UserError, match="missing a required argument: 'source'"):
        EvaluationCallback([{"class_path": "my_benchmarks.Capitals"}])
    with pytest.raises(UserError, match="init_args must be plain values"):
        EvaluationCallback([{"class_path": "my_benchmarks.Capitals", "init_args": {"source": rows_file}}])


def test_a_training_run_evaluates_the_users_benchmark_in_its_child(tmp_path, user_module, rows_file):
    (tmp_path / "eval.yaml").write_text(f"""
trainer:
  callbacks:
    - class_path: dft_lightning.evaluation.callback.EvaluationCallback
      init_args:
        benchmarks:
          - class_path: my_benchmarks.Capitals
            init_args: {{source: {rows_file}, instruction: "One word."}}
            n: 2
        engine: {{kind: hf, batch_size: 8}}
        sampling: {{n: 1, temperature: 1.0, max_tokens: 4}}
""")
    result = run_cli(["fit", "--config", str(REPO / "conf" / "tiny.yaml"), "--config", str(tmp_path / "eval.yaml"),
                      f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
                      "--trainer.limit_val_batches=0", f"--data.init_args.data_dir={tmp_path / 'data'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [step] = list(tmp_path.rglob("eval/step-1"))
    sent = json.loads((step / "evaluate.json").read_text())
    assert sent["benchmarks"] == [{"class_path": "my_benchmarks.Capitals", "n": 2,
                                   "init_args": {"source": str(rows_file), "instruction": "One word."}}]
    assert sent["model_name"] == "tiny:qwen2"  # what prompt_style auto judges, not the exported folder
    summary = json.loads((step / "summary.json").read_text())
    assert summary["totals"]["capitals"]["problems"] == 4 and summary["totals"]["capitals"]["k"] == 2
    assert set(summary["breakdown"]["capitals"]) == {"continent=Europe", "continent=Africa", "continent=America"}
    [logged] = [r for r in read_metrics(tmp_path) if r.get("eval/capitals/avg@2")]
    assert int(logged["step"]) == 1
    assert float(logged["eval/capitals/avg@2"]) == summary["metrics"]["eval/capitals/avg@2"]
