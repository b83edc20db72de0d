"""Code benchmarks for chat models: chat prompts, code taken from fenced replies and graded for real in the sandbox,
``prompt_style: auto`` deciding by the model, and the tiny model end to end. The engines here that answer in fenced
blocks stand in for a chat model; everything after the reply (extraction, fitting to the stub, grading) is real."""

from __future__ import annotations

import json
import shutil

import pytest

from dft_lightning.evaluation.benchmarks.base import ModelInfo
from dft_lightning.evaluation.benchmarks.code import HUMANEVAL_STOP, HumanEvalBenchmark, load_humaneval
from dft_lightning.evaluation.benchmarks.code_chat import LANGUAGES, code_blocks, code_for_grading, extract_code
from dft_lightning.evaluation.benchmarks.multipl_e import MultiPLEBenchmark
from dft_lightning.evaluation.engine_base import unpack_request
from dft_lightning.evaluation.engines import Completion, Engine, HFEngine
from dft_lightning.evaluation.model_kind import describe_model
from dft_lightning.evaluation.run import BenchmarkSpec, Sampling, evaluate_model
from dft_lightning.evaluation.run import main as evaluate_main
from dft_lightning.evaluation.runners import RunnerUnavailable, check_available
from tests.evaluation.test_multipl_e import ROWS, _problem

STUB = 'from typing import List\n\n\ndef add(x: int, y: int) -> int:\n    """Add x and y."""\n'
PROBLEM = {"prompt": STUB, "entry_point": "add"}


@pytest.mark.parametrize(("reply", "completion"), [
    ("```python\ndef add(x: int, y: int) -> int:\n    return x + y\n```",  # the signature repeated
     "\ndef add(x: int, y: int) -> int:\n    return x + y\n"),
    ("Sure! Here it is:\n```py\n    return x + y\n```\nThis adds.", "    return x + y\n"),  # only the body
    ("```\nreturn x + y\n```", "    return x + y\n"),  # the body, unindented, no language tag
    ("return x + y", "    return x + y\n"),  # no fence at all
    ("```python\ndef add(x, y):\n    return x + y", "\ndef add(x, y):\n    return x + y\n"),  # fence left open
    # several fences: the stub restated, the solution with a main guard, a usage example
    ("```python\ndef add(x: int, y: int) -> int:\n    ...\n```\nSolved:\n```python\nimport math\n\n"
     "def add(x, y):\n    return x + y\n\nif __name__ == \"__main__\":\n    print(add(1, 2))\n```\n"
     "Usage:\n```python\nprint(add(2, 3))\n```", "\nimport math\n\ndef add(x, y):\n    return x + y\n"),
])
def test_python_replies_become_completions_of_the_stub(reply, completion):
    assert code_for_grading(PROBLEM, reply) == completion


def test_brace_language_replies_keep_the_body_up_to_the_closing_brace():
    cpp = _problem("cpp")
    reply = ("```cpp\n#include <vector>\nlong add(long x, long y) {\n    if (x > 0) {\n        return x + y;\n    }\n\n"
             "    return y + x;\n}\nint main() { return add(1, 2); }\n```")
    body = "    if (x > 0) {\n        return x + y;\n    }\n    return y + x;\n}\n"  # blank lines dropped
    assert code_for_grading(cpp, reply, "cpp") == body
    allman = "```c++\nlong add(long x, long y)\n{\n    return x + y;\n}\n```"
    assert code_for_grading(cpp, allman, "cpp") == "    return x + y;\n}\n"
    assert code_for_grading(cpp, "```cpp\n    return x + y;\n}\n```", "cpp") == "    return x + y;\n}\n"
    perl = "```perl\nsub add {\n    my ($x, $y) = @_;\n\n    return $x + $y;\n}\n```"
    assert code_for_grading(_problem("pl"), perl, "pl") == "    my ($x, $y) = @_;\n    return $x + $y;\n}\n"
    assert code_blocks("a\n```js\nx\n```\nb\n```\ny\n```") == [("js", "x\n"), ("", "y\n")]
    assert extract_code("```text\nnotes\n```\n```cpp\ncode\n```", "add", "cpp") == "code\n"  # the tagged block


class FencedReplies(Engine):
    """Answers each chat prompt with the reply ``reply(problem)`` for the problem whose stub the prompt holds, and
    keeps the requests it got."""

    def __init__(self, problems, reply):
        self.problems, self.reply, self.requests = problems, reply, []

    def generate_many(self, requests):
        out = []
        for request in requests:
            prompts, params, _ = unpack_request(request)
            self.requests.append((prompts, params))
            replies = []
            for prompt in prompts:
                assert isinstance(prompt, list) and prompt[-1]["role"] == "user", "a chat prompt"
                problem = next(p for p in self.problems if p["prompt"].strip() in prompt[-1]["content"])
                replies.append([Completion(self.reply(problem), (), "stop")] * params.n)
            out.append(replies)
        return out


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval(limit=3)


def _whole(p):
    return f"Here is the function:\n```python\n{p['prompt']}{p['canonical_solution']}```\nIt passes the examples."


def _body(p):
    return f"```python\n{p['canonical_solution']}```"


def _restated_then_solved(p):
    return f"The stub:\n```python\n{p['prompt']}```\nSolved:\n{_whole(p)}\nUsage:\n```python\nprint(1)\n```"


def _wrong(p):
    return f"```python\ndef {p['entry_point']}(*args):\n    return None\n```"


@pytest.mark.parametrize(("reply", "score"), [(_whole, 1.0), (_body, 1.0), (_restated_then_solved, 1.0),
                                              (_wrong, 0.0), (lambda p: "I cannot help with that.", 0.0)])
def test_humaneval_chat_prompts_and_fenced_replies_graded_in_the_sandbox(humaneval, reply, score):
    engine = FencedReplies(humaneval, reply)
    spec = BenchmarkSpec("humaneval", limit=3, prompt_style="chat")
    metrics = evaluate_model("unused", [spec], engine, Sampling(n=1))
    assert metrics["eval/humaneval/avg@1"] == score
    [(prompts, params)] = engine.requests
    assert params.stop == ()  # a chat turn ends at EOS; the raw-completion stops would cut it at once
    content = prompts[0][0]["content"]
    assert content.startswith("Complete the following Python function.") and "```python\nfrom typing" in content


def test_completion_style_stays_the_raw_continuation(humaneval):
    bench = HumanEvalBenchmark(problems=humaneval, prompt_style="completion")
    bench.setup(ModelInfo("org/Some-Instruct", chat=True, reason="a chat model"))
    assert bench.prompts() == [p["prompt"] for p in humaneval] and tuple(bench.stop_sequences()) == HUMANEVAL_STOP
    assert bench.grade_samples([[p["canonical_solution"]] for p in humaneval])[0] == [[True]] * 3
    auto = HumanEvalBenchmark(problems=humaneval)  # auto: chat only for a chat model
    auto.setup(ModelInfo("Qwen2.5-Math-1.5B", chat=False, reason="a base name"))
    assert auto.style == "completion" and auto.settings()["prompt_style_reason"] == "a base name"
    auto.setup(ModelInfo("org/Some-Instruct", chat=True, reason="a chat model"))
    assert auto.style == "chat" and isinstance(auto.prompts()[0], list) and auto.stop_sequences() == ()


FULL_FUNCTIONS = {
    "py": "```python\ndef add(x: int, y: int) -> int:\n    return x + y\n```",
    "js": "```javascript\nfunction add(x, y) {\n  return x + y;\n}\nconsole.log(add(2, 3));\n```",
    "cpp": "Here:\n```cpp\nlong add(long x, long y) {\n    return x + y;\n}\n```",
    "sh": "```bash\nadd() {\n    echo $(( $1 + $2 ))\n}\n```",
}


def test_multipl_e_chat_replies_are_fitted_to_each_languages_stub():
    usable = []
    for language in FULL_FUNCTIONS:
        try:
            check_available(language, ROWS[language]["prompt"])
            usable.append(language)
        except RunnerUnavailable:
            continue
    if not usable:
        pytest.skip("no MultiPL-E toolchain runs here")
    problems = [_problem(lang) for lang in usable]
    bench = MultiPLEBenchmark(problems=problems, prompt_style="chat")
    for problem, [message] in zip(bench.problems, bench.prompts(), strict=True):
        name, tag, _ = LANGUAGES[problem["language"]]
        assert message["content"].startswith(f"Complete the following {name} function.")
        assert f"```{tag}\n{problem['prompt'].strip()}\n```" in message["content"]
    replies = [[FULL_FUNCTIONS[p["language"]], FULL_FUNCTIONS[p["language"]].replace("+", "-")] for p in bench.problems]
    results, stats = bench.grade_samples(replies)
    assert results == [[True, False]] * len(usable), (usable, stats)
    raw = MultiPLEBenchmark(problems=problems, prompt_style="completion")
    assert raw.grade_samples([[FULL_FUNCTIONS[p["language"]]] for p in raw.problems])[0] == [[False]] * len(usable)


def test_auto_decides_by_the_name_and_the_chat_template(tmp_path, tiny_dir):
    instruct = tmp_path / "Tiny-Instruct"
    shutil.copytree(tiny_dir, instruct)
    assert describe_model(str(instruct)).chat
    assert not describe_model(str(tiny_dir)).chat  # the same files: its name says nothing
    base = describe_model("Qwen/Qwen2.5-Math-1.5B")  # a base model with a chat template: judged by name, not loaded
    assert not base.chat and "does not say" in base.reason
    assert describe_model(str(tiny_dir), name="HuggingFaceTB/SmolLM2-135M-Instruct").chat  # the callback's case
    unloadable = describe_model("dft-no-such-org/Model-Chat")
    assert not unloadable.chat and "cannot be used" in unloadable.reason
    no_template = tmp_path / "Plain-it"
    shutil.copytree(tiny_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    assert not describe_model(str(no_template)).chat


def test_tiny_chat_model_end_to_end_through_evaluate(tmp_path, tiny_dir, monkeypatch):
    """``evaluate`` on the tiny model under an Instruct name: ``auto`` picks chat prompts, the real engine renders
    them with the chat template, and the replies are graded (wrong: the model is random)."""
    instruct = tmp_path / "Tiny-Instruct"
    shutil.copytree(tiny_dir, instruct)
    seen = []
    real_generate = HFEngine.generate_many

    def recording(self, requests):
        seen.extend(requests)
        return real_generate(self, requests)

    monkeypatch.setattr(HFEngine, "generate_many", recording)
    out = tmp_path / "out"
    evaluate_main(["--model", str(instruct), "--benchmarks", "[{name: humaneval, limit: 2}]", "--engine.kind=hf",
                   "--sampling.n=1", "--sampling.temperature=0", "--sampling.max_tokens=6", f"--output_dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    [bench] = summary["benchmarks"]
    assert bench["settings"]["prompt_style"] == "chat" and summary["model_kind"]["chat"]
    [(prompts, params, _)] = seen
    assert all(isinstance(p, list) and "```python" in p[0]["content"] for p in prompts) and params.stop == ()
    rows = [json.loads(line) for line in (out / "humaneval.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["completions"][0] for r in rows)
