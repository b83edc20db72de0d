"""Every config under conf/ is exercised: fit configs train one step, evaluate configs run one problem.

Fit configs are run as the stacks users launch (``--config a --config b``): the complete configs on
their own, overlays on the base they extend (``FIT_STACKS``), each with the model swapped for a tiny
random one (``tiny:qwen2``, or ``tiny:qwen2_5_vl`` for vision data), the data for a small local file in
the source's own schema (NuminaMath-CoT, OpenR1-Math as LUFFY filtered it, the offline-RL builder's
rejection rows, UltraFeedback, WeThink-style rows with images), CPU, fp32, one optimizer step, and no
loggers, checkpoints, exports or evaluation callbacks (those are constructed, then left out of the step).
Evaluate configs go through the ``evaluate`` parser, then every benchmark they list runs one problem
from a local file in its schema on the tiny model with the HF engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

CONF = REPO / "conf"
EVALUATIONS = sorted((CONF / "eval").glob("*.yaml"))
OVERLAYS = sorted((CONF / "overlays").glob("*.yaml"))
SWEEPS = sorted((CONF / "paper").glob("*.sweep"))
OFFLINE_PREFIXES = ("tiny:", "pkg:")

_MATH, _CODE = "paper/base_math.yaml", "paper/base_code.yaml"
#: config stacks as launched: complete configs alone, overlays on the base they extend
FIT_STACKS: list[tuple[str, ...]] = [
    ("tiny.yaml",), ("tiny_vl.yaml",), ("demo.yaml",),
    *[("demo.yaml", p.name) for p in sorted(CONF.glob("demo_*.yaml"))],  # the demo's companions (demo_sft)
    *[("tiny.yaml", f"overlays/{p.name}") for p in OVERLAYS],
    (_MATH,), (_CODE,), ("paper/table4_wethink_qwen25vl_3b.yaml",),
    *[(_MATH, f"paper/{p.name}") for p in sorted((CONF / "paper").glob("table1_*.yaml"))],
    *[(_CODE, f"paper/{p.name}") for p in sorted((CONF / "paper").glob("table3_*.yaml"))],
    (_MATH, "paper/table2_offline_rl.yaml"),
    (_MATH, "paper/table2_dpo.yaml"),
    (_MATH, "paper/table1_llama32_3b.yaml", "paper/tables5_6_iwsft.yaml"),      # Table 5
    (_MATH, "paper/table2_offline_rl.yaml", "paper/tables5_6_iwsft.yaml"),      # Table 6
    (_MATH, "paper/table7_openr1.yaml"),
    (_MATH, "paper/table1_llama32_3b.yaml", "paper/table8_lora.yaml"),
    (_MATH, "paper/figure3_eval.yaml"),
]


def _stack_id(stack: tuple[str, ...]) -> str:
    return "+".join(Path(s).stem for s in stack)


def instantiate(*configs, extra=()):
    from dft_lightning.cli import build_cli

    args: list[str] = []  # run=False: no subcommand
    for config in configs:
        args += ["--config", str(config)]
    return build_cli([*args, *extra], run=False)


def _merged(stack: tuple[str, ...]) -> dict[str, Any]:
    """The stack's YAML merged key by key (later files win; enough to see which data class and format it uses)."""
    def merge(into: dict, new: dict) -> dict:
        for key, value in new.items():
            into[key] = merge(dict(into.get(key) or {}), value) if isinstance(value, dict) and isinstance(
                into.get(key), dict) else value
        return into

    out: dict[str, Any] = {}
    for name in stack:
        out = merge(out, yaml.safe_load((CONF / name).read_text()) or {})
    return out


# -- small local files in each source's schema ----------------------------------------------------
def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _png(path: Path, colour: str = "red") -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), colour).save(path)
    return path.name


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Training files: NuminaMath-CoT, OpenR1 (LUFFY's copy), offline-RL rejection rows, UltraFeedback, WeThink."""
    root = tmp_path_factory.mktemp("sources")
    solution = "We add: $1 + 1 = 2$. The answer is $\\boxed{2}$."
    rating = lambda r: {a: {"Rating": r, "Rationale": ""} for a in ("helpfulness", "honesty")}  # noqa: E731
    images = root / "wethink" / "images"
    return {
        "numina": _jsonl(root / "numina.jsonl", [
            {"source": "amc_aime", "problem": "What is $1 + 1$?", "solution": solution,
             "messages": [{"role": "user", "content": "What is $1 + 1$?"}, {"role": "assistant", "content": solution}]},
            {"source": "synthetic_math", "problem": "What is $2 \\cdot 1$?",
             "solution": solution.replace("add", "multiply"), "messages": []},
            {"source": "olympiads", "messages": [{"role": "user", "content": "Compute $3 - 1$."},
                                                 {"role": "assistant", "content": solution}]},
        ]),
        "openr1": _jsonl(root / "openr1.jsonl", [
            {"data_source": "openr1", "prompt": [{"role": "system", "content": "Think first."},
                                                  {"role": "user", "content": f"Problem {i}: what is $1 + {i}$?"}],
             "target": [{"role": "assistant", "content": f"<think>\n1 + {i}\n</think>\n\\boxed{{{1 + i}}}"}]}
            for i in range(3)
        ]),
        "rejection": _jsonl(root / "offline_rl" / "train.jsonl", [
            {"problem": f"What is ${i} + 1$?", "response": f"It is $\\boxed{{{i + 1}}}$.", "verified": True,
             "answer": str(i + 1), "question_id": f"q{i}", "index": i, "sample": 0, "finish_reason": "stop"}
            for i in range(3)
        ] + [{"problem": "What is $0 \\cdot 5$?", "response": "\\boxed{5}", "verified": False}]),
        "pairs": _jsonl(root / "offline_rl" / "pairs" / "part-00000-of-00001.jsonl", [
            {"prompt": f"What is ${i} + 1$?", "chosen": f"It is $\\boxed{{{i + 1}}}$.",
             "rejected": f"It is $\\boxed{{{i + 2}}}$.", "answer": str(i + 1), "question_id": f"q{i}", "index": i,
             "chosen_sample": 0, "rejected_sample": 1, "source": "synthetic_math", "level": None}
            for i in range(3)
        ]),
        "ultrafeedback": _jsonl(root / "ultrafeedback.jsonl", [
            {"source": "evol_instruct", "instruction": f"Write a Python function that returns {i}.",
             "completions": [{"model": "a", "response": f"def f():\n    return {i}\n", "annotations": rating("5")},
                             {"model": "b", "response": "I cannot.", "annotations": rating("N/A")}]}
            for i in range(3)
        ]),
        "wethink": _jsonl(root / "wethink" / "train.jsonl", [
            {"image_path": f"images/{_png(images / f'{i}.png', colour)}",
             "problem": f"<image>What colour is the square in picture {i}?",
             "answer": f"<think>It looks {colour}.</think> \\boxed{{{colour}}}"}
            for i, colour in enumerate(("red", "blue", "green"))
        ]),
        "wethink_root": str(images.parent),
    }


def _data_overrides(stack: tuple[str, ...], sources: dict[str, str]) -> list[str]:
    data = _merged(stack).get("data", {})
    cls = data.get("class_path", "").rsplit(".", 1)[-1]
    init = data.get("init_args", {})
    small = ["--data.init_args.batch_size=2", "--data.init_args.micro_batch_size=1"]
    if cls == "MathDataModule":
        fmt = init.get("source_format", "numina")
        return [f"--data.init_args.train={sources[fmt]}", "--data.init_args.num_samples=null",
                "--data.init_args.cache=false", *small]
    if cls == "PairDataModule":
        return [f"--data.init_args.train={sources['pairs']}", "--data.init_args.max_samples=null",
                "--data.init_args.cache=false", *small]
    if cls == "CodeDataModule":
        return [f"--data.init_args.train={sources['ultrafeedback']}", "--data.init_args.num_samples=null",
                "--data.init_args.cache=false", *small]
    if cls == "VisionDataModule":
        return [f"--data.init_args.train={sources['wethink']}",
                f"--data.init_args.image_root={sources['wethink_root']}", "--data.init_args.num_workers=0", *small]
    if cls == "ShapesDataModule":
        return ["--data.init_args.num_train=4", "--data.init_args.num_test=2", *small]
    if cls == "DemoMathDataModule":
        return ["--data.init_args.num_train=8", "--data.init_args.num_test=2", *small]
    raise AssertionError(f"{stack}: no small data for {cls!r}; add its source schema to this test")


def _is_vision(stack: tuple[str, ...]) -> bool:
    return _merged(stack).get("data", {}).get("class_path", "").endswith(("VisionDataModule", "ShapesDataModule"))


@pytest.mark.parametrize("stack", FIT_STACKS, ids=_stack_id)
def test_fit_config_trains_one_step(stack, sources, tmp_path):
    import math

    from lightning.pytorch.callbacks import ModelCheckpoint

    from dft_lightning.callbacks import HFExport
    from dft_lightning.evaluation.callback import EvaluationCallback

    tiny = "tiny:qwen2_5_vl" if _is_vision(stack) else "tiny:qwen2"
    cli = instantiate(*(CONF / s for s in stack), extra=[
        f"--model.pretrained={tiny}", f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.max_steps=1", "--trainer.max_epochs=1",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--export.at_end=false",
        *_data_overrides(stack, sources),
    ])
    trainer = cli.trainer
    # callbacks were built from the config (checked); the step runs without evaluations, exports, checkpoints
    trainer.callbacks[:] = [c for c in trainer.callbacks
                            if not isinstance(c, EvaluationCallback | HFExport | ModelCheckpoint)]
    assert cli.datamodule.tokenizer_spec == tiny
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # the FSDP2 overlay's one-process group
            dist.destroy_process_group()
    assert trainer.global_step == 1
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert cli.datamodule.reports["train"].kept >= 2


def test_paper_configs_keep_the_papers_settings():
    """The numbers the paper states, as the stacks resolve them (no model is built)."""
    def resolved(*stack: str) -> dict:
        cli = instantiate(*(CONF / s for s in stack), extra=["--trainer.logger=false"])
        data = cli.datamodule
        hp = cli.model.hparams
        return {"lr": hp.lr, "warmup": hp.warmup_ratio, "batch": data.batch_size,
                "max_length": data.max_length, "epochs": cli.trainer.max_epochs, "model": hp.pretrained,
                "objective": type(cli.model.objective).__name__, "samples": getattr(data, "max_samples", None),
                "lora": hp.lora, "root": str(cli.trainer.default_root_dir)}

    table1 = resolved(_MATH)
    assert table1 == {**table1, "lr": 5e-5, "warmup": 0.1, "batch": 256, "max_length": 2048, "epochs": 1,
                      "model": "Qwen/Qwen2.5-Math-1.5B", "objective": "DFT", "samples": 100_000, "lora": None}
    assert resolved(_MATH, "paper/table1_llama31_8b.yaml")["lr"] == 2e-5
    assert resolved(_MATH, "paper/table1_deepseek_math_7b.yaml")["lr"] == 5e-5
    sft = instantiate(CONF / _MATH, extra=["--trainer.logger=false",
                                           "--model.objective.class_path=dft_lightning.objectives.SFT"])
    assert type(sft.model.objective).__name__ == "SFT" and str(sft.trainer.default_root_dir).endswith(".SFT")
    code = resolved(_CODE, "paper/table3_qwen25_3b.yaml")
    assert (code["lr"], code["warmup"], code["batch"], code["epochs"], code["model"]) == (
        5e-5, 0.05, 16, 1, "Qwen/Qwen2.5-3B")
    assert resolved("paper/table4_wethink_qwen25vl_3b.yaml")["model"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert resolved(_MATH, "paper/table7_openr1.yaml")["epochs"] == 3
    assert resolved(_MATH, "paper/table8_lora.yaml")["lora"]["r"] == 8
    assert resolved(_MATH, "paper/table8_lora.yaml")["lora"]["lora_alpha"] == 16
    assert resolved(_MATH, "paper/table2_offline_rl.yaml")["root"].startswith("runs/paper/table2/")
    assert resolved(_MATH, "paper/table2_offline_rl.yaml", "paper/tables5_6_iwsft.yaml")["objective"] == "IWSFT"
    dpo = resolved(_MATH, "paper/table2_dpo.yaml")
    assert (dpo["lr"], dpo["warmup"], dpo["batch"], dpo["objective"]) == (1e-6, 0.05, 128, "DPO")


# -- evaluation configs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def benchmark_files(tmp_path_factory) -> dict[str, str]:
    """One problem per benchmark, in each source's schema."""
    from dft_lightning.evaluation.benchmarks.code import load_humaneval

    root = tmp_path_factory.mktemp("benchmarks")
    he = load_humaneval(limit=1)[0]
    images = root / "images"
    return {
        "math500": _jsonl(root / "math500.jsonl", [{"problem": "What is $1+1$?", "answer": "2", "unique_id": "a"}]),
        "minerva": _jsonl(root / "minerva.jsonl", [{"problem": "What is $2+1$?", "solution": "So $\\boxed{3}$.",
                                                     "idx": 0}]),
        "olympiadbench": _jsonl(root / "olympiad.jsonl", [{"id": 1, "question": "What is $1+3$?",
                                                           "final_answer": ["$4$"]}]),
        "aime24": _jsonl(root / "aime24.jsonl", [{"id": 60, "problem": "What is $2+3$?", "answer": "5"}]),
        "amc23": _jsonl(root / "amc23.jsonl", [{"id": 0, "question": "What is $3+3$?", "answer": 6.0}]),
        "gsm8k": _jsonl(root / "gsm8k.jsonl", [{"question": "Two apples and one more?", "answer": "2 + 1\n#### 3"}]),
        "humaneval_plus": _jsonl(root / "humanevalplus.jsonl", [
            {k: he[k] for k in ("task_id", "prompt", "entry_point", "canonical_solution", "test")}]),
        "multipl_e": _jsonl(root / "multipl_e.jsonl", [{
            "name": "HumanEval_53_add", "language": "py",
            "prompt": 'def add(x: int, y: int) -> int:\n    """Add two numbers x and y"""\n',
            "tests": "def check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n",
            "stop_tokens": ["\ndef", "\n#", "\nif", "\nclass"]}]),
        "mathverse": _jsonl(root / "mathverse.jsonl", [{
            "problem_index": "1", "sample_index": "1", "problem_version": "Vision Only", "metadata": {},
            "image": f"images/{_png(images / 'verse.png')}", "question": "Find AB.", "answer": "5",
            "question_type": "free-form", "query_cot": "Find AB."}]),
        "mathvision": _jsonl(root / "mathvision.jsonl", [{
            "id": "7", "question": "Which number? <image1>", "options": ["1", "2", "3", "4", "5"],
            "image": f"images/{_png(images / 'vision.png', 'blue')}", "answer": "C", "level": 2,
            "subject": "arithmetic"}]),
        "wemath": _jsonl(root / "wemath.jsonl", [{
            "ID": "2steps_1", "split": "testmini", "knowledge concept": "parallelograms",
            "question": "What is the perimeter?", "option": "A. 3; B. 4; C. 5; D. 6; E. No correct answer",
            "answer": "B", "image_path": f"images/{_png(images / 'we.png', 'black')}", "key": "2-1",
            "question number": 1}]),
    }


def _local(spec, files: dict[str, str]):
    """``spec`` with a one-problem local source in its schema (HumanEval: the package's own file)."""
    import dataclasses

    from dft_lightning.evaluation.benchmarks.registry import resolve_alias

    target, args = spec.target()
    path, defaults = resolve_alias(target)
    key = {**defaults, **args}.get("schema") or {**defaults, **args}.get("benchmark") or target
    key = {"dft_lightning.evaluation.benchmarks.math.GSM8KBenchmark": "gsm8k"}.get(path, key)
    init = dict(spec.init_args)
    if key == "humaneval" or path.endswith("HumanEvalBenchmark"):
        source = None
    elif key in files:
        source = files[key]
    elif spec.source and Path(str(spec.source)).exists():
        source = spec.source
    else:
        raise AssertionError(f"no local file for benchmark {spec.label!r} ({path}); add one to benchmark_files")
    if "source" in init:
        init["source"] = source
    return dataclasses.replace(spec, source=None if "source" in init else source, init_args=init, limit=1, n=1,
                               max_tokens=8)


@pytest.mark.parametrize("config", EVALUATIONS, ids=lambda p: p.name)
def test_evaluation_config_runs_one_problem(config, benchmark_files, tmp_path, monkeypatch):
    from dft_lightning.evaluation.graders.math import GradingStats, MathGrader
    from dft_lightning.evaluation.run import BenchmarkSpec, EngineSpec, build_parser, evaluate_model

    # one item per benchmark: graded in this process, not in a freshly spawned pool per benchmark (tested elsewhere)
    monkeypatch.setattr(MathGrader, "grade_batch", lambda self, problems, completions: (
        [self.grade(p, c) for p, c in zip(problems, completions, strict=True)], GradingStats(items=len(problems))))
    monkeypatch.setenv("DFT_MATH_EVAL_DATA", str(tmp_path / "harness-data"))
    monkeypatch.setenv("DFT_DEMO_TEST", benchmark_files["math500"])
    parser = build_parser()
    init = parser.instantiate_classes(parser.parse_args(["--config", str(config)]))
    assert init.model and init.benchmarks
    specs = [BenchmarkSpec.of(b) for b in init.benchmarks]
    for spec in specs:  # each names a benchmark class that takes its arguments
        spec.arguments()
    vision = any(s.target()[0] in ("mathverse", "mathvision", "wemath") for s in specs)
    sampling = init.sampling
    sampling.n, sampling.max_tokens = 1, 8
    metrics = evaluate_model("tiny:qwen2_5_vl" if vision else "tiny:qwen2", [_local(s, benchmark_files) for s in specs],
                             engine=EngineSpec(kind="hf", batch_size=4), sampling=sampling,
                             output_dir=str(tmp_path / "out"),
                             model_name=None if init.model.startswith("pkg:") else init.model)  # no GGUF read
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["benchmarks"]) == len(specs) and "eval/mean/avg" in metrics
    for bench in summary["benchmarks"]:
        assert summary["totals"][bench["name"]]["problems"] + summary["totals"][bench["name"]]["skipped_problems"] == 1


def test_math_evaluations_use_each_familys_prompt_type():
    expected = {"math_qwen.yaml": "qwen-boxed", "math_llama.yaml": "llama-base-boxed",
                "math_deepseek.yaml": "deepseek-math"}
    for name, template in expected.items():
        config = yaml.safe_load((CONF / "eval" / name).read_text())
        assert [b["name"] for b in config["benchmarks"]] == ["math500", "minerva", "olympiadbench", "aime24", "amc23"]
        assert {b["template"] for b in config["benchmarks"]} == {template}
        assert config["sampling"] == {**config["sampling"], "n": 16, "temperature": 1.0, "max_tokens": 4096}


# -- sweeps and coverage --------------------------------------------------------------------------------
@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.name)
def test_figure3_sweep_files_prepare_their_grid(sweep_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.chdir(REPO)
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import sweep
    finally:
        sys.path.remove(str(REPO / "tools"))
    sweep.main([f"@{sweep_file}", "--out", str(tmp_path), "--launch", "print", "--no_progress"])
    points = sorted(p for p in tmp_path.iterdir() if (p / "point.yaml").exists())
    assert len(points) == 8  # four values x {DFT, SFT}
    configs = json.loads((points[0] / "point.json").read_text())["configs"]
    assert [Path(c).name for c in configs] == ["base_math.yaml", "figure3_eval.yaml"]


def test_all_configs_are_covered():
    """Every fit YAML is in a stack above, every sweep file and evaluation config is run."""
    fit = {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml") if "eval" not in p.relative_to(CONF).parts}
    covered = {name for stack in FIT_STACKS for name in stack}
    assert fit == covered, f"not run: {sorted(fit - covered)}; unknown: {sorted(covered - fit)}"
    assert OVERLAYS and EVALUATIONS and SWEEPS
    assert {p.name for p in EVALUATIONS} >= {"math_qwen.yaml", "math_llama.yaml", "math_deepseek.yaml",
                                              "code_paper.yaml", "multimodal.yaml"}
    for stack in FIT_STACKS:
        pretrained = _merged(stack).get("model", {}).get("pretrained", "")
        assert pretrained, stack
        assert pretrained.startswith(OFFLINE_PREFIXES) or "/" in pretrained, stack
